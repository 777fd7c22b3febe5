// params.cuh: the one argument every cuflash kernel takes, by value.
//
// The host builds this struct as a NumPy structured scalar (cuflash/_launch.py, PARAMS_FIELDS) and
// CuPy passes its bytes as the kernel argument. The two field lists must match one for one:
// tests/test_compile.py parses this struct and compares it with PARAMS_FIELDS. Keep every 8-byte
// field before the 4-byte ones so that the layout has no hidden padding.
//
// Layouts: q, out, dout, dq are (batch, seqlen_q, nheads, headdim); k, v, dk, dv are
// (batch, seqlen_k, nheads_k, headdim); any strides (in elements) with the last dimension contiguous.
// lse and dsum are contiguous float32 (batch, nheads, seqlen_q).
#pragma once
#include "types.cuh"

namespace cuflash {

struct Params {
    // ---- pointers -------------------------------------------------------------------------------
    const void* q;
    const void* k;
    const void* v;
    void* o;              // forward: written; backward: the forward's output, read
    float* lse;           // (batch, nheads, seqlen_q), natural log; -inf for rows with no key
    const void* dout;
    void* dq;
    void* dk;
    void* dv;
    float* dq_accum;      // backward fp32 dQ accumulator, contiguous (batch, nheads, seqlen_q, headdim)
    float* dsum;          // backward D = rowsum(dO * O), (batch, nheads, seqlen_q)
    float* dk_accum;      // backward fp32 dK/dV scratch where a kernel needs one (GQA), else null
    float* dv_accum;
    const float* alibi;   // ALiBi slopes, null when unused; (nheads,) or (batch, nheads)
    float* o_partial;     // split-KV: fp32 partial outputs (num_splits, batch, nheads, seqlen_q, headdim)
    float* lse_partial;   // split-KV: (num_splits, batch, nheads, seqlen_q)
    int* counters;        // scratch ints (deterministic ordering, schedulers), null when unused
    // ---- strides in elements ----------------------------------------------------------------------
    i64 q_batch_stride, q_row_stride, q_head_stride;
    i64 k_batch_stride, k_row_stride, k_head_stride;
    i64 v_batch_stride, v_row_stride, v_head_stride;
    i64 o_batch_stride, o_row_stride, o_head_stride;
    i64 do_batch_stride, do_row_stride, do_head_stride;
    i64 dq_batch_stride, dq_row_stride, dq_head_stride;
    i64 dk_batch_stride, dk_row_stride, dk_head_stride;
    i64 dv_batch_stride, dv_row_stride, dv_head_stride;
    i64 alibi_batch_stride;  // 0 when slopes are (nheads,)
    // ---- dropout ------------------------------------------------------------------------------------
    u64 seed;
    u64 rng_offset;
    // ---- sizes and options (4 bytes each) -------------------------------------------------------------
    int batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim;
    int window_left;      // -1 = unbounded; keeps j >= i + seqlen_k - seqlen_q - window_left
    int window_right;     // -1 = unbounded; causal is window_right = 0
    float scale;          // softmax_scale
    float scale_log2;     // softmax_scale * log2(e): scores go straight into exp2
    float softcap;        // 0 = off; else s = softcap * tanh(s / softcap)
    float dropout_p;      // probability of dropping
    float dropout_scale;  // 1 / (1 - dropout_p)
    u32 dropout_threshold;  // keep iff the 16-bit random draw >= threshold = min(round(p * 65536), 65535)
    int num_splits;       // split-KV forward; 1 = off
    int deterministic;    // backward: fixed-order dQ reduction when nonzero
    int flags;            // reserved for kernels' runtime switches
    int pad0;
};

// Keys kept for query row i: j in [first_key(i), last_key(i)] (inclusive), intersected with
// [0, seqlen_k). Masks are aligned bottom-right: query i sits at key position i + seqlen_k - seqlen_q.
__device__ __forceinline__ int first_key(const Params& p, int i) {
    return p.window_left < 0 ? 0 : max(0, i + p.seqlen_k - p.seqlen_q - p.window_left);
}
__device__ __forceinline__ int last_key(const Params& p, int i) {  // inclusive
    return p.window_right < 0 ? p.seqlen_k - 1
                              : min(p.seqlen_k - 1, i + p.seqlen_k - p.seqlen_q + p.window_right);
}

}  // namespace cuflash
