// combine.cu: merge split-KV partial results (and cuflash's merge_attention).
//
// Inputs (Params): o_partial, fp32 (num_splits, batch, nheads, seqlen_q, ldo) with
// ldo = headdim rounded up to 8, each slice's output already normalised by its own softmax sum;
// lse_partial, fp32 (num_splits, batch, nheads, seqlen_q), natural log, -inf for a slice that saw no
// key of the row. Output: o (batch, seqlen_q, nheads, headdim) in T with Params' o strides, and lse
// (batch, nheads, seqlen_q) unless null.
//
//   lse = log(sum_s exp(lse_s)),  o = sum_s exp(lse_s - lse) * o_s
//
// computed around the max LSE; a row that no slice saw (every lse_s = -inf) gets o = 0, lse = -inf.
// One warp per row, four rows per 128-thread block; lane l owns columns 4l.. (+128 per round), read
// as float4 from each slice. Slices with lse_s = -inf are skipped (their o_s is never multiplied).
#include "mask.cuh"

namespace cuflash {

template <typename T>
__global__ void __launch_bounds__(128) fwd_combine(const Params p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 rows = (i64)p.batch * p.nheads * p.seqlen_q;
    const i64 row = (i64)blockIdx.x * 4 + warp;  // (b, h, i) in lse order
    if (row >= rows) return;
    const int i = (int)(row % p.seqlen_q);
    const i64 bh = row / p.seqlen_q;
    const int h = (int)(bh % p.nheads), b = (int)(bh / p.nheads);
    const int S = p.num_splits;
    const int ldo = (p.headdim + 7) & ~7;

    float mx = -INFINITY;
    for (int s = lane; s < S; s += 32) mx = fmaxf(mx, p.lse_partial[(i64)s * rows + row]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    if (mx != -INFINITY)
        for (int s = lane; s < S; s += 32) sum += expf(p.lse_partial[(i64)s * rows + row] - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float lse = mx == -INFINITY ? -INFINITY : mx + logf(sum);
    if (lane == 0 && p.lse != nullptr) p.lse[row] = lse;

    T* dst = (T*)p.o + (i64)b * p.o_batch_stride + (i64)i * p.o_row_stride + (i64)h * p.o_head_stride;
    for (int c0 = 4 * lane; c0 < p.headdim; c0 += 128) {
        float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
        if (mx != -INFINITY) {
            for (int s = 0; s < S; ++s) {
                const float ls = p.lse_partial[(i64)s * rows + row];
                if (ls == -INFINITY) continue;
                const float w = expf(ls - lse);
                const float4 v = *(const float4*)(p.o_partial + ((i64)s * rows + row) * ldo + c0);
                acc0 = fmaf(w, v.x, acc0);
                acc1 = fmaf(w, v.y, acc1);
                acc2 = fmaf(w, v.z, acc2);
                acc3 = fmaf(w, v.w, acc3);
            }
        }
        // Element stores: any output strides (merge_attention writes into caller's arrays).
        dst[c0] = from_float<T>(acc0);
        if (c0 + 1 < p.headdim) dst[c0 + 1] = from_float<T>(acc1);
        if (c0 + 2 < p.headdim) dst[c0 + 2] = from_float<T>(acc2);
        if (c0 + 3 < p.headdim) dst[c0 + 3] = from_float<T>(acc3);
    }
}

}  // namespace cuflash
