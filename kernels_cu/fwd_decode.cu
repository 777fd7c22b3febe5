// fwd_decode.cu: the tensor-core forward for few query rows per kv head (decoding), fp16 / bf16, sm80+.
//
// Decoding attends seqlen_q x group <= 16 query rows of one kv head (seqlen_q = 1 with a GQA group of up
// to 16, or up to 16 queries without GQA) to a long key range. The sm80 forward's 128-row tiles would
// leave most of every mma.sync empty, so that compute, not memory, bounds it there; this kernel keeps
// the 16 rows of one m16 tile and spreads the keys over the warps instead:
//
//   * Block = (key slice, kv head and 16-row block, batch). Its kRows = 16 packed rows are
//     row r = query r / group, head hk * group + r % group (rows past seqlen_q x group are zero and
//     never written). Q is copied once with cp.async (zero fill) and, with kQInRegs, held as ldmatrix
//     fragments in registers.
//   * Keys stream through a ring of kStages tiles of kBN = WARPS x WKEYS keys (K tile then V tile,
//     16-byte cp.async, zero fill past seqlen_k and past headdim, one commit group per tile, kStages - 1
//     tiles loading ahead): the bytes in flight that a memory-bound kernel needs (Little's law: about
//     3 TB/s x 1 us over 132 SMs on the H100). One __syncthreads per tile recycles the ring slot.
//   * Warp w owns keys [w WKEYS, (w + 1) WKEYS) of every tile and keeps its own online softmax state
//     (softmax.cuh) over them: S = Q K^T and O += P V with ldmatrix + mma.sync m16n8k16, fp32
//     accumulators, P rounded to 16 bits in registers as the A operand (as in fwd_sm80.cu). Masks
//     (seqlen_k, causal / window, bottom-right aligned) only run on a warp's sub-tile that crosses an
//     edge of some row's key range; softcap / ALiBi / a scale <= 0 transform the scores in place.
//   * Epilogue: the warps' (m, l, O) are merged through shared memory (the ring, no longer needed):
//     m = max_w m_w, l = sum_w l_w 2^(m_w - m), O = sum_w O_w 2^(m_w - m) / l. With one key slice the
//     block writes O in the output dtype (16-byte stores) and the LSE; with Params::num_splits > 1 it
//     writes fp32 O (normalised within its slice) and the slice's LSE to o_partial / lse_partial, in the
//     layout combine.cu merges (fwd_combine, launched after this kernel).
//   * Cluster variant (fwd_decode_cluster, sm_90+): the CLUSTER key slices of one (batch, kv head, row
//     block) run as one thread-block cluster; each leaves its normalised O and LSE in its own shared
//     memory and the cluster merges them through distributed shared memory (decode::cluster_merge),
//     writing O and the LSE directly: no o_partial round trip, no fwd_combine, no second launch.
//   * Key slices: the block's key tiles (those some row of the block keeps under the window) are cut
//     into num_splits contiguous slices of equal tile counts; blockIdx.x picks one (possibly empty:
//     then O = 0 and LSE = -inf, which the combine skips). A row that keeps no key gets O = 0 and
//     LSE = -inf: the running max stays -inf, and neither the softmax nor the merge forms inf - inf.
//   * No dropout (the dispatcher routes dropout to the sm80 path).
//   * Registers: O takes D / 2 per thread, and ptxas fills the rest with ldmatrix fragments issued ahead
//     (d 256: 255 registers). Values needed only by rare branches (mask, ALiBi), the tile loads and the
//     epilogue are recomputed there from Params and the special registers (sreg_*, block_pos)
//     rather than held across the loop, as in fwd_sm80.cu. tests/test_decode_compile.py checks 0 spills
//     and 0 stack for every variant on sm_80 and sm_90a.
#include "mask.cuh"
#include "mma.cuh"
#include "softmax.cuh"
#include "traits_decode.cuh"

namespace cuflash {
namespace decode {

__device__ __forceinline__ void sts_f32x2(u32 addr, float a, float b) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" :: "r"(addr), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void sts_f32x4(u32 addr, float4 v) {
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(addr), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
__device__ __forceinline__ float4 lds_f32x4(u32 addr) {
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void stg_f32x4(float* ptr, float4 v) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n"
                 :: "l"(ptr), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
}
__device__ __forceinline__ u32 pick4(u32 a, u32 b, u32 c, u32 d, int i) {
    return i == 0 ? a : i == 1 ? b : i == 2 ? c : d;
}

// ---- thread-block clusters (sm_90+; only the cluster variants use these) ---------------------------
__device__ __forceinline__ void cluster_sync() {  // every thread of every block of the cluster
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// The shared::cluster address of `addr` (this block's shared window) in the block of rank `rank`.
__device__ __forceinline__ u32 map_rank(u32 addr, u32 rank) {
    u32 a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(addr), "r"(rank));
    return a;
}
__device__ __forceinline__ float ldc_f32(u32 addr) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ float4 ldc_f32x4(u32 addr) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
    return v;
}

// Per-thread column plan of a tile copy: thread t copies 16-byte chunk t % 8 of every 64-column block.
// bytes[x] is how many real bytes that chunk has (16, fewer for the chunk straddling headdim, 0 past
// it: zero fill) and off[x] its element offset in the row (0 when bytes is 0, so that the unread
// source address stays inside the row).
template <int kFull>
struct ColPlan {
    int bytes[kFull];
    int off[kFull];
    __device__ __forceinline__ ColPlan(int headdim, int tid) {
#pragma unroll
        for (int x = 0; x < kFull; ++x) {
            const int col = x * 64 + (tid & 7) * 8;
            bytes[x] = 2 * min(max(headdim - col, 0), 8);
            off[x] = bytes[x] > 0 ? col : 0;
        }
    }
};

// cp.async of one R-row tile into the swizzled layout of traits_sm80.cuh at sdst. Thread t copies
// chunk t % 8 of each 64-column block of rows t / 8 + pass * (threads / 8) (8 lanes: one 128-byte row
// segment, coalesced; the swizzle term r % 8 is the same in every pass). rowptr(rr) is the global
// address of row rr, or null for a row out of range (zero-filled; its unread source address is `safe`).
template <int R, int D, int THREADS, typename T, class RowPtr>
__device__ __forceinline__ void load_rows(u32 sdst, const RowPtr& rowptr, const T* safe, const ColPlan<D / 64>& cp,
                                          int tid) {
    constexpr int RP = THREADS / 8;
    const int c = tid & 7;
#pragma unroll
    for (int pass = 0; pass < (R + RP - 1) / RP; ++pass) {
        const int rr = (tid >> 3) + pass * RP;
        if (R % RP == 0 || rr < R) {
            const T* rp = rowptr(rr);
            const bool ok = rp != nullptr;
            const T* src = ok ? rp : safe;
#pragma unroll
            for (int blk = 0; blk < D / 64; ++blk)
                sm80::cp_async_16(sdst + (u32)(blk * R * 128 + rr * 128 + ((c ^ (rr & 7)) << 4)), src + cp.off[blk],
                                  ok ? cp.bytes[blk] : 0);
        }
    }
}

// cp.async of one R-row K or V tile (rows k0 .. k0 + R - 1 of a head whose row r is at base + r rstride)
// in the same layout and thread roles as load_rows; rows at or past `nvalid` (= seqlen_k - k0) are
// zero-filled. A thread's row pointers step by a fixed stride per pass (no per-row multiply).
template <int R, int D, int THREADS, typename T>
__device__ __forceinline__ void load_kv(u32 sdst, const T* base, i64 rstride, int k0, int nvalid,
                                        const ColPlan<D / 64>& cp, int tid) {
    constexpr int RP = THREADS / 8;
    static_assert(R % RP == 0, "K/V tiles cover whole passes");
    const int c = tid & 7, r0 = tid >> 3;
    const T* rp = base + (i64)(k0 + r0) * rstride;
#pragma unroll
    for (int pass = 0; pass < R / RP; ++pass) {
        const int rr = r0 + pass * RP;
        const bool ok = rr < nvalid;
        const T* src = ok ? rp + (i64)(pass * RP) * rstride : base;
#pragma unroll
        for (int blk = 0; blk < D / 64; ++blk)
            sm80::cp_async_16(sdst + (u32)(blk * R * 128 + rr * 128 + ((c ^ (rr & 7)) << 4)), src + cp.off[blk],
                              ok ? cp.bytes[blk] : 0);
    }
}

// Where a block sits: kv head hk, its packed rows [m0, m0 + 16) of M = seqlen_q x group (row r: query
// r / group, head hk x group + r % group), batch b; key slice c.x. From Params and the block index only.
struct Pos {
    int group, M, hk, m0, b;
};
__device__ __forceinline__ Pos block_pos(const Params& p, int3 c) {
    Pos s;
    s.group = p.nheads / p.nheads_k;
    s.M = p.seqlen_q * s.group;
    const int m_blocks = (s.M + 15) / 16;
    s.hk = c.y / m_blocks;
    s.m0 = (c.y - s.hk * m_blocks) * 16;
    s.b = c.z;
    return s;
}

// The split-KV merge inside a cluster of CL blocks, the CL key slices of one (batch, kv head, row
// block) (cluster rank = slice = blockIdx.x). Each block has left its slice's output, normalised by
// the slice's own sum (kRows x D floats at `cbuf`), and its per-row log2-domain LSEs (kRows floats
// after them) in its shared memory. After a cluster barrier, block `rank` merges its share of the
// tile's (row, 4-column) quads, reading every slice's values through distributed shared memory:
//   m = max_s lse_s, w_s = 2^(lse_s - m), o = sum_s w_s o_s / sum_s w_s, lse = m + log2(sum_s w_s)
// and writes O in the output dtype (8-byte stores) and the LSE (natural log). A second barrier keeps
// every block's shared memory alive until the whole cluster has read it. Slices that saw no key of a
// row have lse_s = -inf and o_s = 0 (weight 0); a row no slice saw gets O = 0 and LSE = -inf.
template <typename T, int D, int ROWS, int THREADS, int CL>
__device__ __forceinline__ void cluster_merge(const Params& p, const Pos& f, int ft, u32 cbuf) {
    using namespace sm80;
    constexpr int kQuads = ROWS * D / 4, kPer = (kQuads + CL - 1) / CL;
    constexpr u32 kLse = (u32)(ROWS * D * 4);
    cluster_sync();
    const int rank = (int)cluster_rank();
    const int e_end = min((rank + 1) * kPer, kQuads);
    for (int e = rank * kPer + ft; e < e_end; e += THREADS) {
        const int row = e / (D / 4), col = (e % (D / 4)) * 4;
        const int r = f.m0 + row;
        if (r >= f.M || col >= p.headdim) continue;
        float l2[CL], mx = -INFINITY;
#pragma unroll
        for (int s = 0; s < CL; ++s) {
            l2[s] = ldc_f32(map_rank(cbuf + kLse + (u32)(row * 4), (u32)s));
            mx = fmaxf(mx, l2[s]);
        }
        float sum = 0.f, o0 = 0.f, o1 = 0.f, o2 = 0.f, o3 = 0.f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int s = 0; s < CL; ++s) {
                const float w = ex2(l2[s] - mx);  // 0 for a slice with lse -inf
                const float4 v = ldc_f32x4(map_rank(cbuf + (u32)((row * D + col) * 4), (u32)s));
                sum += w;
                o0 = fmaf(w, v.x, o0);
                o1 = fmaf(w, v.y, o1);
                o2 = fmaf(w, v.z, o2);
                o3 = fmaf(w, v.w, o3);
            }
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int qi = r / f.group, head = f.hk * f.group + (r - qi * f.group);
        T* dst = (T*)p.o + (i64)f.b * p.o_batch_stride + (i64)qi * p.o_row_stride + (i64)head * p.o_head_stride + col;
        const u32 w0 = pack2<T>(o0 * inv, o1 * inv), w1 = pack2<T>(o2 * inv, o3 * inv);
        if (col + 4 <= p.headdim) {
            asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" :: "l"(dst), "r"(w0), "r"(w1) : "memory");
        } else {  // the quad straddling headdim: element by element, never past the row
            for (int x = 0; x < p.headdim - col; ++x)
                dst[x].bits = (unsigned short)((x < 2 ? w0 : w1) >> (16 * (x & 1)));
        }
        if (col == 0 && p.lse != nullptr)
            p.lse[((i64)f.b * p.nheads + head) * p.seqlen_q + qi] = sum > 0.f ? (mx + log2f(sum)) * CUFLASH_LN2 : -INFINITY;
    }
    cluster_sync();
}

}  // namespace decode

// The kernel body; CLUSTER > 1: the cluster variant (fwd_decode_cluster), whose CLUSTER key slices merge
// in the kernel (decode::cluster_merge) instead of through o_partial and fwd_combine.
template <typename T, int D, int WARPS, int WKEYS, int STAGES, bool QREGS, int CLUSTER>
__device__ __forceinline__ void decode_body(const Params& p) {
    using namespace sm80;
    using Tr = DecodeTraits<D, WARPS, WKEYS, STAGES, QREGS>;
    constexpr int kRows = Tr::kRows, kBN = Tr::kBN, kNT = Tr::kNT, kKS = Tr::kKS, kDT = Tr::kDT;
    constexpr int kKS2 = Tr::kKS2, kThreads = Tr::kThreads;
    extern __shared__ __align__(1024) unsigned char smem[];

    require_dynamic_smem(Tr::kSmemBytes, smem_addr(smem), 128);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // ---- which rows, which heads, which keys -------------------------------------------------------
    const decode::Pos pos = decode::block_pos(p, make_int3(blockIdx.x, blockIdx.y, blockIdx.z));
    const int group = pos.group, M = pos.M, hk = pos.hk, m0 = pos.m0, b = pos.b;
    const int sq = p.seqlen_q, sk = p.seqlen_k;
    const int shift = sk - sq;  // query i sits at key position i + shift (bottom-right alignment)
    const int wl = p.window_left, wr = p.window_right;

    // Keys any row of the block keeps: first_key / last_key are non-decreasing in the query.
    const int i_first = m0 / group, i_last = (min(m0 + kRows, M) - 1) / group;
    const int key_lo = wl < 0 ? 0 : max(0, i_first + shift - wl);
    const int key_hi = wr < 0 ? sk - 1 : min(sk - 1, i_last + shift + wr);  // inclusive; < key_lo: none
    int nb_lo = key_lo / kBN;
    int nb_hi = key_hi < key_lo ? nb_lo : key_hi / kBN + 1;
    const int n_slices = CLUSTER > 1 ? CLUSTER : p.num_splits;
    if (n_slices > 1) {  // this block's slice of the tiles (possibly empty)
        const int per = (nb_hi - nb_lo + n_slices - 1) / n_slices;
        const int lo = nb_lo + (int)blockIdx.x * per;
        nb_hi = min(nb_hi, lo + per);
        nb_lo = lo;
    }
    const int n_iter = max(0, nb_hi - nb_lo);  // tiles nb_lo .. nb_hi - 1, in ascending order

    // A warp's sub-tile [kw0, kw0 + WKEYS) needs masking iff it reaches past right_lim (the smallest
    // last kept key over the block's rows: the first row's) or starts before left_lim (the largest
    // first kept key: the last row's).
    const int right_lim = wr < 0 ? sk - 1 : min(sk - 1, i_first + shift + wr);
    const int left_lim = wl < 0 ? 0 : i_last + shift - wl;

    // A fragment row (g + 8 h of the block) -> its query index, clamped to the last real row: padding
    // rows (past M) take that row's mask and slope; their scores are never written out, they only
    // must stay finite. For the rare branches, from the special registers (see sreg_tid).
    auto frag_query = [&](const decode::Pos& f, int ft, int h) {
        return min(f.m0 + ((ft & 31) >> 2) + 8 * h, f.M - 1) / f.group;
    };

    // ---- shared memory ---------------------------------------------------------------------------------
    const u32 sQ = smem_addr(smem);
    const u32 sRing = sQ + Tr::kQBytes;

    // ---- prologue: Q, then tiles 0 .. STAGES - 2 (one commit group each) -------------------------------
    {
        const T* qg = (const T*)p.q + (i64)b * p.q_batch_stride;
        decode::load_rows<kRows, D, kThreads>(sQ, [&](int rr) -> const T* {
            const int r = m0 + rr;
            if (r >= M) return nullptr;
            const int qi = r / group;
            return qg + (i64)qi * p.q_row_stride + (i64)(hk * group + r - qi * group) * p.q_head_stride;
        }, qg, decode::ColPlan<D / 64>(p.headdim, tid), tid);
        cp_async_commit();
    }
    // Tile j of this block (keys (nb_lo + j) kBN ..) into ring slot `slot`; a commit group is made even
    // when there is nothing left to load, so that the wait counts below stay constant. The column plan,
    // the head's base addresses and the row addresses are recomputed per tile from the special
    // registers (a few dozen integer operations) rather than held across the loop (d 256 spilled then).
    auto issue = [&](int j, int slot) {
        if (j < n_iter) {
            const int t = sreg_tid();
            const decode::Pos f = decode::block_pos(p, sreg_ctaid());
            const T* kbase = (const T*)p.k + (i64)f.b * p.k_batch_stride + (i64)f.hk * p.k_head_stride;
            const T* vbase = (const T*)p.v + (i64)f.b * p.v_batch_stride + (i64)f.hk * p.v_head_stride;
            const decode::ColPlan<D / 64> cplan(p.headdim, t);
            const int k0 = (nb_lo + j) * kBN;
            const u32 sK = sRing + (u32)(slot * Tr::kStageBytes);
            decode::load_kv<kBN, D, kThreads>(sK, kbase, p.k_row_stride, k0, sk - k0, cplan, t);
            decode::load_kv<kBN, D, kThreads>(sK + (u32)Tr::kKVBytes, vbase, p.v_row_stride, k0, sk - k0, cplan, t);
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s, s);

    // ---- per-lane ldmatrix addressing (traits_sm80.cuh; D % 64 == 0: no 32-column block) --------------
    // Q, A operand: matrices (rows 0-7, k lo), (rows 8-15, k lo), (rows 0-7, k hi), (rows 8-15, k hi).
    const u32 q_lb = lane_base64((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
    // K, B operand of S = Q K^T, this warp's keys: (keys 0-7, k lo), (0-7, k hi), (8-15, k lo), (8-15, k hi).
    const u32 k_lb = lane_base64(warp * WKEYS + (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
    // V, B operand of O += P V (transposed): (keys 0-7, d lo), (8-15, d lo), (0-7, d hi), (8-15, d hi).
    const u32 v_lb = lane_base64(warp * WKEYS + (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);

    u32 qf[QREGS ? kKS : 1][4];
    if constexpr (QREGS) {
        cp_async_wait<STAGES - 1>();  // Q is the oldest group
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < kKS; ++ks)
            ldsm_x4(frag_addr<kRows, D>(sQ + q_lb, 0, ks, 0), qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3]);
    }

    // ---- score transform constants ---------------------------------------------------------------
    // Plain path: scores stay raw q.k and mult = scale * log2(e) is folded into the exp2 (FFMA).
    // Transformed path (softcap, ALiBi, or a scale <= 0 for which max(raw) is not max(scaled)): the
    // scores are turned into log2-domain values in place and mult = 1.
    const bool transform = p.softcap > 0.f || p.alibi != nullptr || !(p.scale_log2 > 0.f);
    const float mult = transform ? 1.f : p.scale_log2;

    float acc_o[1][kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};

    // ---- main loop over the slice's tiles ---------------------------------------------------------------
    int slot = 0, slot_next = STAGES - 1;
    for (int it = 0; it < n_iter; ++it) {
        cp_async_wait<STAGES - 2>();  // tile it has landed (and Q with it)
        __syncthreads();              // ... for every thread; and every warp is done with tile it - 1
        issue(it + STAGES - 1, slot_next);  // into the slot tile it - 1 used
        slot_next = slot_next + 1 == STAGES ? 0 : slot_next + 1;
        const u32 sK = sRing + (u32)(slot * Tr::kStageBytes), sV = sK + (u32)Tr::kKVBytes;
        slot = slot + 1 == STAGES ? 0 : slot + 1;
        const int kw0 = (nb_lo + it) * kBN + warp * WKEYS;  // this warp's first key

        // S = Q K^T over this warp's keys
        float s[1][kNT][4];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kKS; ++ks) {
            u32 a[4];
            if constexpr (QREGS) {
#pragma unroll
                for (int e = 0; e < 4; ++e) a[e] = qf[ks][e];
            } else {
                ldsm_x4(frag_addr<kRows, D>(sQ + q_lb, 0, ks, 0), a[0], a[1], a[2], a[3]);
            }
#pragma unroll
            for (int np = 0; np < kNT / 2; ++np) {
                u32 b0, b1, b2, b3;
                ldsm_x4(frag_addr<kBN, D>(sK + k_lb, 0, ks, np), b0, b1, b2, b3);
                Mma<T>::run(s[0][2 * np], a, b0, b1);
                Mma<T>::run(s[0][2 * np + 1], a, b2, b3);
            }
        }

        // Softcap / scale / ALiBi (rare features: uniform branches, straight-line code inside).
        if (transform) {
            if (p.softcap > 0.f) {
                const float cap_in = p.scale / p.softcap, cap_out = p.softcap * CUFLASH_LOG2E;
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[0][nt][e] = cap_out * tanh_abs_accurate(s[0][nt][e] * cap_in);
            } else {
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[0][nt][e] *= p.scale_log2;
            }
            if (p.alibi != nullptr) {
                const decode::Pos f = decode::block_pos(p, sreg_ctaid());
                const int ft = sreg_tid();
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int qi = frag_query(f, ft, h);
                    const int r = min(f.m0 + ((ft & 31) >> 2) + 8 * h, f.M - 1);
                    const float slope2 =
                        p.alibi[(i64)f.b * p.alibi_batch_stride + f.hk * f.group + (r - qi * f.group)] * CUFLASH_LOG2E;
                    // |i + shift - j| = |rel - column offset|
                    const int rel = qi + p.seqlen_k - p.seqlen_q - (kw0 + 2 * (ft & 3));
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            s[0][nt][2 * h + e] =
                                fmaf(-slope2, fabsf((float)(rel - (nt * 8 + e))), s[0][nt][2 * h + e]);
                }
            }
        }

        // Mask: only sub-tiles crossing seqlen_k or a window / causal edge of some row of the block.
        if (kw0 + WKEYS - 1 > right_lim || kw0 < left_lim) {
            const decode::Pos f = decode::block_pos(p, sreg_ctaid());
            const int ft = sreg_tid();
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int ipos = frag_query(f, ft, h) + p.seqlen_k - p.seqlen_q;
                const int c0 = kw0 + 2 * (ft & 3);
                const int lo = (p.window_left < 0 ? 0 : ipos - p.window_left) - c0;  // kept: lo <= c <= hi
                const int hi = (p.window_right < 0 ? p.seqlen_k - 1 : min(p.seqlen_k - 1, ipos + p.window_right)) - c0;
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = nt * 8 + e;
                        if (c < lo || c > hi) s[0][nt][2 * h + e] = -INFINITY;
                    }
            }
        }

        softmax_rescale<1, kNT, kDT, true>(s, acc_o, row_m, row_l, mult);

        // O += P V, P straight from the score registers.
#pragma unroll
        for (int kk = 0; kk < kKS2; ++kk) {
            u32 a[4];
            a[0] = pack2<T>(s[0][2 * kk][0], s[0][2 * kk][1]);
            a[1] = pack2<T>(s[0][2 * kk][2], s[0][2 * kk][3]);
            a[2] = pack2<T>(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]);
            a[3] = pack2<T>(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < kDT / 2; ++dp) {
                u32 b0, b1, b2, b3;
                ldsm_x4_trans(frag_addr<kBN, D>(sV + v_lb, 0, dp, kk), b0, b1, b2, b3);
                Mma<T>::run(acc_o[0][2 * dp], a, b0, b1);
                Mma<T>::run(acc_o[0][2 * dp + 1], a, b2, b3);
            }
        }
    }

    // ---- epilogue: merge the warps' partial results ----------------------------------------------------
    softmax_finish<1>(row_l);
    cp_async_wait<0>();  // nothing may still be landing in the ring (empty groups included)
    __syncthreads();     // every warp is done with the ring: it becomes the merge buffer

    // Positions recomputed from the special registers (nothing held across the loop for this).
    const decode::Pos f = decode::block_pos(p, sreg_ctaid());
    const int ft = sreg_tid();
    const int fwarp = ft >> 5, fg = (ft & 31) >> 2, ftq = ft & 3;
    const u32 fsRing = smem_addr(smem) + Tr::kQBytes, fsStats = fsRing + Tr::kRingBytes;
    constexpr u32 kStatL = (u32)(Tr::kWarps * kRows * 4);  // offset of the l values in the stats area
    if (ftq == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 at = fsStats + (u32)((fwarp * kRows + fg + 8 * h) * 4);
            sts_u32(at, __float_as_uint(row_m[h] * mult));  // log2 units; -inf stays -inf (mult > 0)
            sts_u32(at + kStatL, __float_as_uint(row_l[h]));
        }
    }
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            decode::sts_f32x2(fsRing + (u32)(((fwarp * kRows + fg + 8 * h) * Tr::kMergeStride + dt * 8 + 2 * ftq) * 4),
                              acc_o[0][dt][2 * h], acc_o[0][dt][2 * h + 1]);
    __syncthreads();

    // Each thread merges 8 columns of one row at a time (rows of the block in order, 16-byte chunks).
    const int ldo = (p.headdim + 7) & ~7;  // o_partial row length (split-KV)
    for (int e = ft; e < kRows * Tr::kChunks; e += kThreads) {
        const int row = e / Tr::kChunks, col = (e % Tr::kChunks) * 8;
        const int r = f.m0 + row;
        if (r >= f.M || col >= p.headdim) continue;
        float mw[WARPS], mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            mw[w] = __uint_as_float(lds_u32(fsStats + (u32)((w * kRows + row) * 4)));
            mx = fmaxf(mx, mw[w]);
        }
        float l = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            mw[w] = mx == -INFINITY ? 0.f : ex2(mw[w] - mx);  // the warp's weight 2^(m_w - m); 0 if it saw nothing
            l = fmaf(mw[w], __uint_as_float(lds_u32(fsStats + kStatL + (u32)((w * kRows + row) * 4))), l);
        }
        const float inv_l = l > 0.f ? 1.f / l : 0.f;
        const float lse2 = l > 0.f ? mx + log2f(l) : -INFINITY;  // log2 units
        const float lse = lse2 * CUFLASH_LN2;
        float o[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) o[x] = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const u32 at = fsRing + (u32)(((w * kRows + row) * Tr::kMergeStride + col) * 4);
            const float4 lo = decode::lds_f32x4(at), hi = decode::lds_f32x4(at + 16);
            const float c = mw[w] * inv_l;
            o[0] = fmaf(c, lo.x, o[0]);
            o[1] = fmaf(c, lo.y, o[1]);
            o[2] = fmaf(c, lo.z, o[2]);
            o[3] = fmaf(c, lo.w, o[3]);
            o[4] = fmaf(c, hi.x, o[4]);
            o[5] = fmaf(c, hi.y, o[5]);
            o[6] = fmaf(c, hi.z, o[6]);
            o[7] = fmaf(c, hi.w, o[7]);
        }
        const int qi = r / f.group, head = f.hk * f.group + (r - qi * f.group);
        if constexpr (CLUSTER > 1) {
            // the slice's normalised O and LSE stay in shared memory, after the merge buffer
            const u32 cb = fsRing + (u32)Tr::kMergeBytes;
            decode::sts_f32x4(cb + (u32)((row * D + col) * 4), make_float4(o[0], o[1], o[2], o[3]));
            decode::sts_f32x4(cb + (u32)((row * D + col + 4) * 4), make_float4(o[4], o[5], o[6], o[7]));
            if (col == 0) sts_u32(cb + (u32)(kRows * D * 4 + row * 4), __float_as_uint(lse2));
        } else if (p.num_splits <= 1) {
            T* dst = (T*)p.o + (i64)f.b * p.o_batch_stride + (i64)qi * p.o_row_stride
                   + (i64)head * p.o_head_stride + col;
            const u32 w0 = pack2<T>(o[0], o[1]), w1 = pack2<T>(o[2], o[3]);
            const u32 w2 = pack2<T>(o[4], o[5]), w3 = pack2<T>(o[6], o[7]);
            if (col + 8 <= p.headdim) {
                stg_u32x4(dst, w0, w1, w2, w3);
            } else {  // the chunk straddling headdim: element by element, never past the row
                for (int x = 0; x < p.headdim - col; ++x)
                    dst[x].bits = (unsigned short)(decode::pick4(w0, w1, w2, w3, x >> 1) >> (16 * (x & 1)));
            }
            if (col == 0 && p.lse != nullptr) p.lse[((i64)f.b * p.nheads + head) * p.seqlen_q + qi] = lse;
        } else {
            // fp32 O of this slice, normalised by the slice's own l (o_partial rows are ldo >= col + 8
            // floats long, so the whole chunk is written; columns past headdim hold zeros).
            const i64 prow = (((i64)sreg_ctaid().x * p.batch + f.b) * p.nheads + head) * p.seqlen_q + qi;
            float* dst = p.o_partial + prow * ldo + col;
            decode::stg_f32x4(dst, make_float4(o[0], o[1], o[2], o[3]));
            decode::stg_f32x4(dst + 4, make_float4(o[4], o[5], o[6], o[7]));
            if (col == 0) p.lse_partial[prow] = lse;
        }
    }
    if constexpr (CLUSTER > 1)
        decode::cluster_merge<T, D, kRows, kThreads, CLUSTER>(p, f, ft, fsRing + (u32)Tr::kMergeBytes);
}

template <typename T, int D, int WARPS, int WKEYS, int STAGES, bool QREGS>
__global__ void __launch_bounds__(WARPS * 32, (DecodeTraits<D, WARPS, WKEYS, STAGES, QREGS>::kMinBlocks))
fwd_decode(const __grid_constant__ Params p) {
    decode_body<T, D, WARPS, WKEYS, STAGES, QREGS, 1>(p);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Split-KV with the merge in the kernel (sm_90+): a cluster of CLUSTER blocks along x is the CLUSTER key
// slices of one (batch, kv head, row block); grid.x must be CLUSTER (the host launches it so).
template <typename T, int D, int WARPS, int WKEYS, int STAGES, bool QREGS, int CLUSTER>
__global__ void __cluster_dims__(CLUSTER, 1, 1)
__launch_bounds__(WARPS * 32, (DecodeTraits<D, WARPS, WKEYS, STAGES, QREGS>::kMinBlocks))
fwd_decode_cluster(const __grid_constant__ Params p) {
    using Tr = DecodeTraits<D, WARPS, WKEYS, STAGES, QREGS>;
    static_assert(CLUSTER >= 2 && CLUSTER <= 16, "2..16 blocks per cluster");
    static_assert(Tr::kMergeBytes + Tr::kClusterBytes <= Tr::kRingBytes, "the merge buffers reuse the K/V ring");
    decode_body<T, D, WARPS, WKEYS, STAGES, QREGS, CLUSTER>(p);
}
#endif

}  // namespace cuflash
