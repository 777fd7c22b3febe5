#!/usr/bin/env python3
"""Probe: fp32 reduction throughput into global memory on this GPU, the backward's dQ pattern (64 rows x 256
floats = 64 KB per block and step) by three means: per-thread red.global.add.v4.f32 in the bwd_sm90.cu
fragment pattern, one cp.reduce.async.bulk (TMA bulk reduce-add from shared memory) of the 64 KB, and
plain st.global.v4 (no reduction) for reference. Blocks of the same region index reduce into the same
64 KB (``regions`` of them: contention as when the key blocks of one head meet on the same rows)."""
import sys

import cupy as cp

SRC = r"""
extern "C" __global__ void __launch_bounds__(256) red_v4(float* dst, int regions, int iters) {
    const int t = threadIdx.x, cw = t >> 7, warp = (t >> 5) & 3, lane = t & 31, odd = lane & 1;
    const int row = 16 * warp + (lane >> 2) + (odd ? 8 : 0);
    for (int i = 0; i < iters; ++i) {
        float* base = dst + (size_t)((blockIdx.x + i) % regions) * 64 * 256 + row * 256 + cw * 128 + 4 * ((lane & 3) >> 1);
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
            asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(base + 8 * nt), "f"(1.f), "f"(1.f), "f"(1.f), "f"(1.f) : "memory");
    }
}
extern "C" __global__ void __launch_bounds__(256) st_v4(float* dst, int regions, int iters) {
    const int t = threadIdx.x, cw = t >> 7, warp = (t >> 5) & 3, lane = t & 31, odd = lane & 1;
    const int row = 16 * warp + (lane >> 2) + (odd ? 8 : 0);
    for (int i = 0; i < iters; ++i) {
        float* base = dst + (size_t)((blockIdx.x + i) % regions) * 64 * 256 + row * 256 + cw * 128 + 4 * ((lane & 3) >> 1);
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
            asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(base + 8 * nt), "f"(1.f), "f"(1.f), "f"(1.f), "f"(1.f) : "memory");
    }
}
extern "C" __global__ void __launch_bounds__(256) red_bulk(float* dst, int regions, int iters, int chunk) {
    extern __shared__ __align__(128) float buf[];
    for (int i = threadIdx.x; i < 64 * 256; i += blockDim.x) buf[i] = 1.f;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (threadIdx.x < 32) {
        const unsigned s = (unsigned)__cvta_generic_to_shared(buf);
        const int n = 65536 / chunk;
        for (int i = 0; i < iters; ++i) {
            float* base = dst + (size_t)((blockIdx.x + i) % regions) * 64 * 256;
            for (int c = threadIdx.x; c < n; c += 32)
                asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                             :: "l"((char*)base + c * chunk), "r"(s + c * chunk), "r"(chunk) : "memory");
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        }
        asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
}
"""


def main():
    mod = cp.RawModule(code=SRC, options=("-arch=sm_90a", "-std=c++17"))
    k_red, k_st, k_bulk = (mod.get_function(n) for n in ("red_v4", "st_v4", "red_bulk"))
    k_bulk.max_dynamic_shared_size_bytes = 65536
    blocks, iters = 132 * 2, 200
    for regions in (8, 64, 1024):
        dst = cp.zeros(regions * 64 * 256, cp.float32)
        res = {}
        for name, fn in (("red.v4", lambda: k_red((blocks,), (256,), (dst, cp.int32(regions), cp.int32(iters)))),
                         ("st.v4", lambda: k_st((blocks,), (256,), (dst, cp.int32(regions), cp.int32(iters)))),
                         ("bulk64K", lambda: k_bulk((blocks,), (256,), (dst, cp.int32(regions), cp.int32(iters), cp.int32(65536)), shared_mem=65536)),
                         ("bulk1K", lambda: k_bulk((blocks,), (256,), (dst, cp.int32(regions), cp.int32(iters), cp.int32(1024)), shared_mem=65536)),
                         ("bulk512", lambda: k_bulk((blocks,), (256,), (dst, cp.int32(regions), cp.int32(iters), cp.int32(512)), shared_mem=65536))):
            fn()
            cp.cuda.Device().synchronize()
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            for _ in range(5):
                fn()
            e1.record()
            e1.synchronize()
            ms = cp.cuda.get_elapsed_time(e0, e1) / 5
            res[name] = blocks * iters * 65536 / (ms * 1e-3) / 1e12
        print(f"regions={regions}: " + "  ".join(f"{k} {v:.2f} TB/s" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
