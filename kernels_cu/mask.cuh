// mask.cuh: the score transform shared by every kernel, scalar form.
//
// score(i, j) = softcap-and-ALiBi-transformed (q_i . k_j) * scale, or -inf when key j is masked
// for query i. Masks are aligned bottom-right (query i sits at key position i + seqlen_k - seqlen_q).
#pragma once
#include "params.cuh"

namespace cuflash {

#define CUFLASH_LOG2E 1.4426950408889634f
#define CUFLASH_LN2 0.6931471805599453f
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float fast_tanh(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The ALiBi slope of (batch b, head h), 0 when ALiBi is off.
__device__ __forceinline__ float alibi_slope(const Params& p, int b, int h) {
    return p.alibi == nullptr ? 0.f : p.alibi[(i64)b * p.alibi_batch_stride + h];
}

// True when key j may be attended by query i (window, causal and the key range).
__device__ __forceinline__ bool key_kept(const Params& p, int i, int j) {
    return j >= first_key(p, i) && j <= last_key(p, i);
}

// Raw dot product -> score in the log2 domain (multiplied by log2(e)), or -inf when masked.
// With softcap off and no ALiBi this is one multiply by the pre-multiplied scale_log2.
// The softcap uses the exact tanhf: a fp32 path must match the float64 reference to fp32 rounding.
__device__ __forceinline__ float score_log2(const Params& p, float dot, int i, int j, float slope) {
    if (!key_kept(p, i, j)) return -INFINITY;
    float s;
    if (p.softcap > 0.f) {
        s = p.softcap * tanhf(dot * p.scale / p.softcap);
        s = s * CUFLASH_LOG2E;
    } else {
        s = dot * p.scale_log2;
    }
    if (slope != 0.f) s -= slope * CUFLASH_LOG2E * fabsf((float)(i + p.seqlen_k - p.seqlen_q - j));
    return s;
}

}  // namespace cuflash
