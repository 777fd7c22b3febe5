#!/usr/bin/env python3
"""Re-draw the plots of ``bench_attention.py`` (and ``bench_paths.py``) from their CSV files (no GPU needed).

    python benchmarks/plot.py bench_out/bench_results.csv                 # attention_hd{64,128,256}.png
    python benchmarks/plot.py bench_out/bench_results_decode.csv          # decode.png
    python benchmarks/plot.py run1/bench_results.csv --outdir figs --prefix run1
    python benchmarks/plot.py bench_out/bench_paths.csv                   # fwd_paths_hd{64,128,256}.png

Grid CSV: one PNG per head dim (TFLOP/s vs seqlen, a panel per mode, solid = non-causal,
dashed = causal). Decode CSV: achieved GB/s vs seqlen_k per batch size, with the device copy
bandwidth from the run's ``*_meta.json`` when it is there (or ``--copy-gbps``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402


def _copy_gbps(csv_path):
    stem = os.path.splitext(csv_path)[0]
    if stem.endswith("_decode"):
        stem = stem[: -len("_decode")]
    try:
        with open(stem + "_meta.json") as f:
            return json.load(f).get("copy_gbps")
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot bench_attention.py CSV results.")
    p.add_argument("csv", nargs="+", help="bench_results.csv and/or bench_results_decode.csv")
    p.add_argument("--outdir", default=None, help="default: the CSV's directory")
    p.add_argument("--prefix", default=None, help="file name prefix (default attention / decode)")
    p.add_argument("--copy-gbps", type=float, default=None, help="device copy bandwidth line for decode plots")
    args = p.parse_args(argv)
    status = 0
    for path in args.csv:
        rows = ba.load_csv(path)
        outdir = args.outdir or os.path.dirname(os.path.abspath(path))
        os.makedirs(outdir, exist_ok=True)
        if not rows:
            print(f"{path}: no rows")
            status = 1
        elif "mode" not in rows[0] and "impl" in rows[0] and "tflops" in rows[0]:  # bench_paths.py (forward)
            for r in rows:
                r.update(mode="fwd", dtype="bf16", status="ok" if r.get("tflops") else "error")
            files = ba.plot_grid(rows, outdir, prefix=args.prefix or "fwd_paths")
            print(f"{path}: " + ", ".join(files))
        elif "mode" in rows[0]:
            files = ba.plot_grid(rows, outdir, prefix=args.prefix or "attention")
            print(f"{path}: " + ", ".join(files))
        elif "seqlen_k" in rows[0]:
            files = ba.plot_decode(rows, outdir, args.copy_gbps or _copy_gbps(path), prefix=args.prefix or "decode")
            print(f"{path}: " + ", ".join(files))
        else:
            print(f"{path}: not a grid or decode CSV (memory results are a table only)")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
