// fwd_sm80.cu: the tensor-core FlashAttention forward for fp16 / bf16 on sm80 and later.
//
// One block computes BM (packed) query rows of one (batch, head group) against a range of key tiles:
//
//   * Q: cp.async into shared memory once; with kQInRegs its ldmatrix fragments are loaded into
//     registers once, otherwise (large head dims, where the O accumulator takes the registers) each
//     k-step re-reads them from shared memory with ldmatrix, as FlashAttention-2 does.
//   * K and V tiles of BN keys stream through a ring of kStages shared-memory slots each, filled with
//     16-byte cp.async (zero fill past seqlen_k and past headdim), K(j) and V(j) in separate commit
//     groups so that S = Q K^T of tile j only waits for K(j) while V(j) is still landing.
//   * S = Q K^T with ldmatrix + mma.sync m16n8k16 (fp32 accumulators), online softmax on the
//     fragments in registers (softmax.cuh), P rounded to 16 bits in registers and used directly as
//     the A operand of O += P V (the C layout of two adjacent n8 tiles is the A layout of one k16
//     step), V read with ldmatrix.trans.
//   * Key tiles are visited from the last to the first: the tiles that need masking (the ragged end
//     of seqlen_k, the causal / window diagonal) come first; tiles entirely outside every row's window
//     are never visited, and masking code runs only on tiles that straddle a boundary.
//   * Epilogue: O scaled by 1/l, converted, staged through the warp's own rows of the Q tile in shared
//     memory and written with 16-byte stores; LSE = (m + log2 l) ln 2, -inf for rows with no key.
//   * Split-KV (Params::num_splits > 1): blockIdx.x also selects a slice of the block's key tiles;
//     the block writes fp32 O (normalised within the slice) and its LSE to o_partial / lse_partial,
//     and combine.cu merges the slices.
//   * Packed GQA (Params::flags & CUFLASH_FLAG_PACK_GQA, pack factor G = flags >> 8 = nheads / nheads_k):
//     the G query heads of one kv head share the block's rows (row r = query r / G, head hy * G + r % G),
//     so each K/V tile is read once per kv head: what decoding (seqlen_q = 1) needs.
//   * Registers: the 4-warp variants sit at up to 255 registers. Values needed only by rare branches
//     (mask, ALiBi) and the epilogue are recomputed there from the special registers (sreg_*), load
//     state is recomputed per tile, block scalars and (kStatsInSmem) the row statistics live in
//     shared memory between tiles: ptxas would otherwise spill. tests/test_sm80_compile.py checks
//     0 spills / 0 stack for every variant on sm_80 and sm_90a.
//   * Dropout (DROPOUT = true, the variants for Params::dropout_p > 0; false compiles it out): the keep
//     bits of the tile's fragments are drawn per tile (Philox, philox.cuh: one call per 8 keys of a
//     row, i.e. per row and n8 tile, made by one lane of the quad and spread by two shuffles per tile;
//     1 or 2 registers of bits), before S = Q K^T or after the softmax (kDropLate: whichever ptxas
//     keeps spill-free). The softmax statistics stay those of the undropped P (l sums it, the LSE is
//     the undropped one); dropped entries are zeroed in the 16-bit P operand of O += P V, and
//     1 / (1 - p) joins 1 / l in the epilogue (split-KV partials too: the combine is linear in them).
//     Packed GQA rows draw with their true (query, head).
#include "mask.cuh"
#include "mma.cuh"
#include "philox.cuh"
#include "softmax.cuh"
#include "traits_sm80.cuh"

#define CUFLASH_FLAG_PACK_GQA 1

namespace cuflash {
namespace sm80 {

// Per-thread column plan of a tile copy: thread t copies chunk t % 8 of every 64-column block (and,
// when D % 64 == 32, chunk t % 4 of the trailing 32-column block). bytes[x] is how many real bytes
// that chunk has (16, a partial count for the chunk straddling headdim, or 0 past it: zero fill), and
// off[x] its element offset in the row (0 when bytes is 0, so that the unread source address stays
// inside the row). Cheap (a few integer ops), recomputed per general-path tile copy rather than held in
// registers across the loop.
template <class Tr>
struct ColPlan {
    static constexpr int kN = Tr::kFull + (Tr::kHasHalf ? 1 : 0);
    int bytes[kN];
    int off[kN];
    __device__ __forceinline__ ColPlan(int headdim, int tid) {
#pragma unroll
        for (int x = 0; x < kN; ++x) {
            const int col = x < Tr::kFull ? x * 64 + (tid & 7) * 8 : Tr::kFull * 64 + (tid & 3) * 8;
            bytes[x] = 2 * min(max(headdim - col, 0), 8);
            off[x] = bytes[x] > 0 ? col : 0;
        }
    }
};

// cp.async one tile of R rows into shared memory at `sdst` (layout of traits_sm80.cuh).
// Rows: rowptr(rr, dr, half) is the global address of row rr of the tile, or null for a row out of
// range (zero-filled; its unread source address is `safe`, any readable row); dr = rr - (first row
// of this thread in this role) is a compile-time constant after unrolling, half tells the role
// (false: 64-column blocks, first row t / 8; true: trailing 32-column block, first row t / 4). Columns at or past headdim
// are zero-filled and a chunk straddling headdim copies only its real bytes: no byte past a row's
// headdim elements is ever read.
//
// Thread t copies chunk t % 8 of each 64-column block of rows t / 8 + pass * (threads / 8): 8 lanes
// cover one 128-byte row segment (coalesced), and the swizzle term (r % 8) is the same in every
// pass. The trailing 32-column block uses chunk t % 4 of rows t / 4 + pass * (threads / 4).
template <class Tr, int R, typename T, class RowPtr>
__device__ __forceinline__ void load_tile(u32 sdst, const RowPtr& rowptr, const T* safe, const ColPlan<Tr>& cp,
                                          int tid) {
    if constexpr (Tr::kFull > 0) {
        constexpr int RP = Tr::kThreads / 8;
        const int c = tid & 7;
#pragma unroll
        for (int pass = 0; pass < (R + RP - 1) / RP; ++pass) {
            const int rr = (tid >> 3) + pass * RP;
            if (R % RP == 0 || rr < R) {
                const T* rp = rowptr(rr, pass * RP, false);
                const bool ok = rp != nullptr;
                const T* src = ok ? rp : safe;
#pragma unroll
                for (int blk = 0; blk < Tr::kFull; ++blk)
                    cp_async_16(sdst + (u32)(blk * R * 128 + rr * 128 + ((c ^ (rr & 7)) << 4)), src + cp.off[blk],
                                ok ? cp.bytes[blk] : 0);
            }
        }
    }
    if constexpr (Tr::kHasHalf) {
        constexpr int RP = Tr::kThreads / 4;
        const int c = tid & 3;
#pragma unroll
        for (int pass = 0; pass < (R + RP - 1) / RP; ++pass) {
            const int rr = (tid >> 2) + pass * RP;
            if (R % RP == 0 || rr < R) {
                const T* rp = rowptr(rr, pass * RP, true);
                const bool ok = rp != nullptr;
                const T* src = ok ? rp : safe;
                cp_async_16(sdst + (u32)(Tr::kFull * R * 128 + rr * 64 + ((c ^ ((rr >> 1) & 3)) << 4)),
                            src + cp.off[Tr::kFull], ok ? cp.bytes[Tr::kFull] : 0);
            }
        }
    }
}

// The common case of load_tile: every row of the tile in range and headdim == D. Plain 16-byte
// cp.async (no zero-fill size to encode); row pointers step by a fixed stride per pass.
template <class Tr, int R, typename T>
__device__ __forceinline__ void load_tile_full(u32 sdst, const T* rp8, const T* rp4, i64 rstride, int tid) {
    if constexpr (Tr::kFull > 0) {
        constexpr int RP = Tr::kThreads / 8;
        static_assert(R % RP == 0, "full-tile copies cover whole passes");
        const int c = tid & 7;
#pragma unroll
        for (int pass = 0; pass < R / RP; ++pass) {
            const int rr = (tid >> 3) + pass * RP;
            const T* src = rp8 + (i64)(pass * RP) * rstride + c * 8;
#pragma unroll
            for (int blk = 0; blk < Tr::kFull; ++blk)
                cp_async_16_full(sdst + (u32)(blk * R * 128 + rr * 128 + ((c ^ (rr & 7)) << 4)), src + blk * 64);
        }
    }
    if constexpr (Tr::kHasHalf) {
        constexpr int RP = Tr::kThreads / 4;
        const int c = tid & 3;
#pragma unroll
        for (int pass = 0; pass < (R + RP - 1) / RP; ++pass) {
            const int rr = (tid >> 2) + pass * RP;
            if (R % RP == 0 || rr < R)
                cp_async_16_full(sdst + (u32)(Tr::kFull * R * 128 + rr * 64 + ((c ^ ((rr >> 1) & 3)) << 4)),
                                 rp4 + (i64)(pass * RP) * rstride + Tr::kFull * 64 + c * 8);
        }
    }
}

// Where a block sits: its packed query rows [m0, m0 + BM) (of M = seqlen_q * pack), its key-range
// slice, its head group hy and batch b. The pack factor comes from the host in Params::flags
// (bit 0 set: packed, pack = flags >> 8), so no division by a run-time value is needed here.
struct BlockPos {
    int pack, M, m_blocks, split, m0, hy, b, hk;
};
template <int BM>
__device__ __forceinline__ BlockPos block_pos(const Params& p, int3 c) {
    BlockPos bp;
    bp.pack = (p.flags & CUFLASH_FLAG_PACK_GQA) ? (p.flags >> 8) : 1;
    bp.M = p.seqlen_q * bp.pack;
    bp.m_blocks = (bp.M + BM - 1) / BM;
    bp.split = p.num_splits > 1 ? c.x / bp.m_blocks : 0;
    bp.m0 = (bp.m_blocks - 1 - (c.x - bp.split * bp.m_blocks)) * BM;  // late (heaviest causal) rows first
    bp.hy = c.y;
    bp.b = c.z;
    // kv head: hy itself when packed or without GQA; a division only for unpacked GQA.
    bp.hk = (bp.pack > 1 || p.nheads == p.nheads_k) ? c.y : c.y / (p.nheads / p.nheads_k);
    return bp;
}
// Packed row r -> query index and head.
__device__ __forceinline__ int query_of(const BlockPos& bp, int r) { return bp.pack == 1 ? r : r / bp.pack; }
__device__ __forceinline__ int head_of(const BlockPos& bp, int r) {
    return bp.pack == 1 ? bp.hy : bp.hy * bp.pack + r % bp.pack;
}

__device__ __forceinline__ u32 pick4(u32 a, u32 b, u32 c, u32 d, int i) {
    return i == 0 ? a : i == 1 ? b : i == 2 ? c : d;
}

}  // namespace sm80

template <typename T, int D, int BM, int BN, int WARPS, int STAGES, bool QREGS, bool DROPOUT = false>
__global__ void __launch_bounds__(WARPS * 32)
fwd_sm80(const Params p) {
    using namespace sm80;
    using Tr = Sm80FwdTraits<D, BM, BN, WARPS, STAGES, QREGS>;
    constexpr int kMT = Tr::kMT, kNT = Tr::kNT, kKS = Tr::kKS, kDT = Tr::kDT, kKS2 = Tr::kKS2;
    // Dropout: the keep bits (DropoutFrag, philox.cuh: one register when the thread has at most 16
    // (row, n8 tile) items) are drawn before S = Q K^T (then held through it) for the 32 x 64 score tiles
    // per warp, after the softmax (the score tile held through the draws) for the smaller ones: the
    // placements for which ptxas does not spill.
    constexpr bool kDropLate = kMT * kNT <= 8;
    extern __shared__ __align__(1024) unsigned char smem[];

    require_dynamic_smem(Tr::kSmemBytes, smem_addr(smem), 128);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;  // mma fragment row group and column pair

    // ---- which rows, which head, which keys ------------------------------------------------------
    const BlockPos bp = block_pos<BM>(p, make_int3(blockIdx.x, blockIdx.y, blockIdx.z));
    const int pack = bp.pack, M = bp.M, split = bp.split, m0 = bp.m0, b = bp.b;
    const int sq = p.seqlen_q, sk = p.seqlen_k;
    const int shift = sk - sq;  // query i sits at key position i + shift (bottom-right alignment)
    const int wl = p.window_left, wr = p.window_right;

    auto query_of = [&](int r) { return sm80::query_of(bp, r); };
    auto head_of = [&](int r) { return sm80::head_of(bp, r); };

    // Key tiles any row of the block keeps: first_key and last_key are non-decreasing in the query.
    const int i_first = query_of(m0);
    const int i_last = query_of(min(m0 + BM, M) - 1);
    const int key_lo = wl < 0 ? 0 : max(0, i_first + shift - wl);
    const int key_hi = wr < 0 ? sk - 1 : min(sk - 1, i_last + shift + wr);  // inclusive
    int nb_lo = key_lo / BN;
    int nb_hi = key_hi < key_lo ? nb_lo : key_hi / BN + 1;
    if (p.num_splits > 1) {  // this block's slice of the tiles (possibly empty)
        const int per = (nb_hi - nb_lo + p.num_splits - 1) / p.num_splits;
        const int lo = nb_lo + split * per;
        nb_hi = min(nb_hi, lo + per);
        nb_lo = lo;
    }
    const int n_iter = max(0, nb_hi - nb_lo);  // tiles visited: nb_hi - 1 down to nb_lo

    // Which visits need masking. Tile n (keys [n BN, n BN + BN)) needs the right-hand mask (seqlen_k,
    // causal / window right edge) iff n BN + BN - 1 > right_lim, the smallest last_key of the block's
    // rows; the left-hand mask (window left edge) iff n BN < left_lim, the largest first_key. Tiles
    // are visited in descending n, so these are the first `front` and the last `tail` visits: visit
    // `it` needs masking iff it < front or it >= n_iter - tail. The two thresholds are block-uniform
    // and only compared once per tile; they live in shared memory (after the K/V ring) rather than
    // in two registers for the whole loop.
    const u32 sMeta = smem_addr(smem) + (u32)(Tr::kSmemBytes - Tr::kMetaBytes);
    // Row statistics slot of this thread (kStatsInSmem): value v at sStats + v * 4 * kThreads.
    const u32 sStats = smem_addr(smem) + (u32)(Tr::kQBytes + 2 * STAGES * Tr::kKVBytes + 4 * tid);
    {
        const int right_lim = wr < 0 ? sk - 1 : min(sk - 1, i_first + shift + wr);
        const int nr = max(right_lim + 1, 0) / BN;  // tiles n >= nr need the right mask
        const int front = min(max(nb_hi - max(nr, nb_lo), 0), n_iter);
        int tail = 0;
        if (wl >= 0) {
            const int left_lim = i_last + shift - wl;
            const int nl = left_lim > 0 ? (left_lim + BN - 1) / BN : 0;  // tiles n < nl need the left mask
            tail = min(max(min(nl, nb_hi) - nb_lo, 0), n_iter);
        }
        if (tid == 0) {  // visible to all after the first barrier of the loop
            sts_u32(sMeta, (u32)front);
            sts_u32(sMeta + 4, (u32)(n_iter - tail));
        }
    }

    const T* qg = (const T*)p.q + (i64)b * p.q_batch_stride;

    const u32 sQ = smem_addr(smem);
    const u32 sK0 = sQ + Tr::kQBytes;
    const u32 sV0 = sK0 + STAGES * Tr::kKVBytes;

    // ---- prologue: Q, then K(0), V(0), ..., K(STAGES-1) (one commit group each) ----------------------
    load_tile<Tr, BM>(sQ, [&](int rr, int, bool) -> const T* {
        const int r = m0 + rr;
        if (r >= M) return nullptr;
        return qg + (i64)query_of(r) * p.q_row_stride + (i64)head_of(r) * p.q_head_stride;
    }, qg, ColPlan<Tr>(p.headdim, tid), tid);
    cp_async_commit();

    // K / V tile n into slot address sdst. Everything is recomputed from the special registers and
    // Params (uniform values, constant-bank operands) per tile, so that the loop holds no load state
    // in registers: one 64-bit multiply-add per tile and copy role; passes step by a fixed row count.
    auto load_kv = [&](bool is_v, u32 sdst, int n) {
        const BlockPos fb = block_pos<BM>(p, sreg_ctaid());
        const int ft = sreg_tid();
        const T* base = is_v ? (const T*)p.v + (i64)fb.b * p.v_batch_stride + (i64)fb.hk * p.v_head_stride
                             : (const T*)p.k + (i64)fb.b * p.k_batch_stride + (i64)fb.hk * p.k_head_stride;
        const i64 rstride = is_v ? p.v_row_stride : p.k_row_stride;
        const int k0 = n * BN;
        const T* rp8 = base + (i64)(k0 + (ft >> 3)) * rstride;  // rows of the 64-column blocks
        const T* rp4 = base + (i64)(k0 + (ft >> 2)) * rstride;  // rows of the trailing 32-column block
        if (Tr::kFastLoads && k0 + BN <= p.seqlen_k && p.headdim == D) {  // uniform: all but a ragged tile
            load_tile_full<Tr, BN>(sdst, rp8, rp4, rstride, ft);
        } else {
            const int lim8 = p.seqlen_k - k0 - (ft >> 3), lim4 = p.seqlen_k - k0 - (ft >> 2);
            load_tile<Tr, BN>(sdst, [&](int, int dr, bool half) -> const T* {
                return dr < (half ? lim4 : lim8) ? (half ? rp4 : rp8) + (i64)dr * rstride : nullptr;
            }, base, ColPlan<Tr>(p.headdim, ft), ft);
        }
    };
    // Tile j of the visit order (key tile nb_hi - 1 - j) goes to slot j % STAGES. A commit group is
    // made even when there is nothing left to load, so that the wait counts below stay constant.
    auto issue_k = [&](int j) {
        if (j < n_iter) load_kv(false, sK0 + (u32)((j % STAGES) * Tr::kKVBytes), nb_hi - 1 - j);
        cp_async_commit();
    };
    auto issue_v = [&](int j) {
        if (j < n_iter) load_kv(true, sV0 + (u32)((j % STAGES) * Tr::kKVBytes), nb_hi - 1 - j);
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        issue_k(s);
        if (s < STAGES - 1) issue_v(s);
    }
    // Groups are issued strictly in the order Q, K0, V0, K1, V1, ...: when K(it) (or V(it)) is
    // needed, exactly 2 (STAGES - 1) younger groups may still be in flight.
    constexpr int kWait = 2 * (STAGES - 1);

    // ---- per-lane ldmatrix addressing ----------------------------------------------------------------
    const int wrow = warp * Tr::kWarpRows;
    // Q, A operand: matrices (rows 0-7, k lo), (rows 8-15, k lo), (rows 0-7, k hi), (rows 8-15, k hi).
    const int q_row = wrow + (lane & 7) + ((lane >> 3) & 1) * 8, q_bit = lane >> 4;
    const u32 q_lb64 = lane_base64(q_row, q_bit), q_lb32 = lane_base32(q_row, q_bit);
    // K, B operand of S = Q K^T: matrices (keys 0-7, k lo), (keys 0-7, k hi), (keys 8-15, k lo), (8-15, k hi).
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_bit = (lane >> 3) & 1;
    const u32 k_lb64 = lane_base64(k_row, k_bit), k_lb32 = lane_base32(k_row, k_bit);
    // V, B operand of O += P V (transposed): (keys 0-7, d lo), (keys 8-15, d lo), (keys 0-7, d hi), (8-15, d hi).
    const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_bit = lane >> 4;
    const u32 v_lb64 = lane_base64(v_row, v_bit), v_lb32 = lane_base32(v_row, v_bit);

    u32 qf[QREGS ? kMT : 1][QREGS ? kKS : 1][4];
    if constexpr (QREGS) {
        cp_async_wait<2 * STAGES - 1>();  // Q is the oldest group
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int ks = 0; ks < kKS; ++ks)
                ldsm_x4(frag_addr<BM, D>(sQ + q_lb64, sQ + q_lb32, ks, mt), qf[mt][ks][0], qf[mt][ks][1],
                        qf[mt][ks][2], qf[mt][ks][3]);
    }

    // ---- score transform constants ---------------------------------------------------------------
    // Plain path: scores stay raw q.k and mult = scale * log2(e) is folded into the exp2 (FFMA).
    // Transformed path (softcap, ALiBi, or a scale <= 0 for which max(raw) is not max(scaled)): the
    // scores are turned into log2-domain values in place and mult = 1.
    const bool transform = p.softcap > 0.f || p.alibi != nullptr || !(p.scale_log2 > 0.f);
    const float mult = transform ? 1.f : p.scale_log2;

    float acc_o[kMT][kDT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    float row_m[2 * kMT], row_l[2 * kMT];
#pragma unroll
    for (int ri = 0; ri < 2 * kMT; ++ri) {
        row_m[ri] = -INFINITY;
        row_l[ri] = 0.f;
    }
    // With kStatsInSmem the statistics are kept in shared memory between tiles (each thread its own
    // slots: no barrier needed) and only loaded around the softmax.
    auto stats_store = [&]() {
        if constexpr (Tr::kStatsInSmem) {
#pragma unroll
            for (int ri = 0; ri < 2 * kMT; ++ri) {
                sts_u32(sStats + (u32)(ri * 4 * Tr::kThreads), __float_as_uint(row_m[ri]));
                sts_u32(sStats + (u32)((2 * kMT + ri) * 4 * Tr::kThreads), __float_as_uint(row_l[ri]));
            }
        }
    };
    auto stats_load = [&]() {
        if constexpr (Tr::kStatsInSmem) {
#pragma unroll
            for (int ri = 0; ri < 2 * kMT; ++ri) {
                row_m[ri] = __uint_as_float(lds_u32(sStats + (u32)(ri * 4 * Tr::kThreads)));
                row_l[ri] = __uint_as_float(lds_u32(sStats + (u32)((2 * kMT + ri) * 4 * Tr::kThreads)));
            }
        }
    };
    stats_store();

    // ---- main loop over key tiles, last to first --------------------------------------------------
    for (int it = 0; it < n_iter; ++it) {
        const int n = nb_hi - 1 - it;
        const int k0 = n * BN;
        const u32 slot = (u32)((it % STAGES) * Tr::kKVBytes);
        const u32 sK = sK0 + slot, sV = sV0 + slot;

        // Dropout keep bits of this tile: drawn here, before the score tile takes its registers (K(it)
        // may still be landing), or with kDropLate after the softmax (where ptxas spills otherwise).
        DropoutFrag<2 * kMT, kNT> keep;  // row ri = 2 mt + half, n8 tile nt
        auto draw_keep = [&]() {
            const BlockPos fb = block_pos<BM>(p, sreg_ctaid());  // recomputed: see sreg_tid
            const int ft = sreg_tid();
            const int frow0 = fb.m0 + (ft >> 5) * Tr::kWarpRows + ((ft & 31) >> 2);
            dropout_frag_keep(p, fb.b, k0, ft & 31, [&](int ri, int& i, int& h) {
                const int r = frow0 + (ri >> 1) * 16 + (ri & 1) * 8;  // ri = 2 mt + half
                i = sm80::query_of(fb, r);
                h = sm80::head_of(fb, r);
            }, keep);
        };
        if constexpr (DROPOUT && !kDropLate) draw_keep();

        cp_async_wait<kWait>();  // K(it) has landed (and Q with it)
        __syncthreads();         // ... for every thread; and every warp is done with V(it - 1)
        issue_v(it + STAGES - 1);  // into the slot V(it - 1) used

        // S = Q K^T
        float s[kMT][kNT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
        // Fragment base addresses, opaque so that their XOR variants are formed here, per tile,
        // rather than hoisted and held across the whole loop.
        const u32 qb64 = opaque(sQ + q_lb64), qb32 = opaque(sQ + q_lb32);
        const u32 kb64 = opaque(sK + k_lb64), kb32 = opaque(sK + k_lb32);
#pragma unroll
        for (int ks = 0; ks < kKS; ++ks) {
            u32 a[kMT][4];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
                if constexpr (QREGS) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][ks][e];
                } else {
                    ldsm_x4(frag_addr<BM, D>(qb64, qb32, ks, mt), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
                }
            }
#pragma unroll
            for (int np = 0; np < kNT / 2; ++np) {
                u32 b0, b1, b2, b3;
                ldsm_x4(frag_addr<BN, D>(kb64, kb32, ks, np), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    Mma<T>::run(s[mt][2 * np], a[mt], b0, b1);
                    Mma<T>::run(s[mt][2 * np + 1], a[mt], b2, b3);
                }
            }
        }

        // Softcap / scale / ALiBi (rare features: uniform branches, straight-line code inside).
        if (transform) {
            if (p.softcap > 0.f) {
                const float cap_in = p.scale / p.softcap, cap_out = p.softcap * CUFLASH_LOG2E;
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) s[mt][nt][e] = cap_out * tanh_abs_accurate(s[mt][nt][e] * cap_in);
            } else {
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) s[mt][nt][e] *= p.scale_log2;
            }
            if (p.alibi != nullptr) {
                const BlockPos fb = block_pos<BM>(p, sreg_ctaid());  // recomputed: see sreg_tid
                const int ft = sreg_tid();
                const int frow0 = fb.m0 + (ft >> 5) * Tr::kWarpRows + ((ft & 31) >> 2);
                const int fcol0 = k0 + 2 * (ft & 3);
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = frow0 + mt * 16 + h * 8;
                        // |i + shift - j| = |rel - column offset|
                        const int rel = sm80::query_of(fb, r) + p.seqlen_k - p.seqlen_q - fcol0;
                        const float slope2 =
                            p.alibi[(i64)fb.b * p.alibi_batch_stride + sm80::head_of(fb, r)] * CUFLASH_LOG2E;
#pragma unroll
                        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                            for (int e = 0; e < 2; ++e)
                                s[mt][nt][2 * h + e] = fmaf(-slope2, fabsf((float)(rel - (nt * 8 + e))),
                                                            s[mt][nt][2 * h + e]);
                    }
            }
        }

        // Mask: only tiles crossing seqlen_k or a window / causal edge of some row of the block.
        const bool need_mask = it < (int)lds_u32(sMeta) || it >= (int)lds_u32(sMeta + 4);
        if (need_mask) {
            const BlockPos fb = block_pos<BM>(p, sreg_ctaid());  // recomputed: see sreg_tid
            const int ft = sreg_tid();
            const int frow0 = fb.m0 + (ft >> 5) * Tr::kWarpRows + ((ft & 31) >> 2);
            const int fcol0 = k0 + 2 * (ft & 3);
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = frow0 + mt * 16 + h * 8;
                    const int ipos = sm80::query_of(fb, r) + p.seqlen_k - p.seqlen_q;
                    const int lo = (p.window_left < 0 ? 0 : ipos - p.window_left) - fcol0;  // kept: lo <= c <= hi
                    const int hi = (p.window_right < 0 ? p.seqlen_k - 1 : min(p.seqlen_k - 1, ipos + p.window_right)) - fcol0;
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int c = nt * 8 + e;
                            if (c < lo || c > hi) s[mt][nt][2 * h + e] = -INFINITY;
                        }
                }
        }

        stats_load();
        softmax_rescale<kMT, kNT, kDT, Tr::kSkipRescale>(s, acc_o, row_m, row_l, mult);
        stats_store();
        // s now holds the unnormalised probabilities of this tile (row_l has their undropped sum).
        if constexpr (DROPOUT && kDropLate) draw_keep();

        cp_async_wait<kWait>();  // V(it) has landed
        __syncthreads();         // ... for every thread; and every warp is done with K(it)
        issue_k(it + STAGES);    // into the slot K(it) used

        // O += P V, P straight from the score registers.
        const u32 vb64 = opaque(sV + v_lb64), vb32 = opaque(sV + v_lb32);
#pragma unroll
        for (int kk = 0; kk < kKS2; ++kk) {
            u32 a[kMT][4];
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt) {
                a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                if constexpr (DROPOUT) {  // rows 2 mt + half, n8 tiles 2 kk, 2 kk + 1
                    a[mt][0] &= keep.mask16(2 * mt, 2 * kk);
                    a[mt][1] &= keep.mask16(2 * mt + 1, 2 * kk);
                    a[mt][2] &= keep.mask16(2 * mt, 2 * kk + 1);
                    a[mt][3] &= keep.mask16(2 * mt + 1, 2 * kk + 1);
                }
            }
#pragma unroll
            for (int dp = 0; dp < kDT / 2; ++dp) {
                u32 b0, b1, b2, b3;
                ldsm_x4_trans(frag_addr<BN, D>(vb64, vb32, dp, kk), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt) {
                    Mma<T>::run(acc_o[mt][2 * dp], a[mt], b0, b1);
                    Mma<T>::run(acc_o[mt][2 * dp + 1], a[mt], b2, b3);
                }
            }
        }
    }

    // ---- epilogue ------------------------------------------------------------------------------------
    stats_load();
    softmax_finish<kMT>(row_l);
    cp_async_wait<0>();  // nothing may still be landing in the Q tile (n_iter == 0 leaves Q in flight)
    __syncthreads();

    float inv_l[2 * kMT], lse2[2 * kMT];  // 1/l (0 for an empty row) and the log2-domain LSE
#pragma unroll
    for (int ri = 0; ri < 2 * kMT; ++ri) {
        const bool any = row_l[ri] > 0.f;
        inv_l[ri] = any ? (DROPOUT ? p.dropout_scale : 1.f) / row_l[ri] : 0.f;  // 1 / (1 - p): dropout
        lse2[ri] = any ? row_m[ri] * mult + log2f(row_l[ri]) : -INFINITY;
    }

    // Positions recomputed from the special registers (nothing held across the loop for this).
    const BlockPos fb = block_pos<BM>(p, sreg_ctaid());
    const int ft = sreg_tid();
    const int flane = ft & 31, fwrow = (ft >> 5) * Tr::kWarpRows, fg = flane >> 2, ftq = flane & 3;
    const u32 fsQ = smem_addr(smem);

    if (p.num_splits <= 1) {
        // Stage O (16-bit) in this warp's own rows of the Q tile: no other warp reads them.
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = fwrow + mt * 16 + h * 8 + fg;
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt) {
                    const float il = inv_l[2 * mt + h];
                    sts_u32(fsQ + tile_off<BM, D>(row, dt) + 4 * ftq,
                            pack2<T>(acc_o[mt][dt][2 * h] * il, acc_o[mt][dt][2 * h + 1] * il));
                }
            }
        __syncwarp();
        T* og = (T*)p.o + (i64)fb.b * p.o_batch_stride;
        for (int e = flane; e < Tr::kWarpRows * Tr::kChunks; e += 32) {
            const int rr = e / Tr::kChunks, c = e % Tr::kChunks;
            const int r = fb.m0 + fwrow + rr;
            const int col = c * 8;
            if (r < fb.M && col < p.headdim) {
                u32 w0, w1, w2, w3;
                lds_u32x4(fsQ + tile_off<BM, D>(fwrow + rr, c), w0, w1, w2, w3);
                T* dst = og + (i64)sm80::query_of(fb, r) * p.o_row_stride
                       + (i64)sm80::head_of(fb, r) * p.o_head_stride + col;
                if (col + 8 <= p.headdim) {
                    stg_u32x4(dst, w0, w1, w2, w3);
                } else {  // the chunk straddling headdim: element by element, never past the row
                    for (int x = 0; x < p.headdim - col; ++x)
                        dst[x].bits = (unsigned short)(pick4(w0, w1, w2, w3, x >> 1) >> (16 * (x & 1)));
                }
            }
        }
        if (ftq == 0 && p.lse != nullptr) {
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = fb.m0 + fwrow + mt * 16 + h * 8 + fg;
                    if (r < fb.M)
                        p.lse[((i64)fb.b * p.nheads + sm80::head_of(fb, r)) * p.seqlen_q + sm80::query_of(fb, r)] =
                            lse2[2 * mt + h] * CUFLASH_LN2;
                }
        }
    } else {
        // Split-KV: fp32 O of this slice, normalised by the slice's own l, and the slice's LSE.
        // o_partial is (num_splits, batch, nheads, seqlen_q, ldo) with ldo = headdim rounded up to 8.
        const int ldo = (p.headdim + 7) & ~7;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = fb.m0 + fwrow + mt * 16 + h * 8 + fg;
                if (r >= fb.M) continue;
                const i64 prow = (((i64)fb.split * p.batch + fb.b) * p.nheads + sm80::head_of(fb, r)) * p.seqlen_q
                               + sm80::query_of(fb, r);
                float* dst = p.o_partial + prow * ldo;
                const float il = inv_l[2 * mt + h];
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt) {
                    const int col = dt * 8 + 2 * ftq;
                    if (col < p.headdim)
                        *(float2*)(dst + col) = make_float2(acc_o[mt][dt][2 * h] * il, acc_o[mt][dt][2 * h + 1] * il);
                }
                if (ftq == 0) p.lse_partial[prow] = lse2[2 * mt + h] * CUFLASH_LN2;
            }
    }
}

}  // namespace cuflash
