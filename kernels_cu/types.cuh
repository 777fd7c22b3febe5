// types.cuh: 16-bit storage types and conversions, self-contained.
//
// NVRTC ships no cuda_fp16.h / cuda_bf16.h of its own (they come with a toolkit), and cuflash must
// compile on machines that have only the driver and the NVRTC wheel. So the 16-bit types here are
// plain 16-bit storage with conversions written in PTX (sm_80+). Arithmetic is always done in fp32.
#pragma once

namespace cuflash {

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;

struct __align__(2) half_t { unsigned short bits; };
struct __align__(2) bf16_t { unsigned short bits; };

// ---- scalar loads as float ---------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
// bf16 is the top half of an fp32: widening is a shift (exact).
__device__ __forceinline__ float to_float(bf16_t x) { return __uint_as_float(((u32)x.bits) << 16); }

// ---- scalar stores from float (round to nearest even) --------------------------------------------
template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float f) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}

// ---- packed pairs (the A/B operand format of mma.sync) -------------------------------------------
// Packs (lo, hi) into one 32-bit register, lo in the low 16 bits.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<half_t>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<bf16_t>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <typename T> __device__ __forceinline__ void unpack2(u32 r, float& lo, float& hi);
template <> __device__ __forceinline__ void unpack2<half_t>(u32 r, float& lo, float& hi) {
    half_t a, b;
    a.bits = (unsigned short)(r & 0xffffu);
    b.bits = (unsigned short)(r >> 16);
    lo = to_float(a);
    hi = to_float(b);
}
template <> __device__ __forceinline__ void unpack2<bf16_t>(u32 r, float& lo, float& hi) {
    lo = __uint_as_float(r << 16);
    hi = __uint_as_float(r & 0xffff0000u);
}

// ---- special registers read afresh ----------------------------------------------------------------
// volatile: never merged with an earlier read, so that values needed only by rare branches, the tile
// loads or the epilogue (fwd_sm80.cu, fwd_decode.cu), or by one role of a warp-specialised kernel after
// its setmaxnreg (fwd_sm90.cu), are recomputed where used instead of being held, or spilled, across the
// main loop or the register-count change.
__device__ __forceinline__ int sreg_tid() {
    int x;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(x));
    return x;
}
__device__ __forceinline__ int3 sreg_ctaid() {
    int3 c;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(c.x));
    asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(c.y));
    asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(c.z));
    return c;
}
__device__ __forceinline__ int sreg_ctaid_x() {
    int x;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(x));
    return x;
}
__device__ __forceinline__ int sreg_nctaid_x() {
    int x;
    asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(x));
    return x;
}

// The host must have given the kernel its traits' dynamic shared memory (and, where the kernel relies on
// it, a base aligned to `align` bytes): trap otherwise, loudly, rather than corrupt memory.
__device__ __forceinline__ void require_dynamic_smem(u32 bytes, u32 base = 0, u32 align = 1) {
    u32 dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < bytes || (base & (align - 1u)) != 0) __trap();
}

}  // namespace cuflash
