// traits_decode.cuh: the compile-time shape of one decoding-forward variant (fwd_decode.cu), and the
// shared-memory layout it uses.
//
// A variant is (head-dim bucket D, WARPS, WKEYS keys per warp per tile, STAGES of the K/V ring, Q kept
// in registers or re-read from shared memory). Every warp of a block owns the same kRows = 16 query
// rows (one m16 tile: seqlen_q x group <= 16 rows per kv head) and its own WKEYS keys of every tile of
// kBN = WARPS x WKEYS keys, with its own online-softmax state; the warps' partial results are merged
// through shared memory at the end. cuflash/_launch_decode.py (DecodeTile) asks for exactly kSmemBytes
// of dynamic shared memory, and the kernel traps if it was given less.
//
// Shared memory, in order (every region a multiple of 128 bytes from a 1024-aligned base):
//   Q        kRows x D, 16-bit, the 64-column-block swizzled layout of traits_sm80.cuh
//   ring     kStages x (K tile, V tile), each kBN x D, 16-bit, same layout
//   stats    per warp and row: the row max (log2 units) and the row sum, for the merge
// After the last tile the ring is free and holds the warps' fp32 partial outputs for the merge
// (kWarps x kRows rows of kMergeStride floats).
#pragma once
#include "traits_sm80.cuh"

namespace cuflash {

template <int D_, int WARPS_, int WKEYS_, int STAGES_, bool QREGS_>
struct DecodeTraits {
    static constexpr int kD = D_;              // head-dim bucket (zero padding past headdim)
    static constexpr int kWarps = WARPS_;
    static constexpr int kWarpKeys = WKEYS_;   // keys of one tile each warp owns
    static constexpr int kStages = STAGES_;    // K/V tiles in the ring (kStages - 1 loading ahead)
    static constexpr bool kQInRegs = QREGS_;   // Q fragments loaded once into registers
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kRows = 16;           // query rows of a block (packed: row = query * group + head)
    static constexpr int kBN = kWarps * kWarpKeys;  // keys per tile

    static constexpr int kNT = kWarpKeys / 8;   // n8 tiles of a warp's score tile
    static constexpr int kKS = kD / 16;         // k16 steps of S = Q K^T
    static constexpr int kDT = kD / 8;          // n8 tiles of the output
    static constexpr int kKS2 = kWarpKeys / 16; // k16 steps of O += P V
    static constexpr int kChunks = kD / 8;      // 16-byte chunks of a 16-bit row
    static constexpr int kFull = kD / 64;       // 64-column blocks of the tile layout

    static constexpr int kQBytes = kRows * kD * 2;
    static constexpr int kKVBytes = kBN * kD * 2;      // one K or one V tile
    static constexpr int kStageBytes = 2 * kKVBytes;   // K tile, then V tile
    static constexpr int kRingBytes = kStages * kStageBytes;
    static constexpr int kStatsBytes = kWarps * kRows * 2 * 4;
    static constexpr int kSmemBytes = kQBytes + kRingBytes + kStatsBytes;

    // Merge buffer: a row of D floats padded by 8 so that the float2 stores of the C fragments (rows
    // g and g + 8, 8 bytes per lane) of each half-warp hit 128 distinct bytes (the row stride is 32
    // bytes mod 128 for every bucket): two wavefronts per store, the minimum for 256 bytes.
    static constexpr int kMergeStride = kD + 8;
    static constexpr int kMergeBytes = kWarps * kRows * kMergeStride * 4;

    // Blocks per SM that the H100's 228 KB of shared memory per SM allows (1 KB reserved per block),
    // at most 4: passed as __launch_bounds__'s minimum, so that ptxas keeps the registers within
    // what that occupancy allows, and used by the host's split heuristic (DecodeTile.min_blocks).
    static constexpr int kMinBlocks = (228 * 1024) / (kSmemBytes + 1024) < 1 ? 1
                                    : (228 * 1024) / (kSmemBytes + 1024) > 4 ? 4
                                    : (228 * 1024) / (kSmemBytes + 1024);

    static_assert(kD % 64 == 0 && kD >= 64 && kD <= 256, "head-dim bucket: 64, 128, 192 or 256");
    static_assert(kWarps >= 1 && kWarps <= 8, "1..8 warps");
    static_assert(kWarpKeys == 16 || kWarpKeys == 32, "16 or 32 keys per warp and tile");
    static_assert(kStages >= 2 && kStages <= 8, "2..8 ring stages");
    // Cluster variants: the slice's normalised O (kRows x kD floats) and its per-row LSEs, after the merge
    // buffer, where the other blocks of the cluster read them.
    static constexpr int kClusterBytes = kRows * kD * 4 + kRows * 4;
    static_assert(kMergeBytes <= kRingBytes, "the merge buffer reuses the K/V ring");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm90 per-block limit (227 KB)");
};

}  // namespace cuflash
