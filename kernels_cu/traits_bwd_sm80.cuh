// traits_bwd_sm80.cuh: the compile-time shape of the tensor-core backward (bwd_sm80.cu), one per
// head-dim bucket, and the shared-memory addressing its warps use.
//
// A block owns BN keys of one (kv head, batch) and walks query blocks of BM rows. Every step has five
// warp-tiled GEMMs, each with its own split of the 8 warps:
//
//   S  = Q  K^T, dP = dO V^T   (BM x BN, k = D)    warps WM_S x WN_S; warp (w % WM_S, w / WM_S) owns
//                                                  the rows [wm TM_S, +TM_S) and keys [wn TN_S, +TN_S)
//   dV += P^T dO, dK += dS^T Q  (BN x D, k = BM)   warps WN_KV x WD_KV; warp (w % WN_KV, w / WN_KV)
//                                                  owns the 16-key groups wn + WN_KV i and the 16-column
//                                                  groups wd + WD_KV k (interleaved: see below)
//   dQ  = dS K                  (BM x D, k = BN)   warps WM_Q x WD_Q; rows [wm TM_Q, +TM_Q) and the
//                                                  16-column groups wd + WD_Q k
//
// Shared-memory tiles (16-bit) use the layout of traits_sm80.cuh (64-column blocks, chunk c of row r
// at c ^ (r % 8); a trailing 32-column block with c ^ ((r / 2) % 4) when D % 64 == 32): conflict-free
// for cp.async writes, ldmatrix (plain and .trans) and the 32-bit fragment stores.
//
// Interleaved 16-column groups: a warp that owns groups s = w + W k (k = 0, 1, ...) of a tile reads
// chunk 2 s + bit = (2 w + bit) + 2 W k. With W in {1, 2, 4} the lane part 2 w + bit (< 2 W) and the
// step part 2 W k never share a bit inside a 64-column block, so the address is
// (lane base ^ constant) + constant: one LOP3 per ldmatrix, the rest folds into its immediate; this
// holds for every bucket (96, 160 and 224 included), where contiguous column ranges per warp would
// straddle blocks.
#pragma once
#include "types.cuh"

namespace cuflash {

template <int D_, int BM_, int BN_, int WM_S_, int WN_KV_, int WM_Q_, int STAGES_>
struct Sm80BwdShape {
    static constexpr int kD = D_;        // head-dim bucket (zero padding past headdim)
    static constexpr int kBM = BM_;      // query rows per step
    static constexpr int kBN = BN_;      // keys per block
    static constexpr int kWarps = 8;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kStages = STAGES_;  // Q / dO / LSE / D buffers (2: next step prefetched)

    // S = Q K^T and dP = dO V^T
    static constexpr int kWMS = WM_S_, kWNS = kWarps / WM_S_;
    static constexpr int kTMS = kBM / kWMS, kTNS = kBN / kWNS;  // rows, keys per warp
    static constexpr int kMTS = kTMS / 16, kNTS = kTNS / 8;      // m16 tiles, n8 tiles per warp
    static constexpr int kKSD = kD / 16;                         // k16 steps over the head dim
    // dV += P^T dO and dK += dS^T Q
    static constexpr int kWNKV = WN_KV_, kWDKV = kWarps / WN_KV_;
    static constexpr int kMTKV = kBN / 16 / kWNKV;               // 16-key groups per warp
    static constexpr int kSKV = kD / 16 / kWDKV;                 // 16-column groups per warp
    static constexpr int kKSM = kBM / 16;                        // k16 steps over the query rows
    // dQ = dS K
    static constexpr int kWMQ = WM_Q_, kWDQ = kWarps / WM_Q_;
    static constexpr int kTMQ = kBM / kWMQ, kMTQ = kTMQ / 16;
    static constexpr int kSQ = kD / 16 / kWDQ;
    static constexpr int kKSN = kBN / 16;                        // k16 steps over the keys

    // Shared memory, bytes. Q and dO: kStages buffers each; K, V; P and dS (BM x BN, 16-bit);
    // per stage the rows' lse * log2(e) and D (2 x BM floats). Every offset is a multiple of 128.
    static constexpr int kQBytes = kBM * kD * 2;
    static constexpr int kKBytes = kBN * kD * 2;
    static constexpr int kPBytes = kBM * kBN * 2;
    static constexpr int kVecBytes = 2 * kBM * 4;
    static constexpr int kOffQ = 0;
    static constexpr int kOffdO = kOffQ + kStages * kQBytes;
    static constexpr int kOffK = kOffdO + kStages * kQBytes;
    static constexpr int kOffV = kOffK + kKBytes;
    static constexpr int kOffP = kOffV + kKBytes;
    static constexpr int kOffdS = kOffP + kPBytes;
    static constexpr int kOffVec = kOffdS + kPBytes;
    static constexpr int kSmemBytes = kOffVec + kStages * kVecBytes;

    // fp32 accumulator registers per thread: dK and dV live through the whole loop, next to one score
    // tile (S, then dP) in the first phase and the dQ tile in the second.
    static constexpr int kAccKV = 2 * kMTKV * 2 * kSKV * 4;
    static constexpr int kAccS = kMTS * kNTS * 4, kAccQ = kMTQ * 2 * kSQ * 4;
    static constexpr int kAccRegs = kAccKV + (kAccS > kAccQ ? kAccS : kAccQ);

    static_assert(kD % 32 == 0 && kD >= 32 && kD <= 256, "head-dim bucket: a multiple of 32 in 32..256");
    static_assert(kBN == 64 || kBN == 128, "BN: 64 or 128 (P / dS tiles are whole 64-column blocks)");
    static_assert(kBM == 64 || kBM == 128, "BM: 64 or 128 (divides the 128-row padding of the scratch)");
    static_assert(kWMS * kWNS == kWarps && kWNKV * kWDKV == kWarps && kWMQ * kWDQ == kWarps, "8 warps");
    static_assert(kTMS % 16 == 0 && (kNTS == 4 || kNTS == 8), "S tile per warp: m16 rows, 4 or 8 n8 tiles");
    static_assert(kTMQ % 16 == 0 && kMTQ >= 1, "dQ rows per warp: m16 tiles");
    static_assert((kBN / 16) % kWNKV == 0 && (kWNKV == 1 || kWNKV == 2 || kWNKV == 4), "key groups");
    static_assert((kD / 16) % kWDKV == 0 && (kWDKV == 1 || kWDKV == 2 || kWDKV == 4), "dK/dV column groups");
    static_assert((kD / 16) % kWDQ == 0 && (kWDQ == 1 || kWDQ == 2 || kWDQ == 4), "dQ column groups");
    static_assert(kD % 64 == 0 || (kWDKV <= 2 && kWDQ <= 2), "32-column tail block: at most 2 column warps");
    static_assert(kStages == 1 || kStages == 2, "1 or 2 stages");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm90 per-block limit (227 KB)");
    static_assert(kAccRegs <= 192, "accumulators alone would leave too few of 255 registers");
};

// The tile table (cuflash/_launch_bwd_sm80.py mirrors it; tests/test_bwd_sm80_compile.py checks
// the two agree). "to measure": FlashAttention-2's H100 choices where they exist. STAGES = 1 variants
// (Q / dO single-buffered, 48-64 KB less) are for GPUs whose per-block shared memory cannot hold the
// 2-stage tile (A100: 163 KB).
// DROPOUT = true (the bwd_sm80<..., true> kernels) takes the same shape unless specialised at the end.
// smem: kSmemBytes; regs: kAccRegs (dK + dV + the larger of one score tile and the dQ tile).
//                                             D   BM   BN WM_S WN_KV WM_Q stages   smem    regs
template <int D, int STAGES = 2, bool DROPOUT = false> struct Sm80BwdTraits;
template <int D, int STAGES> struct Sm80BwdTraits<D, STAGES, true> : Sm80BwdTraits<D, STAGES, false> {};
template <> struct Sm80BwdTraits<32, 2>  : Sm80BwdShape<32, 128, 128, 4, 4, 4, 2> {};   // 114 KB   96
template <> struct Sm80BwdTraits<64, 2>  : Sm80BwdShape<64, 128, 128, 4, 4, 4, 2> {};   // 162 KB  128
template <> struct Sm80BwdTraits<96, 2>  : Sm80BwdShape<96, 64, 128, 2, 4, 4, 2> {};    // 129 KB  128
template <> struct Sm80BwdTraits<128, 2> : Sm80BwdShape<128, 64, 128, 2, 4, 2, 2> {};   // 161 KB  160
template <> struct Sm80BwdTraits<160, 2> : Sm80BwdShape<160, 64, 64, 4, 4, 4, 2> {};    // 137 KB  120
template <> struct Sm80BwdTraits<192, 2> : Sm80BwdShape<192, 64, 64, 4, 2, 2, 2> {};    // 161 KB  144
template <> struct Sm80BwdTraits<224, 2> : Sm80BwdShape<224, 64, 64, 4, 4, 4, 2> {};    // 185 KB  168
template <> struct Sm80BwdTraits<256, 2> : Sm80BwdShape<256, 64, 64, 4, 2, 2, 2> {};    // 209 KB  192
template <> struct Sm80BwdTraits<224, 1> : Sm80BwdShape<224, 64, 64, 4, 4, 4, 1> {};    // 128 KB  168
template <> struct Sm80BwdTraits<256, 1> : Sm80BwdShape<256, 64, 64, 4, 2, 2, 1> {};    // 145 KB  192
// Dropout-only shapes (_launch_bwd_sm80.TILES_DROPOUT) where the regular one spills next to the Philox
// keep bits: d 128 with (WM_S, WN_KV, WM_Q) = (2, 4, 2) spilled 4 bytes (bf16, sm_80, NVRTC 13.0); (2, 2, 4)
// (warp grids 2x4, 2x4, 4x2) has none with NVRTC 13.0 and 13.5 on sm_80 and sm_90a. Same block shape and
// shared memory; the dQ GEMM reads 64 more ldmatrix per step (1216 instead of 1152).
template <> struct Sm80BwdTraits<128, 2, true> : Sm80BwdShape<128, 64, 128, 2, 2, 4, 2> {};   // 161 KB  160

namespace sm80bwd {

// Byte offset of 16-byte chunk c of row r in an R-row tile of C columns (the layout above).
template <int R, int C>
__device__ __forceinline__ u32 chunk_off(int r, int c) {
    constexpr int kFull = C / 64;
    if (c < kFull * 8) return (u32)((c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
    return (u32)(kFull * R * 128 + r * 64 + (((c & 3) ^ ((r >> 1) & 3)) << 4));
}

// Lane bases of a warp's interleaved 16-column groups s = w + W k: the lane reads row `row`, chunk
// 2 w + bit (cl) of each group. off64 for the 64-column blocks, off32 for the trailing 32-column block.
template <int R, int C>
__device__ __forceinline__ u32 lane_off64(int row, int cl) {
    return (u32)(row * 128 + ((cl ^ (row & 7)) << 4));
}
template <int R, int C>
__device__ __forceinline__ u32 lane_off32(int row, int cl) {
    return (u32)((C / 64) * R * 128 + row * 64 + ((cl ^ ((row >> 1) & 3)) << 4));
}
// Address of the warp's group k (s = w + W k), rows + 16 j. b64 / b32: tile address (a multiple of 128)
// plus lane_off64 / lane_off32. k and j are compile-time after unrolling: one XOR with a constant.
template <int R, int C, int W>
__device__ __forceinline__ u32 step_addr(u32 b64, u32 b32, int k, int j) {
    constexpr int kFull = C / 64;
    const int c = 2 * W * k;  // chunk of group k relative to the lane's own chunk
    if (c < 8 * kFull) return (b64 ^ (u32)((c & 7) << 4)) + (u32)((c >> 3) * R * 128 + j * 16 * 128);
    return (b32 ^ (u32)(((c - 8 * kFull) & 3) << 4)) + (u32)(j * 16 * 64);
}

}  // namespace sm80bwd
}  // namespace cuflash
