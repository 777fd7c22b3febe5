// mma.cuh: sm80+ warp-level building blocks in inline PTX (no CUDA headers needed).
//
//   cp.async.cg 16-byte global -> shared copies with zero fill, commit / wait groups;
//   ldmatrix x4 (plain and .trans) from shared memory;
//   mma.sync m16n8k16 with f16 or bf16 inputs and f32 accumulators;
//   single-instruction exp2 and small shared-memory load/store helpers.
//
// Shared-memory addresses are 32-bit (.shared window) everywhere. Every instruction that reads or
// writes memory is `asm volatile` with a "memory" clobber so that the compiler neither hoists a
// shared-memory read above a barrier nor merges two reads of a buffer that a cp.async refilled.
#pragma once
#include "types.cuh"

namespace cuflash {
namespace sm80 {

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// ---- cp.async ---------------------------------------------------------------------------------
// Copies `src_bytes` (0..16) bytes from global memory and zero-fills the rest of the 16 bytes.
// `src` must be 16-byte aligned and point to readable memory even when src_bytes == 0.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// All 16 bytes real (no zero fill): the common full-tile case, no size operand to encode.
__device__ __forceinline__ void cp_async_16_full(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// ---- ldmatrix ---------------------------------------------------------------------------------
// Lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each); register i receives matrix i
// with lane l holding row l/4, columns 2(l%4), 2(l%4)+1 (transposed with .trans).
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}

// ---- mma.sync m16n8k16, fp32 accumulate: c += a * b --------------------------------------------
// a: 4 regs (16x16 row-major A fragment), b0/b1: the two regs of the 16x8 B fragment.
template <typename T> struct Mma;
template <> struct Mma<half_t> {
    static __device__ __forceinline__ void run(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<bf16_t> {
    static __device__ __forceinline__ void run(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// ---- math ---------------------------------------------------------------------------------------
// 2^x in one MUFU.EX2 (relative error ~2^-22); exp2(-inf) = +0.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// tanh with ~1e-7 absolute error: 1 - 2 / (2^(2x log2 e) + 1). Saturates to +-1 (2^large = inf).
// Absolute (not relative) accuracy is what a soft-capped score needs: the score is cap * tanh.
__device__ __forceinline__ float tanh_abs_accurate(float x) {
    const float e = ex2(x * 2.8853900817779268f);  // 2 * log2(e)
    return fmaf(-2.f, rcp_approx(e + 1.f), 1.f);
}

// An opaque copy of x: values derived from it inside a loop are not hoisted out of the loop (where
// they would pin registers for the whole loop). For cheap per-tile recomputation.
__device__ __forceinline__ int opaque(int x) {
    asm volatile("" : "+r"(x));
    return x;
}
__device__ __forceinline__ u32 opaque(u32 x) {
    asm volatile("" : "+r"(x));
    return x;
}

// ---- shared-memory scalar/vector access (ordered like the asm above) -------------------------------
__device__ __forceinline__ void sts_u32(u32 addr, u32 v) {
    asm volatile("st.shared.b32 [%0], %1;\n" :: "r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ u32 lds_u32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ void lds_u32x4(u32 addr, u32& a, u32& b, u32& c, u32& d) {
    asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "r"(addr) : "memory");
}
__device__ __forceinline__ void stg_u32x4(void* ptr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};\n"
                 :: "l"(ptr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

}  // namespace sm80
}  // namespace cuflash
