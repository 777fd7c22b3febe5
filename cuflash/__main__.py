"""``python -m cuflash demo | info | bench | precompile``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def demo(args) -> int:
    import cuflash

    rng = np.random.default_rng()
    b, s, h, d = args.batch, args.seqlen, args.nheads, args.headdim
    qn, kn, vn = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    ref, ref_lse = cuflash.reference.attention(qn, kn, vn, causal=args.causal, return_lse=True)
    if _gpu_available():
        import cupy

        from cuflash import _compile

        dev = cupy.cuda.Device()
        name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
        dtype = {"fp16": np.float16, "bf16": cuflash._interop.BFLOAT16, "fp32": np.float32}[args.dtype]
        q, k, v = (cupy.asarray(x.astype(dtype)) for x in (qn, kn, vn))
        t0 = time.perf_counter()
        out = cuflash.attention(q, k, v, causal=args.causal)
        cupy.cuda.get_current_stream().synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(10):
            out = cuflash.attention(q, k, v, causal=args.causal)
        cupy.cuda.get_current_stream().synchronize()
        warm = (time.perf_counter() - t0) / 10
        err = _rel_err(cupy.asnumpy(out).astype(np.float32), ref)
        print(f"ran on GPU: {name} ({_compile.device_arch(dev.id)}), CuPy {args.dtype}, "
              f"shape (batch, seqlen, nheads, headdim) = {(b, s, h, d)}, causal={args.causal}")
        print(f"relative error vs float64 reference: {err:.2e}")
        print(f"first call (compile or cache load included): {first * 1e3:.1f} ms; warm call: {warm * 1e3:.3f} ms")
        ok = err < {"fp16": 1e-2, "bf16": 3e-2, "fp32": 1e-4}[args.dtype]
    else:
        t0 = time.perf_counter()
        out = cuflash.attention(qn, kn, vn, causal=args.causal)
        dt = time.perf_counter() - t0
        err = _rel_err(out, ref)
        print(f"no GPU found: ran the NumPy float64 reference on the CPU, shape {(b, s, h, d)}, causal={args.causal}")
        print(f"relative error vs the naive reference: {_rel_err(out, cuflash.reference.attention_naive(qn, kn, vn, causal=args.causal)):.2e}")
        print(f"time: {dt * 1e3:.1f} ms")
        ok = err < 1e-6
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def info(args) -> int:
    import cuflash
    from cuflash import _compile

    print(f"cuflash {cuflash.__version__}  (kernels: {_compile.kernel_dir()})")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}")
    try:
        import cupy

        print(f"cupy {cupy.__version__}")
        try:
            print(f"nvrtc {'.'.join(map(str, _compile.nvrtc_version()))}, targets sm_{min(_compile.supported_archs())}"
                  f"..sm_{max(_compile.supported_archs())}")
        except Exception as e:
            print(f"nvrtc: not available ({e})")
        if _gpu_available():
            for i in range(cupy.cuda.runtime.getDeviceCount()):
                p = cupy.cuda.runtime.getDeviceProperties(i)
                print(f"GPU {i}: {p['name'].decode()}, compute capability {p['major']}.{p['minor']}, "
                      f"{p['multiProcessorCount']} SMs, {p['totalGlobalMem'] / 2**30:.0f} GiB, "
                      f"arch {_compile.device_arch(i)}")
        else:
            print("GPU: none (NumPy inputs run on the CPU reference; kernels can still be precompiled)")
    except ImportError:
        print("cupy: not installed (CPU reference only; pip install 'cuflash[cuda13]' for GPUs)")
    for fw in ("torch", "jax"):
        print(f"{fw}: {'importable' if importlib.util.find_spec(fw) else 'not installed'}")
    entries = _compile.cached_entries()
    print(f"kernel cache: {_compile.cache_dir()} ({len(entries)} entries)")
    for e in entries[: args.max_entries]:
        print(f"  {e['arch']:8s} {e['file']:18s} {', '.join(e['kernels'])}  ({e['seconds']} s to compile)")
    if len(entries) > args.max_entries:
        print(f"  ... {len(entries) - args.max_entries} more")
    return 0


def bench(argv) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "benchmarks", "bench_attention.py"),):
        if os.path.isfile(cand):
            spec = importlib.util.spec_from_file_location("bench_attention", cand)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod.main(argv) or 0
    print("the benchmark lives in benchmarks/bench_attention.py of a source checkout", file=sys.stderr)
    return 2


def precompile(args) -> int:
    import cuflash

    archs = tuple(args.arch) if args.arch else None
    n = cuflash.precompile(archs, dtypes=args.dtype or None)
    print(f"{n} kernel variants compiled or found in the cache")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m cuflash")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run attention once, check it against the reference")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--nheads", type=int, default=16)
    d.add_argument("--headdim", type=int, default=64)
    d.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    d.add_argument("--causal", action="store_true")
    i = sub.add_parser("info", help="GPU, CuPy/NVRTC versions, kernel cache, frameworks")
    i.add_argument("--max-entries", type=int, default=20)
    sub.add_parser("bench", help="benchmarks/bench_attention.py (source checkout)")
    p = sub.add_parser("precompile", help="compile kernels into the cache ahead of time")
    p.add_argument("--arch", action="append", help="e.g. sm_90a (repeatable); default: this GPU's")
    p.add_argument("--dtype", action="append", help="restrict to C++ types, e.g. bf16_t (repeatable)")
    args = ap.parse_args(argv)
    return {"demo": demo, "info": info, "precompile": precompile}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
