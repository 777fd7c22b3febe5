"""Forward throughput of cuflash's paths side by side, with the torch SDPA peers, in one process.

    python benchmarks/bench_paths.py [--headdims 64,128,256] [--seqlens 512,1k,...] [--variants]

Rows: cuflash on each path it has on this GPU (sm90: wgmma + TMA; sm80: mma.sync; with --portable the
fp32 portable kernels too; the dispatcher is steered with CUFLASH_DISABLE_SM90 / _SM80 and a cleared plan
cache), torch SDPA flash (FlashAttention-2) and
cuDNN. ``--variants`` adds sm90 tile / technique variants (e.g. ping-pong off) for benchmarks/NOTES.md.
FlashAttention's convention (PERF.md): bf16, batch x seqlen = 16k tokens, hidden 2048, TFLOP/s =
4 B H S^2 D (halved for causal) / median time (triton.testing.do_bench, CUDA events). Each cuflash
result is checked against torch's flash output (max abs difference printed in the CSV).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_sizes(s: str) -> list[int]:
    return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headdims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1k,2k,4k,8k,16k")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", action="store_true", help="also time sm90 technique variants")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=DICT",
                    help="extra sm90 variant: LABEL={bucket: Sm90Tile(...), 'wide': {bucket: Sm90Tile(...)}} "
                         "(Sm90Tile and replace in scope); repeatable")
    ap.add_argument("--portable", action="store_true",
                    help="also time the portable path (fp32 math, no tensor cores; the sm90 and sm80 paths "
                         "turned off for that row)")
    ap.add_argument("--rep", type=int, default=60)
    ap.add_argument("--outdir", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import cuflash
    from cuflash import _api, _launch_sm90

    dt = getattr(torch, args.dtype)
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    print(f"# {name}, capability {cap}, torch {torch.__version__}, {args.dtype}")
    tiles0 = dict(_launch_sm90.SM90_FORWARD_TILES)
    variants = {}
    if args.variants:
        variants = {
            "sm90-1blk-per-tile": {d: replace(t, persist=False) for d, t in tiles0.items()},
            "sm90-persist": {d: replace(t, persist=True) for d, t in tiles0.items() if d == 192},
            "sm90-3wg": {64: replace(tiles0[64], consumers=3, persist=True, sched=2)},
            "sm90-3wg-overlap": {64: replace(tiles0[64], consumers=3, persist=True, sched=1)},
            "sm90-overlap": {d: replace(t, sched=1) for d, t in tiles0.items()},
            "sm90-batched": {d: replace(t, sched=2) for d, t in tiles0.items()},
        }
    for spec in args.extra:
        label, _, expr = spec.partition("=")
        variants[label] = eval(expr, {"Sm90Tile": _launch_sm90.Sm90Tile, "replace": replace})  # noqa: S307
    wide0 = dict(_launch_sm90.SM90_WIDE_TILES)
    rows = []
    for hd in parse_sizes(args.headdims):
        h = 2048 // hd
        for causal in [bool(int(c)) for c in args.causal.split(",")]:
            for s in parse_sizes(args.seqlens):
                b = max(1, 16384 // s)
                q, k, v = (torch.randn(b, s, h, hd, device="cuda", dtype=dt) for _ in range(3))
                flops = 4 * b * h * s * s * hd / (2 if causal else 1)
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                res = {}
                ref = None
                for impl, backend in (("torch-fa2", SDPBackend.FLASH_ATTENTION),
                                      ("torch-cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)  # noqa: E731
                            o = fn()
                            if impl == "torch-fa2":
                                ref = o.transpose(1, 2)
                            res[impl] = (do_bench(fn, warmup=25, rep=args.rep, return_mode="median"), None)
                    except Exception as e:  # a missing backend is reported, not fatal
                        res[impl] = (None, f"{type(e).__name__}: {str(e)[:80]}")

                def run_cuflash(label, disable_sm90, tiles=None, portable=False):
                    os.environ["CUFLASH_DISABLE_SM90"] = "1" if disable_sm90 else "0"
                    os.environ["CUFLASH_DISABLE_SM80"] = "1" if portable else "0"
                    if tiles is not None:  # the variant's tiles over the table's
                        tiles = dict(tiles)
                        _launch_sm90.SM90_WIDE_TILES.update(tiles.pop("wide", {}))
                        _launch_sm90.SM90_FORWARD_TILES.update(tiles)
                    _api.clear_plan_cache()
                    try:
                        fn = lambda: cuflash.attention(q, k, v, causal=causal)  # noqa: E731
                        o = fn()
                        err = None if ref is None else float((o.float() - ref.float()).abs().max())
                        res[label] = (do_bench(fn, warmup=25, rep=args.rep, return_mode="median"), err)
                    except Exception as e:
                        res[label] = (None, f"{type(e).__name__}: {str(e)[:80]}")
                    finally:
                        _launch_sm90.SM90_FORWARD_TILES.clear()
                        _launch_sm90.SM90_FORWARD_TILES.update(tiles0)
                        _launch_sm90.SM90_WIDE_TILES.clear()
                        _launch_sm90.SM90_WIDE_TILES.update(wide0)

                run_cuflash("cuflash", False)
                if args.portable:
                    run_cuflash("cuflash-portable", True, portable=True)
                if cap == (9, 0):
                    run_cuflash("cuflash-sm80", True)
                    for label, tiles in variants.items():
                        bucket = _launch_sm90.tile_for(hd).headdim_bucket
                        wide = tiles.get("wide", {})
                        if (bucket in tiles and tiles[bucket] != tiles0[bucket]) or \
                                (bucket in wide and wide[bucket] != wide0.get(bucket)):
                            run_cuflash(label, False, tiles)
                os.environ.pop("CUFLASH_DISABLE_SM90", None)
                os.environ.pop("CUFLASH_DISABLE_SM80", None)
                _api.clear_plan_cache()
                for impl, (ms, note) in res.items():
                    rows.append({"headdim": hd, "causal": int(causal), "seqlen": s, "batch": b, "nheads": h,
                                 "impl": impl, "ms": ms, "tflops": flops / ms / 1e9 if ms else None,
                                 "note": note})
                torch.cuda.empty_cache()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_paths.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    print(f"{'hd':>4} {'c':>2} {'seqlen':>6} " + " ".join(f"{i:>13}" for i in impls) + "   cf/fa2 cf/cudnn")
    idx = {(r["headdim"], r["causal"], r["seqlen"], r["impl"]): r for r in rows}
    keys = sorted({(r["headdim"], r["causal"], r["seqlen"]) for r in rows})
    r_fa2, r_cudnn = [], []
    for key in keys:
        vals = [idx.get(key + (i,), {}).get("tflops") for i in impls]
        line = f"{key[0]:>4} {key[1]:>2} {key[2]:>6} " + " ".join(f"{x:>13.1f}" if x else f"{'n/a':>13}" for x in vals)
        cf = idx.get(key + ("cuflash",), {}).get("tflops")
        fa = idx.get(key + ("torch-fa2",), {}).get("tflops")
        cd = idx.get(key + ("torch-cudnn",), {}).get("tflops")
        if cf and fa:
            r_fa2.append(cf / fa)
        if cf and cd:
            r_cudnn.append(cf / cd)
        line += f"   {cf / fa if cf and fa else float('nan'):6.2f} {cf / cd if cf and cd else float('nan'):6.2f}"
        print(line)
    for label, rs in (("cuflash/torch-fa2", r_fa2), ("cuflash/torch-cudnn", r_cudnn)):
        if rs:
            rs = sorted(rs)
            print(f"{label}: median {rs[len(rs) // 2]:.3f}, min {rs[0]:.3f} over {len(rs)} cells")
    errs = [r for r in rows if r["impl"].startswith("cuflash") and r["note"] is not None]
    bad = [r for r in errs if isinstance(r["note"], str) or r["note"] > 0.05]
    print(f"cuflash outputs vs torch-fa2: {len(errs) - len(bad)} ok, {len(bad)} bad"
          + "".join(f"\n  BAD {r['impl']} hd{r['headdim']} c{r['causal']} s{r['seqlen']}: {r['note']}" for r in bad))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
