// sm90.cuh: Hopper primitives for fwd_sm90.cu, each one PTX instruction (sm_90a).
//
//   * TmaDesc: the 128-byte CUtensorMap, encoded on the host (cuflash/_tma.py, cuTensorMapEncodeTiled)
//     and passed inside a __grid_constant__ kernel parameter; TMA instructions take its generic address.
//   * mbarrier: init / arrive / arrive.expect_tx / try_wait.parity (transaction-counted barriers that
//     TMA loads complete).
//   * TMA: 4-D tiled loads (global -> shared, completing on an mbarrier) and stores (shared -> global,
//     bulk groups).
//   * wgmma: fence / commit_group / wait_group, shared-memory matrix descriptors (128-byte swizzle),
//     and an empty asm that pins accumulator registers in order around asynchronous MMAs.
//   * setmaxnreg and named barriers (bar.sync / bar.arrive with a thread count).
#pragma once
#include "types.cuh"

namespace cuflash {
namespace sm90 {

struct __align__(64) TmaDesc {
    u64 words[16];
};

// ---- mbarrier -----------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// One arrival that also announces `bytes` of TMA transactions for the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Blocks until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_AGAIN:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_AGAIN;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// ---- TMA ------------------------------------------------------------------------------------------
// Box of the tensor map at coordinates (c0 innermost .. c3) into shared memory at `dst`; its bytes
// complete a transaction on `bar`. Out-of-bounds elements are filled with zeros.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc* map, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];"
        ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
// Shared memory at `src` into the box at (c0 .. c3); out-of-bounds elements are not written.
__device__ __forceinline__ void tma_store_4d(const TmaDesc* map, int c0, int c1, int c2, int c3, u32 src) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];"
                 ::"l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(src)
                 : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Waits until the committed stores have finished reading shared memory.
__device__ __forceinline__ void tma_store_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
// The problem scalars a producer thread re-reads per tile (volatile, from shared memory: a volatile read
// of the __grid_constant__ parameter itself was miscompiled by NVRTC 13.0): seqlen_q, seqlen_k, nheads,
// nheads_k, batch, window_left, window_right.
template <class P>
__device__ __forceinline__ void store_shape(int (&shape)[7], const P& p) {
    shape[0] = p.seqlen_q;
    shape[1] = p.seqlen_k;
    shape[2] = p.nheads;
    shape[3] = p.nheads_k;
    shape[4] = p.batch;
    shape[5] = p.window_left;
    shape[6] = p.window_right;
}

__device__ __forceinline__ void prefetch_tma_desc(const TmaDesc* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
}
// Orders this thread's ordinary shared-memory writes before later async-proxy (TMA, wgmma) reads.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// ---- wgmma ----------------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of these registers across an asynchronous MMA.
template <int N>
__device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(u32* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Ends the basic block on a branch that depends on `x` (never taken: x is a sum of exponentials, >= 0 or
// NaN), so that ptxas cannot schedule what follows (a wgmma wait) above the code that computes x.
__device__ __forceinline__ void block_boundary_after(float x) {
    if (__any_sync(0xffffffffu, x < 0.f)) __trap();
}

// Shared-memory matrix descriptor, 128-byte swizzle (mode 1 in bits 62-63). `addr` is the shared
// address of the first element; lbo / sbo are the leading / stride byte offsets (PTX ISA, "Matrix
// Descriptor Format"). The swizzle atoms (8 rows x 128 bytes) must start on 1024-byte boundaries.
__device__ __forceinline__ u64 smem_desc_sw128(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFFu) >> 4) << 32) | (1ull << 62);
}

// ---- registers and barriers -----------------------------------------------------------------------
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace sm90
}  // namespace cuflash
