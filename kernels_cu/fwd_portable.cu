// fwd_portable.cu: the portable FlashAttention forward (no tensor cores).
//
// The correct fallback for every dtype (fp32 included), head dim 1..256 and GPU from sm_80 on.
// One block owns BM query rows of one (batch, head); K/V tiles of BN keys stream through shared
// memory (converted to fp32 once on load). Each query row belongs to a quad of 4 threads: thread t
// of the quad owns head-dim columns d = t + 4c, so the row's Q slice and its output accumulator
// live in registers, a score is 4 partial dot products summed with two shuffles, and every thread
// of the quad ends up with all BN scores of its row, which is all the softmax needs.
//
// Online softmax in the log2 domain: running max m, running sum l, accumulator rescaled by
// exp2(m_old - m_new) when the max grows; the division by l is deferred to the end.
#include "mask.cuh"
#include "philox.cuh"

namespace cuflash {

template <int D>
struct PortableFwdTraits {
    static constexpr int kThreads = 128;
    static constexpr int kBM = kThreads / 4;           // query rows per block (a quad per row)
    static constexpr int kBN = D <= 64 ? 32 : 16;      // keys per tile; fewer at large D (registers)
    static constexpr int kCols = D / 4;                // head-dim columns per thread
    static constexpr int kSmemBytes = 2 * kBN * D * (int)sizeof(float);  // K and V tiles
    static_assert(D % 4 == 0 && D <= 256, "head dim bucket must be a multiple of 4, at most 256");
    static_assert(kBN % 8 == 0, "dropout draws 8 keys per Philox call: tiles are multiples of 8 keys");
    static_assert(kSmemBytes <= 48 * 1024, "portable forward must fit the default shared memory");
};

// DROPOUT is a template flag so that p = 0 compiles the generator out entirely.
template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(PortableFwdTraits<D>::kThreads)
fwd_portable(const Params p) {
    using Tr = PortableFwdTraits<D>;
    constexpr int BM = Tr::kBM, BN = Tr::kBN, C = Tr::kCols;
    __shared__ float sK[BN][D];
    __shared__ float sV[BN][D];

    const int tid = threadIdx.x;
    const int lane4 = tid & 3;              // position in the quad
    const int row = tid >> 2;               // row of the block
    const int m0 = blockIdx.x * BM;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.nheads / p.nheads_k);
    const int i = m0 + row;                 // query row
    const bool row_valid = i < p.seqlen_q;

    const T* qp = (const T*)p.q + (i64)b * p.q_batch_stride + (i64)h * p.q_head_stride;
    const T* kp = (const T*)p.k + (i64)b * p.k_batch_stride + (i64)hk * p.k_head_stride;
    const T* vp = (const T*)p.v + (i64)b * p.v_batch_stride + (i64)hk * p.v_head_stride;

    float q[C], acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d = lane4 + 4 * c;
        q[c] = (row_valid && d < p.headdim) ? to_float(qp[(i64)i * p.q_row_stride + d]) : 0.f;
        acc[c] = 0.f;
    }
    const float slope = alibi_slope(p, b, h);

    // Keys any row of this block may see; tiles outside are never loaded.
    const int last_row = min(m0 + BM, p.seqlen_q) - 1;
    const int n_lo = first_key(p, m0);
    const int n_hi = last_key(p, last_row);  // inclusive
    const int n_begin = (n_lo / BN) * BN;

    float m = -INFINITY, l = 0.f;
    for (int n0 = n_begin; n0 <= n_hi; n0 += BN) {
        __syncthreads();  // the previous tile is consumed
        for (int e = tid; e < BN * D; e += Tr::kThreads) {
            const int jj = e / D, d = e % D;
            const int j = n0 + jj;
            const bool ok = j < p.seqlen_k && d < p.headdim;
            sK[jj][d] = ok ? to_float(kp[(i64)j * p.k_row_stride + d]) : 0.f;
            sV[jj][d] = ok ? to_float(vp[(i64)j * p.v_row_stride + d]) : 0.f;
        }
        __syncthreads();

        float s[BN];
        float tile_max = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < BN; ++jj) {
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < C; ++c) dot = fmaf(q[c], sK[jj][lane4 + 4 * c], dot);
            dot += __shfl_xor_sync(0xffffffffu, dot, 1);
            dot += __shfl_xor_sync(0xffffffffu, dot, 2);
            s[jj] = row_valid ? score_log2(p, dot, i, n0 + jj, slope) : -INFINITY;
            tile_max = fmaxf(tile_max, s[jj]);
        }
        const float m_new = fmaxf(m, tile_max);
        // A row with every key masked so far has m_new = -inf: use 0 as the base so that
        // exp2(-inf - base) = 0 instead of exp2(-inf + inf) = NaN.
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float rescale = exp2f(m - base);
        l *= rescale;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] *= rescale;
        // Dropout zeroes entries of P after the row sum: the LSE stays that of the undropped
        // softmax, and the 1/(1-p) rescale is applied once at the end.
        const bool dropout = DROPOUT && row_valid;
#pragma unroll
        for (int g = 0; g < BN / 8; ++g) {
            u32 keep = 0xffu;  // bit t: key n0 + 8g + t is kept
            if (dropout) keep = dropout_keep_bits8(p, dropout_draws(p, b, h, i, n0 + 8 * g));
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                const int jj = 8 * g + t;
                const float pj = exp2f(s[jj] - base);
                l += pj;
                const float pv = (keep >> t) & 1u ? pj : 0.f;
#pragma unroll
                for (int c = 0; c < C; ++c) acc[c] = fmaf(pv, sV[jj][lane4 + 4 * c], acc[c]);
            }
        }
        m = m_new;
    }

    if (!row_valid) return;
    // no key at all: output 0
    const float inv_l = l > 0.f ? (DROPOUT ? p.dropout_scale : 1.f) / l : 0.f;
    T* op = (T*)p.o + (i64)b * p.o_batch_stride + (i64)h * p.o_head_stride + (i64)i * p.o_row_stride;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d = lane4 + 4 * c;
        if (d < p.headdim) op[d] = from_float<T>(acc[c] * inv_l);
    }
    if (lane4 == 0 && p.lse != nullptr) {
        p.lse[((i64)b * p.nheads + h) * p.seqlen_q + i] = l > 0.f ? (m + log2f(l)) * CUFLASH_LN2 : -INFINITY;
    }
}

}  // namespace cuflash
