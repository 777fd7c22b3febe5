"""Throughput of the dropout generator on this GPU (issue 6): Philox-4x32-10 calls per SM per clock, alone
and as philox.cuh's dropout_frag_keep (8 calls + the bit transposes of one 16 x 128 fragment pair), and of
the bare IMAD.WIDE + LOP3 pair a Philox round is made of. 8 blocks x 256 threads per SM, 4 independent
chains per thread; rates per SM clock assume the SMs run at the device's maximum clock throughout (a
lower clock would make the true per-clock rates higher).

    python benchmarks/probe_philox.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cupy as cp  # noqa: E402

from cuflash import _compile  # noqa: E402

SRC = _compile.build_source("philox.cuh") + r"""
using namespace cuflash;
extern "C" __global__ void philox_tp(u32* out, int n, unsigned long long seed) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    u32 acc = 0;
    for (int it = 0; it < n; ++it) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            Philox4 r = philox4x32_10(Philox4{(u32)(4 * it + k), t, 7u, 0u}, (u32)seed, (u32)(seed >> 32));
            acc += r.x ^ r.y ^ r.z ^ r.w;
        }
    }
    out[t] = acc;
}
extern "C" __global__ void frag_tp(u32* out, int n, unsigned long long seed) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    Params p{};
    p.seed = seed;
    p.nheads = 16;
    p.dropout_threshold = 6554u;
    u32 acc = 0;
    for (int it = 0; it < n; ++it) {
        DropoutFrag<2, 16> keep;
        dropout_frag_keep(p, 1, 128 * it, (int)(threadIdx.x & 31), [&](int ri, int& i, int& h) {
            i = (int)(t >> 5) * 16 + 8 * ri;
            h = 3;
        }, keep);
        acc += keep.w[0] ^ keep.w[1];
    }
    out[t] = acc;
}
extern "C" __global__ void imadw_tp(u32* out, int n, unsigned long long seed) {
    const u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    u32 x[4] = {t, t ^ 1u, t ^ 2u, t ^ 3u};
    for (int it = 0; it < n; ++it) {
#pragma unroll
        for (int r = 0; r < 10; ++r)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const unsigned long long w = (unsigned long long)x[k] * 0xD2511F53ull;
                x[k] = (u32)w ^ (u32)(w >> 32) ^ (u32)seed;
            }
    }
    out[t] = x[0] ^ x[1] ^ x[2] ^ x[3];
}
"""


def main():
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    mod = cp.RawModule(code=SRC, options=("-arch=sm_90a", "-std=c++17", "--use_fast_math"))
    blocks, threads, n = sms * 8, 256, 2048
    out = cp.zeros(blocks * threads, dtype=cp.uint32)
    ghz = dev.attributes["ClockRate"] / 1e6  # kHz -> GHz
    # per thread and iteration: Philox calls, IMAD.WIDE (a Philox call has 20)
    work = {"philox_tp": (4, 80), "frag_tp": (8, 160), "imadw_tp": (2, 40)}
    print(f"# {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {sms} SMs, {blocks} x {threads} threads, n={n}")
    for name, (calls, imadw) in work.items():
        f = mod.get_function(name)
        for _ in range(2):
            f((blocks,), (threads,), (out, cp.int32(n), cp.uint64(0x1234567887654321)))
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        f((blocks,), (threads,), (out, cp.int32(n), cp.uint64(0x1234567887654321)))
        e1.record()
        e1.synchronize()
        ms = cp.cuda.get_elapsed_time(e0, e1)
        tot_clk = ms * 1e-3 * ghz * 1e9 * sms  # SM-clocks
        th = blocks * threads * n
        print(f"{name:10s} {ms:8.3f} ms  clock {ghz:.2f} GHz  Philox-equivalent calls/SM/clk "
              f"{th * calls / tot_clk:6.3f}  IMAD.WIDE/SM/clk {th * imadw / tot_clk:6.1f}")


if __name__ == "__main__":
    main()
