// bwd_common.cuh: pieces shared by the backward kernels (scalar, fp32 math).
//
// The backward recomputes the probabilities from the forward's log-sum-exp instead of storing them:
//
//     P_ij  = exp(s_ij - lse_i)            s_ij = the final score (scale, softcap, ALiBi), natural log
//     D_i   = sum_d dO_id * O_id           (= sum_j P_ij dP_ij, computed once per row)
//     dV_j  = sum_i P_ij dO_i
//     dP_ij = dO_i . V_j
//     dS_ij = P_ij (dP_ij - D_i) * c_ij    c_ij = 1 - tanh^2(raw_ij * scale / softcap) with softcap, else 1
//     dQ_i  = scale * sum_j dS_ij K_j,     dK_j = scale * sum_i dS_ij Q_i
//
// Scores are computed in the log2 domain, as in the forward (score_log2 of mask.cuh returns s * log2(e)):
// exp(s - lse) = exp2(s * log2(e) - lse * log2(e)), so the kernels keep lse * log2(e) per row and call
// exp2f (one MUFU.EX2) on the difference. Since lse_i >= max_j s_ij, the difference is <= 0 (up to
// rounding) and P lies in [0, 1]: no overflow, no running max needed in the backward.
//
// Dropout (keep mask Z, Z_ij in {0, 1}, regenerated from Philox as in the forward; r = 1 / (1 - p)):
// the forward's O = (P o Z r) V with the lse of the undropped softmax, so
//
//     dV_j  = sum_i P_ij Z_ij r dO_i
//     dP_ij = Z_ij r (dO_i . V_j)          (0 where dropped)
//     dS_ij = P_ij (dP_ij - D_i) * c_ij    with the undropped P; D_i = rowsum(dO_i * O_i) is unchanged
//
// (dropped pairs still have dS = -P D c, not 0). The kernels take DROPOUT as a template flag: with
// DROPOUT = false the generator and the mask are compiled out and the code is that of no dropout.
//
// A row with no kept key has lse = -inf (and out = 0). There s - lse would be (-inf) - (-inf) = NaN for
// masked keys, so such rows (and rows past seqlen_q) are flagged and get P = 0, hence dS = 0: their
// gradients are exactly 0 and never NaN. The flag is lse * log2(e) replaced by +inf: every test is
// "lse_log2 < +inf", which is also false for a NaN lse (garbage in gives 0, not NaN, out).
#pragma once
#include "mask.cuh"
#include "philox.cuh"

namespace cuflash {

// Sum over the G consecutive lanes of a group (G a power of two <= 32). An xor butterfly: every lane of
// the group ends with the bitwise same sum (float addition is commutative, and each level adds the same
// two partial sums in either order). Every lane of the warp must call it (full mask).
template <int G>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = 1; o < G; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Bitwise OR over the G consecutive lanes of a group (G a power of two <= 32), full-warp xor butterfly.
template <int G>
__device__ __forceinline__ u32 group_or(u32 x) {
#pragma unroll
    for (int o = 1; o < G; o <<= 1) x |= __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}


// Column ownership of the row-group kernels: a row of D head-dim columns is cut into D/4 chunks of 4
// consecutive columns (one float4 of shared memory); thread t of a group of G threads owns chunks
// t, t + G, t + 2G, ..., i.e. its c-th column is d = 4 * (t + G * (c / 4)) + c % 4. A group thus reads
// G consecutive float4 per step (one 16-byte shared load per 4 columns, no bank conflicts; other groups
// of the warp read the same row, a broadcast).
template <int G>
__device__ __forceinline__ int col_of(int t, int c) {
    return 4 * (t + G * (c >> 2)) + (c & 3);
}

// Partial dot product of a shared-memory fp32 row (as float4) with the thread's C registers x.
// Two accumulators halve the dependent-FMA chain.
template <int C, int G>
__device__ __forceinline__ float dot4(const float4* row, const float (&x)[C], int t) {
    static_assert(C % 4 == 0, "columns per thread must be a multiple of 4");
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int c4 = 0; c4 < C / 4; ++c4) {
        const float4 v = row[t + G * c4];
        a = fmaf(v.x, x[4 * c4 + 0], a);
        b = fmaf(v.y, x[4 * c4 + 1], b);
        a = fmaf(v.z, x[4 * c4 + 2], a);
        b = fmaf(v.w, x[4 * c4 + 3], b);
    }
    return a + b;
}

// acc += alpha * row (the thread's C columns of a shared-memory fp32 row).
template <int C, int G>
__device__ __forceinline__ void axpy4(float alpha, const float4* row, float (&acc)[C], int t) {
#pragma unroll
    for (int c4 = 0; c4 < C / 4; ++c4) {
        const float4 v = row[t + G * c4];
        acc[4 * c4 + 0] = fmaf(alpha, v.x, acc[4 * c4 + 0]);
        acc[4 * c4 + 1] = fmaf(alpha, v.y, acc[4 * c4 + 1]);
        acc[4 * c4 + 2] = fmaf(alpha, v.z, acc[4 * c4 + 2]);
        acc[4 * c4 + 3] = fmaf(alpha, v.w, acc[4 * c4 + 3]);
    }
}

// The row's lse in the log2 domain, or +inf when the row has no kept key (lse = -inf) or is past
// seqlen_q (valid = false): see the note above.
__device__ __forceinline__ float lse_log2_or_flag(float lse, bool valid) {
    return (valid && lse > -INFINITY) ? lse * CUFLASH_LOG2E : INFINITY;
}

// Score of a kept (i, j) in the log2 domain, exactly as score_log2 (mask.cuh) computes it, so that P
// recomputed here matches the forward's lse to the last bits; also returns the softcap's derivative
// c = d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2(x / softcap) at x = raw * scale (1 without softcap).
// ALiBi is added after the softcap and its bias does not depend on the scores: it does not enter c.
__device__ __forceinline__ float bwd_score_log2(const Params& p, float dot, int i, int j, float slope,
                                                float& dcap) {
    float s;
    if (p.softcap > 0.f) {
        const float t = tanhf(dot * p.scale / p.softcap);
        s = p.softcap * t;
        s = s * CUFLASH_LOG2E;
        dcap = 1.f - t * t;
    } else {
        s = dot * p.scale_log2;
        dcap = 1.f;
    }
    if (slope != 0.f) s -= slope * CUFLASH_LOG2E * fabsf((float)(i + p.seqlen_k - p.seqlen_q - j));
    return s;
}

// dS_ij (without the softmax scale) for a (row, key) pair, 0 where the key is masked or the row is flagged.
// pv returns the pair's dV weight: P_ij, or with DROPOUT P_ij Z_ij / (1 - p) (kept = Z_ij; ignored
// without DROPOUT). dot = q_i . k_j, dp = dO_i . v_j, lse_l2 = lse_log2_or_flag(...), dsum = D_i.
template <bool DROPOUT>
__device__ __forceinline__ float bwd_ds(const Params& p, float dot, float dp, int i, int j, float slope,
                                        float lse_l2, float dsum, bool kept, float& pv) {
    pv = 0.f;
    float ds = 0.f;
    if (lse_l2 < INFINITY && key_kept(p, i, j)) {
        float dcap;
        const float s = bwd_score_log2(p, dot, i, j, slope, dcap);
        const float pr = exp2f(s - lse_l2);  // s = -inf never reaches here (masked keys are excluded above)
        if (DROPOUT) {
            dp = kept ? dp * p.dropout_scale : 0.f;
            pv = kept ? pr * p.dropout_scale : 0.f;
        } else {
            pv = pr;
        }
        ds = pr * (dp - dsum) * dcap;
    }
    return ds;
}

// ---- the ordered deterministic mode (bwd_sm90.cu's header; bwd_sm80.cu takes it too) ----------------------
// Key block nb (N of them, BN keys) visits the query blocks (BM rows) m_first .. M - 1 (no left window),
// walking from its pivot; every query block's dQ rows receive the additions in a fixed order, counted by
// a counter per (batch, head, query block, part).

__device__ __forceinline__ int ld_acquire(const int* a) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
    return v;
}
// Ordered mode: wait until counter `c` reads `rank` (this block's turn).
__device__ __forceinline__ void sem_wait(const int* c, int rank) {
    while (ld_acquire(c) != rank) __nanosleep(32);
}
// Ordered mode: raise counter `c` after the block's reductions (a release at GPU scope: cumulative over the
// other threads' reductions, ordered before it by a barrier).
__device__ __forceinline__ void red_release_add(int* c, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(c), "r"(v) : "memory");
}

// Query blocks (of BM rows) that keep at least one key of [n0, n0 + BN) (both window bounds are
// non-decreasing in the row): m_first .. m_first + n_m - 1.
template <int BM, int BN>
__device__ __forceinline__ void query_block_range(int n0, int sq, int sk, int wl, int wr, int& m_first, int& n_m) {
    const long long shift = (long long)sk - sq;
    const long long n1 = min(n0 + BN, sk) - 1;
    long long i_lo = 0, i_hi = (long long)sq - 1;
    if (wr >= 0) i_lo = max(i_lo, (long long)n0 - shift - wr);
    if (wl >= 0) i_hi = min(i_hi, n1 - shift + wl);
    m_first = (int)(i_lo / BM);
    n_m = i_lo <= i_hi ? (int)(i_hi / BM) - m_first + 1 : 0;
}

// a * b / c for non-negative ints (32-bit division where the product fits)
__device__ __forceinline__ int muldiv(int a, int b, int c) {
    const unsigned long long x = (unsigned long long)a * (unsigned)b;
    return x >> 32 ? (int)(x / (unsigned)c) : (int)((unsigned)x / (unsigned)c);
}
// Ordered mode (no left window): the first query block of key block nb's upper part; n_kb key blocks.
template <int BM, int BN>
__device__ __forceinline__ int ordered_pivot(int nb, int n_kb, int sq, int sk, int wr) {
    int m_first, n_m;
    query_block_range<BM, BN>(nb * BN, sq, sk, -1, wr, m_first, n_m);
    return max(m_first, muldiv(nb, (sq + BM - 1) / BM, n_kb));
}
// The walk's step mi (0 .. n_m - 1) of a key block: pivot .. m_first + n_m - 1, then m_first .. pivot - 1.
__device__ __forceinline__ int walk_m(int mi, int m_first, int n_m, int pivot) {
    const int m = pivot + mi;
    return m >= m_first + n_m ? m - n_m : m;
}
// Ordered mode: key block nb's turn on query block m (counter index part, value rank), nb visiting m. The
// key blocks whose walk holds m are 0 .. lower: m_first(j) <= m <=> j BN < (m + 1) BM + shift + wr (no
// left window: every key block visits some query block); those whose upper part holds m are 0 .. upper:
// besides, j M / n_kb <= m <=> j <= ((m + 1) n_kb - 1) / M (both bounds rise with the key block).
// (cuflash/_launch_bwd_sm80.py mirrors this and checks it against a bisection over the same bounds.)
template <int BM, int BN>
__device__ __noinline__ void ordered_turn(int nb, int m, int n_kb, int sq, int sk, int wr, bool two, int& part,
                                          int& rank) {
    const int M = (sq + BM - 1) / BM;
    const int lower = wr < 0 ? n_kb - 1
                             : (int)min((long long)n_kb - 1, ((long long)(m + 1) * BM + sk - sq + wr - 1) / BN);
    const unsigned long long x = (unsigned long long)(m + 1) * (unsigned)n_kb - 1;  // >= 0
    const int upper = min(lower, x >> 32 ? (int)(x / (unsigned)M) : (int)((unsigned)x / (unsigned)M));
    if (nb <= upper) {  // an upper visitor
        part = 0;
        rank = upper - nb;
    } else {
        part = two ? 1 : 0;
        rank = lower - nb + (two ? 0 : upper + 1);
    }
}

}  // namespace cuflash
