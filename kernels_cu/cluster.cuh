// cluster.cuh: thread-block cluster primitives (sm_90+), one PTX instruction each: the cluster barrier,
// this block's rank, distributed shared-memory addresses and the loads / mbarrier arrivals through them.
// Used by the decode kernel's in-cluster split-KV merge (fwd_decode.cu) and the Hopper forward's K / V
// multicast (fwd_sm90.cu).
#pragma once
#include "types.cuh"

namespace cuflash {
namespace cluster {

// Every thread of every block of the cluster (.aligned: the whole warp executes it together).
__device__ __forceinline__ void sync_all() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The same for threads that may arrive from divergent paths (no .aligned).
__device__ __forceinline__ void sync_all_unconverged() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
__device__ __forceinline__ u32 rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// The shared::cluster address of `addr` (this block's shared window) in the block of rank `r`.
__device__ __forceinline__ u32 map_rank(u32 addr, u32 r) {
    u32 a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(addr), "r"(r));
    return a;
}
__device__ __forceinline__ float ld_f32(u32 addr) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
    return v;
}
__device__ __forceinline__ float4 ld_f32x4(u32 addr) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
    return v;
}
// One arrival on an mbarrier of another block of the cluster (`addr` from map_rank), ordered after this
// thread's earlier memory accesses for the cluster.
__device__ __forceinline__ void mbar_arrive(u32 addr) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(addr) : "memory");
}

}  // namespace cluster
}  // namespace cuflash
