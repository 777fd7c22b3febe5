// traits_sm80.cuh: the compile-time shape of one tensor-core forward variant, and the shared-memory
// tile layout it uses.
//
// A variant is (head-dim bucket D, BM query rows per block, BN keys per tile, WARPS, STAGES of the
// K/V ring, Q kept in registers or re-read from shared memory). Everything else is derived here and
// checked with static_assert; cuflash/_config.py (sm80 section) asks for exactly kSmemBytes of
// dynamic shared memory, and the kernel traps if it was given less.
//
// Warp w owns query rows [w * kWarpRows, (w + 1) * kWarpRows) of the block: kMT m16 tiles. Each warp
// computes the full BN-wide score tile of its rows, so the softmax needs no cross-warp traffic.
#pragma once
#include "types.cuh"

namespace cuflash {

template <int D_, int BM_, int BN_, int WARPS_, int STAGES_, bool QREGS_>
struct Sm80FwdTraits {
    static constexpr int kD = D_;            // head-dim bucket (padded with zeros past headdim)
    static constexpr int kBM = BM_;          // query rows per block
    static constexpr int kBN = BN_;          // keys per K/V tile
    static constexpr int kWarps = WARPS_;
    static constexpr int kStages = STAGES_;  // K/V tiles in flight (ring of kStages K and kStages V)
    static constexpr bool kQInRegs = QREGS_; // Q fragments loaded once into registers
    static constexpr int kThreads = 32 * kWarps;

    static constexpr int kWarpRows = kBM / kWarps;  // query rows per warp
    static constexpr int kMT = kWarpRows / 16;      // m16 tiles per warp
    static constexpr int kNT = kBN / 8;             // n8 tiles of the score tile
    static constexpr int kKS = kD / 16;             // k16 steps of S = Q K^T
    static constexpr int kDT = kD / 8;              // n8 tiles of the output
    static constexpr int kKS2 = kBN / 16;           // k16 steps of O += P V
    static constexpr int kChunks = kD / 8;          // 16-byte chunks per row

    // Shared-memory tile layout: a tile of R rows x D columns (16-bit) is stored as column blocks of
    // 64 elements (R rows x 128 bytes each), plus one trailing block of 32 elements (R rows x 64 bytes)
    // when D % 64 == 32. Inside a 64-block the 16-byte chunk c of row r sits at chunk c ^ (r % 8);
    // inside a 32-block at chunk c ^ ((r / 2) % 4). Eight consecutive rows at one logical chunk (one
    // ldmatrix 8x8 matrix, or the cp.async writes of 8 lanes) then hit 8 distinct 16-byte bank groups:
    // no bank conflicts for cp.async writes, ldmatrix reads (plain and .trans) or the output staging.
    static constexpr int kFull = kD / 64;           // 64-column blocks
    static constexpr bool kHasHalf = (kD % 64) != 0;

    static constexpr int kQBytes = kBM * kD * 2;
    static constexpr int kKVBytes = kBN * kD * 2;
    static constexpr int kMetaBytes = 16;  // block-uniform scalars read back in the loop (see fwd_sm80.cu)

    // Registers held across the main loop by the accumulators (O, S, optionally Q), per thread.
    static constexpr int kAccRegs = kMT * kDT * 4 + kMT * kNT * 4 + (kQInRegs ? kMT * kKS * 4 : 0);
    // At 192 accumulator registers of which 128+ for O (e.g. 32 rows x 128 columns of O plus 32 x 64
    // of S per warp) the row statistics m and l (4 kMT registers) live in shared memory between tiles, one float per
    // thread and value ([value][thread]: conflict-free), read and written once per tile. This keeps
    // these variants within 255 registers with room for ptxas's scheduling, instead of spilling.
    static constexpr bool kStatsInSmem = kAccRegs >= 192 && kMT * kDT * 4 >= 128;
    // Full tiles (all rows in range, headdim == D) copied with plain cp.async (load_tile_full), and the
    // O rescale skipped for rows whose max did not move (softmax_rescale). Measured on the H100 (bf16,
    // 16k tokens): +7% (d 128) and +9% (d 96) for the fast copies with 32 rows per warp, but -5% with
    // 16 rows per warp (d 192), so only there; the skip helps or is neutral everywhere. Neither for
    // 128-key tiles: their score tile takes the registers these need (ptxas spills them otherwise).
    static constexpr bool kFastLoads = kBN < 128 && kMT == 2;
    static constexpr bool kSkipRescale = kBN < 128;
    static constexpr int kStatsBytes = kStatsInSmem ? 4 * kMT * kThreads * 4 : 0;
    static constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + kStatsBytes + kMetaBytes;

    static_assert(kD % 32 == 0 && kD >= 32 && kD <= 256, "head-dim bucket: a multiple of 32 in 32..256");
    static_assert(kWarps >= 1 && kWarps <= 8, "1..8 warps");
    static_assert(kBM % (16 * kWarps) == 0 && (kMT == 1 || kMT == 2), "each warp owns 16 or 32 rows");
    static_assert(kBN % 16 == 0 && kBN >= 16 && kBN <= 256, "BN: a multiple of 16");
    static_assert(kStages >= 1 && kStages <= 3, "1..3 K/V stages");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm90 per-block limit (227 KB)");
    static_assert(kAccRegs <= 200, "accumulators alone would leave too few of 255 registers");
};

namespace sm80 {

// Byte offset of 16-byte chunk `c` of row `r` in an R-row tile of D columns (layout above).
template <int R, int D>
__device__ __forceinline__ u32 tile_off(int r, int c) {
    constexpr int kFull = D / 64;
    if (c < kFull * 8) {
        return (u32)((c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
    }
    return (u32)(kFull * R * 128 + r * 64 + (((c & 3) ^ ((r >> 1) & 3)) << 4));
}

// ldmatrix operand addressing. A lane reads row `row + 16 j` (j compile-time) at chunk
// `2 step + bit` (step compile-time, bit = 0/1 from the lane). The swizzle only XORs address bits
// 4..6, so the lane part is computed once (lane_base64 / lane_base32, added to a 128-byte aligned
// tile address) and each fragment address is (base ^ constant) + constant: one LOP3, the addition
// folds into the LDSM immediate.
__device__ __forceinline__ u32 lane_base64(int row, int bit) {
    return (u32)(row * 128 + ((bit ^ (row & 7)) << 4));
}
__device__ __forceinline__ u32 lane_base32(int row, int bit) {
    return (u32)(row * 64 + ((bit ^ ((row >> 1) & 3)) << 4));
}
// base64 = tile address + lane_base64(...), base32 = tile address + lane_base32(...); the tile
// address must be a multiple of 128.
template <int R, int D>
__device__ __forceinline__ u32 frag_addr(u32 base64, u32 base32, int step, int j) {
    constexpr int kFull = D / 64;
    if (2 * step < kFull * 8) {
        return (base64 ^ (u32)(((2 * step) & 7) << 4)) + (u32)((step >> 2) * R * 128 + j * 16 * 128);
    }
    return (base32 ^ (u32)(((2 * step) & 3) << 4)) + (u32)(kFull * R * 128 + j * 16 * 64);
}

}  // namespace sm80
}  // namespace cuflash
