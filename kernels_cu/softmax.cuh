// softmax.cuh: online softmax on mma.sync accumulator fragments, in registers.
//
// A warp's score tile is kMT m16 tiles x kNT n8 tiles of m16n8 fp32 accumulators. Lane l holds, for
// each tile, c0,c1 at row l/4 and c2,c3 at row l/4 + 8 (columns 2(l%4), +1). So a thread touches
// 2 * kMT rows ("ri" = 2 mt + half), and each row is spread over the 4 lanes of a quad: a row
// reduction is a thread-local reduction plus two xor-shuffles (1, 2).
//
// The running max m is kept in the units of the scores as stored (raw q.k when `mult` is the
// pre-multiplied scale * log2(e), or log2-domain scores when the scores were transformed in place and
// mult = 1); probabilities are exp2(s * mult - m * mult), one FFMA + one MUFU.EX2 each. A row whose
// max is still -inf (nothing kept so far) uses 0 as its base so that no inf - inf appears. The sum l
// is kept per thread (partial over the thread's columns) and reduced over the quad once at the end;
// the division by l is deferred to the epilogue.
#pragma once
#include "mask.cuh"
#include "mma.cuh"

namespace cuflash {
namespace sm80 {

template <int kMT, int kNT, int kDT, bool kSkipRescale>
__device__ __forceinline__ void softmax_rescale(float (&s)[kMT][kNT][4], float (&acc_o)[kMT][kDT][4],
                                                float (&m)[2 * kMT], float (&l)[2 * kMT], float mult) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int ri = 2 * mt + h;
            float mx = m[ri];
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float base = mx == -INFINITY ? 0.f : mx * mult;
            const float alpha = ex2(m[ri] * mult - base);  // 0 while nothing was kept (m = -inf)
            // kSkipRescale: rescale O only when this row has a new max somewhere in the warp (after the
            // first tiles most do not): alpha is exactly 1 otherwise, so skipping is exact.
            if (!kSkipRescale || __any_sync(0xffffffffu, mx != m[ri])) {
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt) {
                    acc_o[mt][dt][2 * h] *= alpha;
                    acc_o[mt][dt][2 * h + 1] *= alpha;
                }
            }
            m[ri] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pe = ex2(fmaf(s[mt][nt][2 * h + e], mult, -base));
                    s[mt][nt][2 * h + e] = pe;
                    sum += pe;
                }
            }
            l[ri] = fmaf(l[ri], alpha, sum);
        }
    }
}

// Quad-reduce the per-thread partial sums (once, after the last tile).
template <int kMT>
__device__ __forceinline__ void softmax_finish(float (&l)[2 * kMT]) {
#pragma unroll
    for (int ri = 0; ri < 2 * kMT; ++ri) {
        l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 1);
        l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 2);
    }
}

}  // namespace sm80
}  // namespace cuflash
