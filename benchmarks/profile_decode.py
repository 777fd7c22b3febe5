#!/usr/bin/env python3
"""Where the time of a decode call goes: GPU kernel durations and gaps from a torch.profiler trace.

    python benchmarks/profile_decode.py --outdir OUT [--batches 1,8] [--seqlens 4k,32k] [--splits 0,8,16]

The decode benchmark's shape (seqlen_q 1, 32 query / 8 kv heads, d128, bf16). For every cell and
implementation (cuflash with each ``num_splits``, torch SDPA's FA2 and cuDNN backends) it runs
``--calls`` calls, each after a 256 MiB L2 flush, under torch.profiler, and reads the Chrome trace:
per call, the sum of kernel durations and the span from the first kernel's start to the last one's
end (gaps between a call's kernels included). It also prints do_bench's median (what
bench_attention.py reports) so that the two can be compared. GB/s uses the K + V bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADS, KV_HEADS, D = 32, 8, 128


def parse_sizes(s: str) -> list[int]:
    return [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in s.split(",") if x]


def parse_env_variant(spec: str) -> tuple[str, dict]:
    label, _, rest = spec.partition(":")
    return label, dict(kv.split("=", 1) for kv in rest.split("+") if kv)


def set_env(name: str, value: str) -> bool:
    """Set (or, for "default", unset) an environment variable; whether it changed."""
    if os.environ.get(name, "default") == value:
        return False
    if value == "default":
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    return True


def kernels_of(trace_path: str) -> list[tuple[float, float, str]]:
    with open(trace_path) as f:
        tr = json.load(f)
    out = []
    for e in tr.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"):
            out.append((float(e["ts"]), float(e["dur"]), e.get("name", "?")))
    out.sort()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,8")
    ap.add_argument("--seqlens", default="4k,16k,128k")
    ap.add_argument("--splits", default="0", help="cuflash num_splits values (0 = heuristic)")
    ap.add_argument("--tiles", default="default", help="CUFLASH_DECODE_TILE values ('default': the dispatcher's)")
    ap.add_argument("--clusters", default="default",
                    help="CUFLASH_DECODE_CLUSTER values ('default': the dispatcher's; 0: split-KV through "
                         "fwd_combine, no cluster merge)")
    ap.add_argument("--env-variant", action="append", default=[],
                    help="LABEL:NAME=VALUE[+NAME=VALUE...]: also time cuflash with these environment variables "
                         "(tuning knobs such as CUFLASH_DECODE_CLUSTER_POLICY); repeatable")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--outdir", default=".")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--floor", action="store_true",
                    help="also time plain reads of the same K and V bytes (read_floor kernels: 128-bit loads, "
                         "no math; blocks = SMs x 1..8) and a device-to-device copy of them: the floor")
    ap.add_argument("--flush", default="memset,read",
                    help="L2 flush before each call: memset (zero_ of 256 MiB: leaves L2 dirty, as do_bench), "
                         "read (a sum over 256 MiB: L2 full of clean lines), none")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    import cuflash
    from cuflash import _api

    os.makedirs(args.outdir, exist_ok=True)
    dev = torch.cuda.get_device_properties(0)
    print(f"# {dev.name}, {dev.multi_processor_count} SMs")
    flush_buf = torch.zeros(64 << 20, dtype=torch.float32, device="cuda")
    flushers = {"memset": lambda: flush_buf.zero_(), "read": lambda: flush_buf.sum(),
                "none": lambda: None}
    flush_modes = [m for m in args.flush.split(",") if m]
    rows = []
    for b in parse_sizes(args.batches):
        for sk in parse_sizes(args.seqlens):
            g = torch.Generator(device="cuda").manual_seed(b * 7 + sk)
            q = torch.randn(b, 1, HEADS, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(b, sk, KV_HEADS, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(b, sk, KV_HEADS, D, device="cuda", dtype=torch.bfloat16, generator=g)
            nbytes = 2 * k.numel() * 2
            impls = []
            env_variants = [("", {})] + [parse_env_variant(x) for x in args.env_variant]
            env_names = {n for _, d in env_variants for n in d}
            for tile in [t for t in args.tiles.split(",") if t]:
                for cl in [c for c in args.clusters.split(",") if c]:
                    for lbl, envs in env_variants if cl == "default" else env_variants[:1]:
                        for s in [int(x) for x in args.splits.split(",")]:
                            def fn(s=s, tile=tile, cl=cl, envs=envs):
                                changed = set_env("CUFLASH_DECODE_TILE", tile) | set_env("CUFLASH_DECODE_CLUSTER", cl)
                                for n in env_names:
                                    changed |= set_env(n, envs.get(n, "default"))
                                if changed:
                                    _api.clear_plan_cache()
                                return cuflash.attention(q, k, v, num_splits=s)
                            impls.append((f"cf s{s}" + ("" if tile == "default" else f" {tile}")
                                          + ("" if cl == "default" else " nocluster") + (f" {lbl}" if lbl else ""), fn))
            if not args.no_peers:
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                for name, be in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def fn(be=be):
                        with sdpa_kernel([be]):
                            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                    impls.append((name, fn))
            if args.floor:
                impls += floor_impls(torch, k, v)
            for name, fn in impls:
                try:
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001
                    print(f"b{b} sk{sk} {name}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                ms = do_bench(fn, rep=50, return_mode="median")
                for fm in flush_modes:
                    self_row = profile_one(torch, profile, ProfilerActivity, fn, flushers[fm], args.calls)
                    if self_row is None:
                        print(f"b{b} sk{sk} {name} flush={fm}: no kernels in the trace")
                        continue
                    calls = self_row
                    report(rows, b, sk, name, fm, ms, calls, nbytes)
            del q, k, v
            torch.cuda.empty_cache()
    with open(os.path.join(args.outdir, "profile_decode.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| cell | impl | flush | do_bench us | GPU span us | kernel sum us | GB/s (span) | % copy (span) |")
    for r in rows:
        print(f"| b{r['batch']} {r['seqlen_k'] // 1024}k | {r['impl']} | {r['flush']} | {r['do_bench_us']:.1f} | "
              f"{r['span_us']:.1f} | {r['kern_sum_us']:.1f} | {r['gbps_span']:.0f} | "
              f"{100 * r['gbps_span'] / COPY_GBPS:.0f}% |")
    return 0


COPY_GBPS = 3033.0   # H100 device-to-device copy bandwidth measured by bench_attention.py (session 4)


READ_FLOOR_SRC = r"""
extern "C" __global__ void read_floor(const uint4* __restrict__ a, const uint4* __restrict__ b, long long n4,
                                      unsigned* out) {
    // Every 16-byte word of a and b once, four loads in flight per thread; the xor keeps them live.
    unsigned acc = 0u;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (int t = 0; t < 2; ++t) {
        const uint4* p = t == 0 ? a : b;
        long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        for (; i + 3 * stride < n4; i += 4 * stride) {
            const uint4 x0 = p[i], x1 = p[i + stride], x2 = p[i + 2 * stride], x3 = p[i + 3 * stride];
            acc ^= x0.x ^ x0.y ^ x0.z ^ x0.w ^ x1.x ^ x1.y ^ x1.z ^ x1.w ^ x2.x ^ x2.y ^ x2.z ^ x2.w ^
                   x3.x ^ x3.y ^ x3.z ^ x3.w;
        }
        for (; i < n4; i += stride) acc ^= p[i].x ^ p[i].y ^ p[i].z ^ p[i].w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;  // (practically never: no store traffic)
}
"""


def floor_impls(torch, k, v):
    """Plain reads of k and v (the decode call's bytes) at several grid sizes, and a copy of them."""
    import cupy

    kern = cupy.RawKernel(READ_FLOOR_SRC, "read_floor")
    ka, va = cupy.asarray(k).view(cupy.uint8), cupy.asarray(v).view(cupy.uint8)
    n4 = ka.size // 16
    out = cupy.zeros(1, cupy.uint32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    impls = []
    for mult in (1, 2, 4, 8):
        def fn(mult=mult):
            kern((sms * mult,), (512,), (ka, va, cupy.int64(n4), out))
        impls.append((f"read x{mult}", fn))
    kc, vc = torch.empty_like(k), torch.empty_like(v)
    impls.append(("copy", lambda: (kc.copy_(k), vc.copy_(v))))
    return impls


def profile_one(torch, profile, ProfilerActivity, fn, flush, n):
    """Kernels of n calls, each after `flush`, queued behind a GPU sleep so that the host's launch
    spacing does not show (the GPU runs them back to back): a list of per-call kernel lists."""
    import tempfile

    marker = torch.empty(1 << 20, dtype=torch.int8, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(50_000_000)   # ~25 ms at 2 GHz: the host queues everything meanwhile
        for _ in range(n):
            flush()
            marker.fill_(1)             # a tiny kernel separating the flush from the call
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as t:
        prof.export_chrome_trace(t.name)
        ev = kernels_of(t.name)
    calls, cur = [], None
    for i, (ts, dur, nm) in enumerate(ev):
        if "fill" in nm.lower() and "cuflash" not in nm and dur < 10 and i > 0:
            if cur:
                calls.append(cur)
            cur = []
        elif cur is not None:
            if "reduce" in nm.lower() or ("fill" in nm.lower() and "cuflash" not in nm) or "sleep" in nm.lower():
                calls.append(cur)   # the next flush ends this call
                cur = None
            else:
                cur.append((ts, dur, nm))
    if cur:
        calls.append(cur)
    calls = [c for c in calls if c]
    return calls or None


def report(rows, b, sk, name, fm, ms, calls, nbytes):
    sums = [sum(d for _, d, _ in c) for c in calls]
    spans = [c[-1][0] + c[-1][1] - c[0][0] for c in calls]
    per_kernel = {}
    for c in calls:
        for _, d, nm in c:
            per_kernel.setdefault(nm[:60], []).append(d)
    span = statistics.median(spans)
    row = dict(batch=b, seqlen_k=sk, impl=name, flush=fm, do_bench_us=ms * 1e3,
               kern_sum_us=statistics.median(sums), span_us=span, n_kernels=len(calls[0]),
               gbps_span=nbytes / (span * 1e-6) / 1e9, gbps_do_bench=nbytes / (ms * 1e-3) / 1e9)
    rows.append(row)
    kinfo = "; ".join(f"{k[:40]} {statistics.median(v):.1f}" for k, v in per_kernel.items())
    print(f"b{b} sk{sk:>6} {name:<12} {fm:<6} do_bench {ms * 1e3:7.1f} us  span {span:7.1f}  "
          f"sum {row['kern_sum_us']:7.1f}  [{kinfo}]", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
