// combine.cu: merge split-KV partial results (the split-KV of the sm80 and decode paths, and
// cuflash's merge_attention).
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
// as float4 from each slice. The first 128 splits' LSEs and weights sit in registers (lane l: splits
// l + 32 j), so every o_s load depends on no other load and kBatch = 8 of them per lane are in flight
// at once: with few rows and many splits the merge is bound by load latency, not bandwidth. Slices
// with lse_s = -inf get weight 0 and their o_s is left out (whatever bytes it holds). The merge is a
// function of its own called by the kernel: written inline in the kernel body, ptxas (NVRTC 13.0)
// spills 12 bytes on sm_90a.
#include "mask.cuh"

namespace cuflash {

// Merge row `row` = (b, h, i) in lse order (rows = batch x nheads x seqlen_q of them). Every lane of
// the warp must call it (shuffles).
template <typename T>
__device__ __forceinline__ void combine_row(const Params& p, i64 row, int lane) {
    constexpr int kRegSplits = 4;
    constexpr int kBatch = 8;  // o_s loads in flight per lane
    const i64 rows = (i64)p.batch * p.nheads * p.seqlen_q;
    const int i = (int)(row % p.seqlen_q);
    const i64 bh = row / p.seqlen_q;
    const int h = (int)(bh % p.nheads), b = (int)(bh / p.nheads);
    const int S = p.num_splits;
    const int ldo = (p.headdim + 7) & ~7;
    const float* lp = p.lse_partial + row;

    float ls[kRegSplits];
#pragma unroll
    for (int j = 0; j < kRegSplits; ++j) {
        const int s = lane + 32 * j;
        ls[j] = s < S ? __ldcg(lp + (i64)s * rows) : -INFINITY;
    }
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kRegSplits; ++j) mx = fmaxf(mx, ls[j]);
    for (int s = lane + 32 * kRegSplits; s < S; s += 32) mx = fmaxf(mx, __ldcg(lp + (i64)s * rows));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
        for (int j = 0; j < kRegSplits; ++j) sum += ls[j] == -INFINITY ? 0.f : expf(ls[j] - mx);
        for (int s = lane + 32 * kRegSplits; s < S; s += 32) sum += expf(__ldcg(lp + (i64)s * rows) - mx);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float lse = mx == -INFINITY ? -INFINITY : mx + logf(sum);
    if (lane == 0 && p.lse != nullptr) p.lse[row] = lse;
    float w[kRegSplits];
#pragma unroll
    for (int j = 0; j < kRegSplits; ++j) w[j] = ls[j] == -INFINITY ? 0.f : expf(ls[j] - lse);

    T* dst = (T*)p.o + (i64)b * p.o_batch_stride + (i64)i * p.o_row_stride + (i64)h * p.o_head_stride;
    const float* op = p.o_partial + row * ldo;
    for (int cb = 0; cb < p.headdim; cb += 128) {  // every lane runs every round (the shuffles)
        const int c0 = cb + 4 * lane;
        const bool on = c0 < p.headdim;
        float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int j = 0; j < kRegSplits; ++j) {
                const float wj = w[j];
                const int n = min(32, S - 32 * j);
                // kBatch loads issued together, then their sums (an explicit batch: with a plain
                // unrolled loop ptxas kept fewer loads in flight and spilled)
                for (int t0 = 0; t0 < n; t0 += kBatch) {
                    float4 v[kBatch];
                    float ws[kBatch];
#pragma unroll
                    for (int u = 0; u < kBatch; ++u) {
                        ws[u] = __shfl_sync(0xffffffffu, wj, (t0 + u) & 31);
                        const bool ld = on && t0 + u < n && ws[u] > 0.f;
                        v[u] = ld ? __ldcg((const float4*)(op + (i64)(32 * j + t0 + u) * rows * ldo + c0))
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
                    }
#pragma unroll
                    for (int u = 0; u < kBatch; ++u) {
                        if (t0 + u < n && ws[u] > 0.f) {
                            acc0 = fmaf(ws[u], v[u].x, acc0);
                            acc1 = fmaf(ws[u], v[u].y, acc1);
                            acc2 = fmaf(ws[u], v[u].z, acc2);
                            acc3 = fmaf(ws[u], v[u].w, acc3);
                        }
                    }
                }
            }
            for (int s = 32 * kRegSplits; s < S && on; ++s) {  // merge_attention of more than 128 parts
                const float ls_s = __ldcg(lp + (i64)s * rows);
                if (ls_s == -INFINITY) continue;
                const float ws = expf(ls_s - lse);
                const float4 v = __ldcg((const float4*)(op + (i64)s * rows * ldo + c0));
                acc0 = fmaf(ws, v.x, acc0);
                acc1 = fmaf(ws, v.y, acc1);
                acc2 = fmaf(ws, v.z, acc2);
                acc3 = fmaf(ws, v.w, acc3);
            }
        }
        if (on) {  // element stores: any output strides (merge_attention writes into caller's arrays)
            dst[c0] = from_float<T>(acc0);
            if (c0 + 1 < p.headdim) dst[c0 + 1] = from_float<T>(acc1);
            if (c0 + 2 < p.headdim) dst[c0 + 2] = from_float<T>(acc2);
            if (c0 + 3 < p.headdim) dst[c0 + 3] = from_float<T>(acc3);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(128) fwd_combine(const Params p) {
    const i64 rows = (i64)p.batch * p.nheads * p.seqlen_q;
    const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);  // (b, h, i) in lse order
    if (row >= rows) return;
    combine_row<T>(p, row, threadIdx.x & 31);
}

}  // namespace cuflash
