#!/usr/bin/env python3
"""Attention benchmark: cuflash against FlashAttention-2, cuDNN and memory-efficient attention.

Runs every implementation in the same process on the same GPU, with the FlashAttention paper's
convention (batch x seqlen = 16k tokens, hidden 2048 = nheads x headdim, FLOPs = 4*B*H*Sq*Sk*D,
halved for causal, x2.5 for the backward) and prints one TFLOP/s table per (mode, causal, headdim),
then a compact summary LAST. Writes CSV files and PNG plots into --outdir.

    python benchmarks/bench_attention.py                 # full grid, fwd + bwd (~5 min on an H100)
    python benchmarks/bench_attention.py --quick         # smoke run: headdim 128, seqlen 1k and 4k
    python benchmarks/bench_attention.py --decode        # decode bandwidth (only that)
    python benchmarks/bench_attention.py --decode-compare   # decode, also with the decode path off
    python benchmarks/bench_attention.py --memory --latency
    python benchmarks/bench_attention.py --all           # grid + decode + memory + latency
    python benchmarks/bench_attention.py --dropout 0.1   # every implementation with dropout p=0.1
    python benchmarks/bench_attention.py --dropout-compare 0.1   # cuflash p=0 vs p=0.1, and vs FA2 at p=0.1
    python benchmarks/bench_attention.py --selftest      # no GPU needed: tables/CSV/plots on fake numbers

Importable: ``main(argv=None)`` returns an exit status (``python -m cuflash bench`` delegates here).
Implementations: cuflash (torch tensors), cuflash-cupy (--cupy: CuPy views of the same buffers),
torch-fa2 / torch-cudnn / torch-memeff (torch SDPA with one backend forced by sdpa_kernel, on
BHSD views ``x.transpose(1, 2)`` of the BSHD tensors) and jax-cudnn
(``jax.nn.dot_product_attention(..., implementation='cudnn')`` jitted, BSHD). Any implementation
that is missing or fails on a shape is reported with a line and shown as n/a. Variants: cuflash-det
(backward with ``deterministic=True``, bwd cells only, on by default: the summary's "deterministic
cost" = cuflash-det / cuflash), and with ``--dropout-compare P`` cuflash-drop / torch-fa2-drop (cuflash
and torch-fa2 at dropout P next to their p=0 rows), and with ``--decode-compare`` cuflash-nodecode (decode
cells only: cuflash with CUFLASH_DISABLE_DECODE=1, i.e. the sm80 path's packed-GQA split-KV forward,
next to the dedicated decode kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

# ---- conventions -------------------------------------------------------------------------------

TOKENS = 16384            # batch * seqlen
HIDDEN = 2048             # nheads * headdim
DEFAULT_HEADDIMS = (64, 128, 256)
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_HEADDIMS = (128,)
QUICK_SEQLENS = (1024, 4096)

IMPLS = ("cuflash", "cuflash-det", "cuflash-drop", "cuflash-cupy", "cuflash-nodecode", "cuflash-sm80",
         "cuflash-portable", "torch-fa2", "torch-fa2-drop", "torch-cudnn", "torch-memeff", "jax-cudnn")
DEFAULT_IMPLS = ("cuflash", "cuflash-det", "torch-fa2", "torch-cudnn", "torch-memeff", "jax-cudnn")
# Peers first, so that their output is there to check cuflash against.
MEASURE_ORDER = ("torch-fa2", "torch-fa2-drop", "torch-memeff", "torch-cudnn", "cuflash", "cuflash-det",
                 "cuflash-drop", "cuflash-cupy", "jax-cudnn")
REF_ORDER = ("torch-fa2", "torch-memeff", "torch-cudnn")   # reference for the correctness check
CHECKED = ("cuflash", "cuflash-det", "cuflash-cupy", "cuflash-nodecode")
FA2 = "torch-fa2"
CUDNN = ("torch-cudnn", "jax-cudnn")
SDPA_BACKENDS = {"torch-fa2": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION",
                 "torch-memeff": "EFFICIENT_ATTENTION"}
# Variants: the same call as their base with one option changed. cuflash-det: deterministic=True
# (backward only). *-drop: dropout_p = --dropout-compare P (only with that flag). Grid only.
DET = "cuflash-det"
DROP_IMPLS = ("cuflash-drop", "torch-fa2-drop")
VARIANTS = (DET,) + DROP_IMPLS
VARIANT_BASE = {"cuflash-det": "cuflash", "cuflash-drop": "cuflash", "torch-fa2-drop": "torch-fa2",
                "cuflash-nodecode": "cuflash"}
# --decode-compare: cuflash with the decode path off (CUFLASH_DISABLE_DECODE=1), decode cells only (it is in
# no MEASURE_ORDER: run_decode places it after cuflash).
NODECODE = "cuflash-nodecode"
# Column headers of the decode table (10 characters at most: the summary must stay short).
DECODE_NAMES = {NODECODE: "cf-nodec", "torch-cudnn": "t-cudnn", "torch-memeff": "t-memeff"}
DROPOUT_SEED = 20240917    # cuflash's dropout seed (+ --seed): a fixed int, forward and backward alike
DET_BAR, DROP_BAR, DROP_VS_FA2_BAR = 0.8, 0.8, 1.0   # the open issues' bars
DROP_BAR_HEADDIMS, DROP_BAR_SEQLENS = (64, 128), (2048, 16384)   # where the cuflash-drop/cuflash bar applies
CHECK_TOL = {"fwd": 2e-2, "bwd": 5e-2}     # max|a - ref| / max|ref|, bf16/fp16 vs another bf16 kernel
COLORS = {"cuflash": "tab:red", "cuflash-det": "tab:brown", "cuflash-drop": "darkred", "cuflash-cupy": "tab:pink",
          "cuflash-nodecode": "tab:gray", "cuflash-sm80": "tab:olive", "cuflash-portable": "tab:gray",
          "torch-fa2": "tab:blue", "torch-fa2-drop": "tab:cyan", "torch-cudnn": "tab:green",
          "torch-memeff": "tab:orange", "jax-cudnn": "tab:purple"}

DECODE_BATCHES = (1, 2, 4, 8)
DECODE_SEQLENS = (4096, 8192, 16384, 32768, 65536, 131072)
QUICK_DECODE_BATCHES = (1, 8)
QUICK_DECODE_SEQLENS = (4096, 32768)
DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEADDIM = 32, 8, 128
COPY_BYTES = 2 << 30
SLOW_CAP_MS = 2000.0      # time budget of one measurement of a very slow call

MEMORY_SEQLENS = (16384, 65536)
MEMORY_BATCH, MEMORY_HEADS, MEMORY_HEADDIM = 1, 16, 128

LATENCY_SHAPE = (2, 2048, 16, 128)    # (batch, seqlen, nheads, headdim), causal

SUMMARY_LIMIT = 11500                 # characters: the lead sees the last ~12k

GRID_FIELDS = ("mode", "causal", "headdim", "seqlen", "batch", "nheads", "dtype", "impl", "status", "ms",
               "tflops", "first_call_s", "timer", "check_rel_err", "note", "dropout_p")
DECODE_FIELDS = ("batch", "seqlen_k", "nheads", "nheads_k", "headdim", "dtype", "impl", "status", "ms", "bytes",
                 "gbps", "frac_copy", "wall_us", "timer", "check_rel_err", "note")
MEMORY_FIELDS = ("seqlen", "batch", "nheads", "headdim", "dtype", "impl", "phase", "status", "extra_mib",
                 "method", "note", "dropout_p")
INT_FIELDS = {"headdim", "seqlen", "batch", "nheads", "nheads_k", "seqlen_k", "bytes"}
FLOAT_FIELDS = {"ms", "tflops", "first_call_s", "check_rel_err", "gbps", "frac_copy", "wall_us", "extra_mib",
                "dropout_p"}


class Skip(Exception):
    """This implementation cannot run this cell (the message says why)."""


# ---- small pure helpers (exercised by --selftest) ----------------------------------------------

def parse_size(text) -> int:
    """'512' -> 512, '1k' -> 1024, '64K' -> 65536, '1m' -> 1048576."""
    t = str(text).strip().lower()
    mult = 1
    if t.endswith("k"):
        mult, t = 1024, t[:-1]
    elif t.endswith("m"):
        mult, t = 1024 * 1024, t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if v <= 0 or v != int(v):
        raise argparse.ArgumentTypeError(f"not a positive integer size: {text!r}")
    return int(v)


def parse_prob(text) -> float:
    """A dropout probability in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"dropout probability must be in [0, 1): {text!r}")
    return v


def parse_sizes(text) -> tuple:
    vals = tuple(parse_size(x) for x in str(text).split(",") if x.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return vals


def fmt_size(n) -> str:
    n = int(n)
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def attn_flops(batch, nheads, seqlen_q, seqlen_k, headdim, causal, mode) -> float:
    """FlashAttention convention: 4*B*H*Sq*Sk*D (two matmuls), /2 if causal, x2.5 for 'bwd'."""
    f = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    if causal:
        f /= 2
    if mode == "bwd":
        f *= 2.5
    return f


def grid_shape(seqlen, headdim):
    """(batch, nheads) of a grid cell: batch*seqlen = 16k tokens, nheads*headdim = 2048."""
    return max(1, TOKENS // seqlen), max(1, HIDDEN // headdim)


def decode_bytes(batch, seqlen_k, nheads, nheads_k, headdim, itemsize=2) -> int:
    """Bytes a decode step must move: K and V read once, plus q read and out written."""
    return itemsize * headdim * batch * (2 * seqlen_k * nheads_k + 2 * nheads)


def ratio(a, b):
    return a / b if (a is not None and b is not None and b > 0) else None


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def fnum(x, width, prec=1) -> str:
    return ("n/a" if x is None else f"{x:.{prec}f}").rjust(width)


def short(text, n=160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def causal_name(c) -> str:
    return "causal" if c else "non-causal"


def _tflops(row):
    return row.get("tflops") if row and row.get("status") == "ok" else None


def _drop_p(row):
    return (row or {}).get("dropout_p") or 0.0


def dropout_desc(rows) -> str:
    """'dropout p=0.1' (every implementation) and/or '*-drop: dropout p=0.1'; '' without dropout."""
    plain = sorted({_drop_p(r) for r in rows if r["impl"] not in DROP_IMPLS and _drop_p(r) > 0})
    drop = sorted({_drop_p(r) for r in rows if r["impl"] in DROP_IMPLS and _drop_p(r) > 0})
    parts = []
    if plain:
        parts.append("dropout p=" + ",".join(f"{p:g}" for p in plain))
    if drop:
        parts.append("*-drop: dropout p=" + ",".join(f"{p:g}" for p in drop))
    return "; ".join(parts)


def _where(w) -> str:
    c, hd, s = w
    return f"{'c' if c else 'nc'} d{hd} {fmt_size(s)}"


def ratio_stats(vals, bar=None) -> str:
    """'geomean G over N (min m where, max M where)[; k/N >= bar]' of [(ratio, (causal, hd, seqlen))]."""
    vals = [(x, w) for x, w in vals if x is not None]
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    text = (f"geomean {geomean([x for x, _ in vals]):.2f} over {len(vals)} "
            f"(min {lo[0]:.2f} {_where(lo[1])}, max {hi[0]:.2f} {_where(hi[1])})")
    if bar is not None:
        text += f"; {sum(1 for x, _ in vals if x >= bar)}/{len(vals)} >= {bar:.2f}"
    return text


def ratio_brief(vals, bar=None) -> str:
    """'0.83/0.77 (c d64 2k)[ 12/16 >= 0.80]': geomean/min (where) of [(ratio, (causal, hd, seqlen))]."""
    vals = [(x, w) for x, w in vals if x is not None]
    if not vals:
        return "n/a"
    lo = min(vals)
    text = f"{geomean([x for x, _ in vals]):.2f}/{lo[0]:.2f} ({_where(lo[1])})"
    if bar is not None:
        text += f" {sum(1 for x, _ in vals if x >= bar)}/{len(vals)} >= {bar:.2f}"
    return text


def grid_ratios(idx, mode, num, den):
    """[(num/den TFLOP/s, (causal, hd, seqlen))] over the grid cells of ``mode`` where both ran ok."""
    out = []
    for (m, c, hd, s, impl), r in idx.items():
        if m != mode or impl != num:
            continue
        x = ratio(_tflops(r), _tflops(idx.get((m, c, hd, s, den))))
        if x is not None:
            out.append((x, (c, hd, s)))
    return sorted(out, key=lambda t: (t[1][1], t[1][0], t[1][2]))


def in_drop_bar(causal, hd, s) -> bool:
    return hd in DROP_BAR_HEADDIMS and DROP_BAR_SEQLENS[0] <= s <= DROP_BAR_SEQLENS[1]


def index_grid(rows):
    return {(r["mode"], r["causal"], r["headdim"], r["seqlen"], r["impl"]): r for r in rows}


def best_cudnn(idx, key):
    vals = [_tflops(idx.get(key + (i,))) for i in CUDNN]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def grid_groups(rows):
    """(mode, causal, headdim) groups present, in display order."""
    keys = {(r["mode"], r["causal"], r["headdim"]) for r in rows}
    return sorted(keys, key=lambda k: (("fwd", "bwd").index(k[0]) if k[0] in ("fwd", "bwd") else 9, k[2], k[1]))


def format_grid_table(rows, mode, causal, headdim, impls) -> str:
    sel = [r for r in rows if r["mode"] == mode and r["causal"] == causal and r["headdim"] == headdim]
    if not sel:
        return ""
    idx = index_grid(sel)
    impls = [i for i in impls if any(r["impl"] == i for r in sel)]   # cuflash-det: bwd tables only
    seqlens = sorted({r["seqlen"] for r in sel})
    dtype = sel[0].get("dtype", "")
    nheads = sel[0].get("nheads")
    w = max(12, max([len(i) for i in impls], default=0) + 1)
    # extra ratio columns: (title, numerator, denominator), where both were measured
    extra = [(t, a, b) for t, a, b in (("det/cf", DET, "cuflash"), ("drop/cf", "cuflash-drop", "cuflash"),
                                       ("drop/FA2d", "cuflash-drop", "torch-fa2-drop")) if a in impls and b in impls]
    drop = dropout_desc([r for r in sel if r["impl"] in impls])
    lines = [f"[{mode} | {causal_name(causal)} | headdim {headdim} | nheads {nheads} | {dtype}"
             f"{' | ' + drop if drop else ''}]  TFLOP/s"
             f"  (cf/FA2 = cuflash / torch-fa2, cf/cuDNN = cuflash / best of torch-cudnn, jax-cudnn"
             + "".join(f", {t} = {a} / {b}" for t, a, b in extra) + ")"]
    head = f"{'seqlen':>7} {'batch':>5} " + "".join(i.rjust(w) for i in impls) + f" |{'cf/FA2':>8}{'cf/cuDNN':>9}" \
        + "".join(f"{t:>10}" for t, _, _ in extra)
    lines.append(head)
    lines.append("-" * len(head))
    for s in seqlens:
        key = (mode, causal, headdim, s)
        batch = next((r["batch"] for r in sel if r["seqlen"] == s), "")
        cells = "".join(fnum(_tflops(idx.get(key + (i,))), w) for i in impls)
        cf = _tflops(idx.get(key + ("cuflash",)))
        r1 = ratio(cf, _tflops(idx.get(key + (FA2,))))
        r2 = ratio(cf, best_cudnn(idx, key))
        more = "".join(fnum(ratio(_tflops(idx.get(key + (a,))), _tflops(idx.get(key + (b,)))), 10, 2)
                       for _, a, b in extra)
        lines.append(f"{fmt_size(s):>7} {batch:>5} {cells} |{fnum(r1, 8, 2)}{fnum(r2, 9, 2)}{more}")
    return "\n".join(lines)


def format_decode_table(rows, impls, copy_gbps) -> str:
    if not rows:
        return ""
    idx = {(r["batch"], r["seqlen_k"], r["impl"]): r for r in rows}
    shapes = sorted({(r["batch"], r["seqlen_k"]) for r in rows})
    dtype = rows[0].get("dtype", "")
    names = [DECODE_NAMES.get(i, i) for i in impls]
    w = max(11, max(len(n) for n in names) + 1)
    lines = [f"[decode | seqlen_q 1, GQA {DECODE_HEADS} q / {DECODE_KV_HEADS} kv heads | headdim {DECODE_HEADDIM} | "
             f"{dtype}]  achieved GB/s = (K+V+q+out bytes) / kernel time, (% of copy BW "
             f"{fnum(copy_gbps, 0, 0).strip()} GB/s)"]
    extra = [(n, a, b) for n, a, b in (("cf/FA2", "cuflash", FA2), ("cf/off", "cuflash", NODECODE))
             if a in impls and b in impls]
    head = f"{'batch':>5} {'seqlen_k':>8} {'KV MiB':>8} " + "".join(n.rjust(w) for n in names) + \
        f" | {'cuflash us':>10} {'e2e us':>7}" + "".join(f"{n:>8}" for n, _, _ in extra)
    lines.append(head)
    lines.append("-" * len(head))
    for b, sk in shapes:
        cells = ""
        for i in impls:
            r = idx.get((b, sk, i))
            if r and r.get("status") == "ok" and r.get("gbps") is not None:
                pct = f"({100 * r['frac_copy']:.0f}%)" if r.get("frac_copy") is not None else ""
                cells += f"{r['gbps']:.0f} {pct}".rjust(w)
            else:
                cells += "n/a".rjust(w)
        cf = idx.get((b, sk, "cuflash")) or {}
        kv_mib = 2 * b * sk * DECODE_KV_HEADS * DECODE_HEADDIM * 2 / 2 ** 20
        us = cf.get("ms") * 1e3 if cf.get("status") == "ok" and cf.get("ms") is not None else None
        ratios = "".join(fnum(ratio(_gbps(idx.get((b, sk, a))), _gbps(idx.get((b, sk, c)))), 8, 2)
                         for _, a, c in extra)
        lines.append(f"{b:>5} {fmt_size(sk):>8} {kv_mib:>8.0f} {cells} | {fnum(us, 10, 1)} "
                     f"{fnum(cf.get('wall_us') if cf.get('status') == 'ok' else None, 7, 1)}{ratios}")
    return "\n".join(lines)


def _gbps(row):
    return row.get("gbps") if row and row.get("status") == "ok" else None


def decode_ratio_summary(rows) -> list:
    """One line per comparison: cuflash / torch-fa2 and cuflash / cuflash-nodecode over the decode cells."""
    idx = {(r["batch"], r["seqlen_k"], r["impl"]): r for r in rows}
    shapes = sorted({(r["batch"], r["seqlen_k"]) for r in rows})
    out = []
    for name, other in (("torch-fa2", FA2), ("decode path off", NODECODE)):
        vals = [(ratio(_gbps(idx.get((b, sk, "cuflash"))), _gbps(idx.get((b, sk, other)))), (b, sk))
                for b, sk in shapes]
        vals = [(x, w) for x, w in vals if x is not None]
        if not vals:
            continue
        lo = min(vals)
        out.append(f"decode cuflash / {name}: geomean {geomean([x for x, _ in vals]):.2f}, min {lo[0]:.2f} "
                   f"(b{lo[1][0]} sk{fmt_size(lo[1][1])}), {sum(1 for x, _ in vals if x >= 1.0)}/{len(vals)} >= 1.00")
    return out


def format_memory_table(rows) -> str:
    if not rows:
        return ""
    seqlens = sorted({r["seqlen"] for r in rows})
    impls = [i for i in IMPLS + ("outputs-only",) if any(r["impl"] == i for r in rows)]
    idx = {(r["impl"], r["seqlen"], r["phase"]): r for r in rows}
    r0 = rows[0]
    cols = [(s, p) for s in seqlens for p in ("fwd", "fwd+bwd")]
    drop = dropout_desc([r for r in rows if r["impl"] != "outputs-only"])
    lines = [f"[memory | batch {r0['batch']}, nheads {r0['nheads']}, headdim {r0['headdim']}, {r0['dtype']}, "
             f"non-causal{', ' + drop if drop else ''}]  peak MiB allocated beyond the inputs (q, k, v, dout), "
             f"outputs included"]
    head = f"{'impl':<14}" + "".join(f"{fmt_size(s) + ' ' + p:>14}" for s, p in cols) + "  method"
    lines.append(head)
    lines.append("-" * len(head))
    for i in impls:
        cells, method = "", ""
        for s, p in cols:
            r = idx.get((i, s, p))
            if r is None:
                cells += "".rjust(14)
            elif r.get("status") == "ok":
                cells += fnum(r.get("extra_mib"), 14, 0)
                method = r.get("method") or method
            else:
                cells += (r.get("status") or "n/a").upper().rjust(14) if r.get("status") == "oom" else "n/a".rjust(14)
        lines.append(f"{i:<14}{cells}  {method}")
    return "\n".join(lines)


def format_latency(lat) -> str:
    if not lat:
        return ""
    b, s, h, d = lat.get("shape", LATENCY_SHAPE)
    lines = [f"[first-call latency | fresh `python -c` process | q,k,v ({b}, {s}, {h}, {d}) {lat.get('dtype', '')} "
             f"causal | CUFLASH_CACHE_DIR (and CUPY_CACHE_DIR, CUDA_CACHE_PATH) = one new temp dir]"]
    keys = (("import_cuflash_s", "import cuflash"), ("fwd_first_s", "fwd 1st call"), ("fwd_second_s", "fwd 2nd call"),
            ("fwd_lse_first_s", "fwd(lse) 1st"), ("bwd_first_s", "bwd 1st call"), ("bwd_second_s", "bwd 2nd call"),
            ("process_s", "whole process"))
    for run in ("cold", "warm"):
        r = lat.get(run)
        if not r:
            continue
        if r.get("error"):
            lines.append(f"  {run:<5} failed: {short(r['error'], 300)}")
            continue
        parts = []
        for k, name in keys:
            if r.get(k) is not None:
                v = r[k]
                parts.append(f"{name} {v * 1e3:.1f} ms" if v < 1 else f"{name} {v:.2f} s")
        if r.get("bwd_error"):
            parts.append(f"bwd n/a ({short(r['bwd_error'], 80)})")
        lines.append(f"  {run:<5} " + ", ".join(parts))
    if lat.get("cache"):
        lines.append(f"  cache after cold run: {lat['cache']}")
    return "\n".join(lines)


def format_summary(res) -> str:
    """The compact final report (printed last). ``res`` is a Results (or anything with its attributes)."""
    out = []
    env = res.env or {}
    out.append("=" * 100)
    out.append("CUFLASH BENCHMARK SUMMARY")
    out.append(f"GPU {env.get('gpu', '?')} | torch {env.get('torch', '-')} | cuflash {env.get('cuflash', '-')} | "
               f"jax {env.get('jax', '-')} | cupy {env.get('cupy', '-')} | triton {env.get('triton', '-')}")
    out.append(f"timing: {res.timer_desc}")
    grid = res.grid
    if grid:
        idx = index_grid(grid)
        dtype = grid[0].get("dtype", "")
        seqlens = sorted({r["seqlen"] for r in grid})
        out.append("")
        out.append(f"cuflash TFLOP/s and ratios a = cuflash/torch-fa2, b = cuflash/best-cuDNN (torch-cudnn, jax-cudnn); "
                   f"{dtype}, {fmt_size(TOKENS)} tokens, hidden {HIDDEN}")
        plain_p = sorted({_drop_p(r) for r in grid if r["impl"] not in DROP_IMPLS and _drop_p(r) > 0})
        if plain_p:
            seed = (getattr(res, "dropout", None) or {}).get("seed")
            out.append(f"DROPOUT p={','.join(f'{p:g}' for p in plain_p)} on every implementation that has it "
                       f"(a, b like for like; cuflash seed {seed}; jax-cudnn has none; no correctness check)")
        head = f"{'mode':<4} {'causal':<6} {'hd':>3} |" + "".join(f"{fmt_size(s) + ': TF a/b':>16}" for s in seqlens)
        out.append(head)
        for mode, causal, hd in grid_groups(grid):
            cells = ""
            for s in seqlens:
                key = (mode, causal, hd, s)
                cf = _tflops(idx.get(key + ("cuflash",)))
                a = ratio(cf, _tflops(idx.get(key + (FA2,))))
                b = ratio(cf, best_cudnn(idx, key))
                if cf is None:
                    cells += f"{'n/a':>16}"
                else:
                    cells += f"{cf:>6.0f} {fnum(a, 4, 2).strip():>4}/{fnum(b, 4, 2).strip():<4}"
            out.append(f"{mode:<4} {'yes' if causal else 'no':<6} {hd:>3} |{cells}")
        out.append("")
        out.append("peers TFLOP/s: torch-fa2 / best-cuDNN (which: t = torch-cudnn, j = jax-cudnn)")
        out.append(head.replace(": TF a/b", ": FA2/cuDNN"))
        for mode, causal, hd in grid_groups(grid):
            cells = ""
            for s in seqlens:
                key = (mode, causal, hd, s)
                fa = _tflops(idx.get(key + (FA2,)))
                t, j = _tflops(idx.get(key + ("torch-cudnn",))), _tflops(idx.get(key + ("jax-cudnn",)))
                best = max([x for x in (t, j) if x is not None], default=None)
                which = "" if best is None else ("t" if best == t else "j")
                cells += f"{fnum(fa, 7, 0)}/{fnum(best, 0, 0).strip() + which:<7} "
            out.append(f"{mode:<4} {'yes' if causal else 'no':<6} {hd:>3} |{cells}")
        out.append("")
        for mode in ("fwd", "bwd"):
            ra, rb = [], []
            for (m, c, hd, s, impl), r in idx.items():
                if m != mode or impl != "cuflash":
                    continue
                cf = _tflops(r)
                ra.append((ratio(cf, _tflops(idx.get((m, c, hd, s, FA2)))), (c, hd, s)))
                rb.append((ratio(cf, best_cudnn(idx, (m, c, hd, s))), (c, hd, s)))
            if not ra:
                continue
            parts = []
            for name, lst in (("torch-fa2", ra), ("best-cuDNN", rb)):
                vals = [(x, w) for x, w in lst if x is not None]
                if not vals:
                    parts.append(f"vs {name}: n/a")
                    continue
                lo, hi = min(vals), max(vals)
                desc = lambda w: f"{'c' if w[0] else 'nc'} d{w[1]} {fmt_size(w[2])}"
                parts.append(f"vs {name}: geomean {geomean([x for x, _ in vals]):.2f} over {len(vals)} "
                             f"(min {lo[0]:.2f} {desc(lo[1])}, max {hi[0]:.2f} {desc(hi[1])})")
            out.append(f"cuflash {mode}: " + "; ".join(parts))
        firsts = [r.get("first_call_s") for r in grid if r["impl"] == "cuflash" and r.get("first_call_s")]
        if firsts:
            out.append(f"cuflash first calls (JIT compile or disk-cache load included): total {sum(firsts):.1f} s, "
                       f"max {max(firsts):.1f} s over {len(firsts)} cells")
        out += summary_det(grid, idx, seqlens)
        out += summary_dropout(grid, idx, seqlens, getattr(res, "dropout", None) or {})
    if res.decode:
        out.append("")
        impls = [i for i in IMPLS if any(r["impl"] == i for r in res.decode)]
        out.append(format_decode_table(res.decode, impls, res.copy_gbps))
        out += decode_ratio_summary(res.decode)
        if res.decode_notes:
            out.append("  " + "; ".join(sorted(res.decode_notes)))
    if res.memory:
        out.append("")
        out.append(format_memory_table(res.memory))
    if res.latency:
        out.append("")
        out.append(format_latency(res.latency))
    checks = [r for r in list(grid) + list(res.decode) if r.get("check_rel_err") is not None]
    if checks:
        out.append("")
        bad = [r for r in checks if not (r["check_rel_err"] <= CHECK_TOL.get(r.get("mode", "fwd"), 2e-2))]
        worst = {}
        for r in checks:
            m = r.get("mode", "decode") if "mode" in r else "decode"
            worst[m] = max(worst.get(m, 0.0), r["check_rel_err"])
        out.append("correctness vs " + "/".join(REF_ORDER) + " (max|d|/max|ref|): " +
                   ", ".join(f"{m} worst {v:.2e}" for m, v in worst.items()) +
                   (f"; {len(bad)} CHECK FAILURES" if bad else "; all within tolerance"))
        for r in bad[:8]:
            where = (f"{r['mode']} {causal_name(r['causal'])} d{r['headdim']} s{fmt_size(r['seqlen'])}" if "mode" in r
                     else f"decode b{r['batch']} sk{fmt_size(r['seqlen_k'])}")
            out.append(f"  CHECK FAILED {r['impl']} {where}: rel err {r['check_rel_err']:.3e}")
    if res.notes:
        out.append("")
        out.append("n/a cells (impl, status, count: reason):")
        for (impl, status, reason), n in sorted(res.notes.items(), key=lambda kv: (-kv[1], kv[0]))[:14]:
            out.append(f"  {impl} {status} x{n}: {short(reason, 150)}")
        if len(res.notes) > 14:
            out.append(f"  ... {len(res.notes) - 14} more distinct reasons (see the log above / CSV 'note')")
    if res.fatal:
        out.append("")
        out.append(f"FATAL: {short(res.fatal, 300)} (later measurements skipped)")
    out.append("")
    if res.files:
        dirs = {os.path.dirname(f) for f in res.files}
        if len(dirs) == 1:   # one folder: name it once
            out.append(f"files in {dirs.pop() or '.'}: " + ", ".join(os.path.basename(f) for f in res.files))
        else:
            out.append("files: " + ", ".join(res.files))
    out.append(f"elapsed {res.elapsed:.0f} s")
    text = "\n".join(out)
    if len(text) > SUMMARY_LIMIT:   # keep the head (numbers) and the tail (files), drop the middle
        text = text[: SUMMARY_LIMIT - 400] + "\n... (summary truncated) ...\n" + text[-350:]
    return text


def summary_det(grid, idx, seqlens):
    """Deterministic backward cost: cuflash-det / cuflash per bwd cell, geomean and min."""
    groups = [g for g in grid_groups(grid) if g[0] == "bwd"
              and any(k[0] == "bwd" and k[1] == g[1] and k[2] == g[2] and k[4] == DET for k in idx)]
    if not groups:
        return []
    drop = dropout_desc([r for r in grid if r["impl"] in (DET, "cuflash")])
    out = ["", f"DETERMINISTIC COST: cuflash-det / cuflash, backward TFLOP/s (deterministic=True vs False"
               f"{'; ' + drop if drop else ''}); issue bar >= {DET_BAR:.2f}",
           f"{'mode':<4} {'causal':<6} {'hd':>3} |" + "".join(f"{fmt_size(s):>6}" for s in seqlens)]
    for mode, causal, hd in groups:
        cells = "".join(fnum(ratio(_tflops(idx.get((mode, causal, hd, s, DET))),
                                   _tflops(idx.get((mode, causal, hd, s, "cuflash")))), 6, 2) for s in seqlens)
        out.append(f"{mode:<4} {'yes' if causal else 'no':<6} {hd:>3} |{cells}")
    out.append("cuflash-det/cuflash bwd: " + ratio_stats(grid_ratios(idx, "bwd", DET, "cuflash"), DET_BAR))
    return out


def summary_dropout(grid, idx, seqlens, info):
    """--dropout-compare: x = cuflash-drop / cuflash (p=0), y = cuflash-drop / torch-fa2-drop, per cell."""
    if not any(r["impl"] == "cuflash-drop" for r in grid):
        return []
    ps = sorted({_drop_p(r) for r in grid if r["impl"] in DROP_IMPLS and _drop_p(r) > 0})
    p = ",".join(f"{x:g}" for x in ps) or "?"
    out = ["", f"DROPOUT COMPARE p={p} (cuflash seed {info.get('seed')}): x = cuflash-drop / cuflash (p=0), "
               f"y = cuflash-drop / torch-fa2-drop (same p); cells x/y",
           f"{'mode':<4} {'causal':<6} {'hd':>3} |" + "".join(f"{fmt_size(s):>10}" for s in seqlens)]
    for mode, causal, hd in grid_groups(grid):
        if not any(k[:3] == (mode, causal, hd) and k[4] == "cuflash-drop" for k in idx):
            continue
        cells = ""
        for s in seqlens:
            key = (mode, causal, hd, s)
            d = _tflops(idx.get(key + ("cuflash-drop",)))
            x = ratio(d, _tflops(idx.get(key + ("cuflash",))))
            y = ratio(d, _tflops(idx.get(key + ("torch-fa2-drop",))))
            cells += f"{'n/a' if d is None else fnum(x, 0, 2).strip() + '/' + fnum(y, 0, 2).strip():>10}"
        out.append(f"{mode:<4} {'yes' if causal else 'no':<6} {hd:>3} |{cells}")
    lo, hi = DROP_BAR_SEQLENS
    out.append(f"geomean/min (where) over the cells; x bars: >= {DROP_BAR:.2f} on the bar cells d"
               f"{'/'.join(map(str, DROP_BAR_HEADDIMS))} {fmt_size(lo)}..{fmt_size(hi)}; y bar: >= "
               f"{DROP_VS_FA2_BAR:.2f} on all")
    for mode in ("fwd", "bwd"):
        xs = grid_ratios(idx, mode, "cuflash-drop", "cuflash")
        ys = grid_ratios(idx, mode, "cuflash-drop", "torch-fa2-drop")
        if xs or ys:
            xb = [t for t in xs if in_drop_bar(*t[1])]
            out.append(f"{mode}: x all {ratio_brief(xs)} | x bar cells {ratio_brief(xb, DROP_BAR)} | "
                       f"y {ratio_brief(ys, DROP_VS_FA2_BAR)}")
    return out


# ---- CSV and plots -----------------------------------------------------------------------------

def write_csv(path, rows, fields):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def load_csv(path):
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if v == "" or v is None:
                    row[k] = None
                elif k in INT_FIELDS:
                    row[k] = int(float(v))
                elif k in FLOAT_FIELDS:
                    row[k] = float(v)
                elif k == "causal":
                    row[k] = v.strip().lower() in ("true", "1", "yes")
                else:
                    row[k] = v
            rows.append(row)
    return rows


def _pyplot():
    import matplotlib

    try:
        matplotlib.use("Agg")
    except Exception:
        pass
    import matplotlib.pyplot as plt

    return plt


def plot_grid(rows, outdir, prefix="attention"):
    """One PNG per head dim: TFLOP/s vs seqlen, a panel per mode, solid = non-causal, dashed = causal."""
    plt = _pyplot()
    files = []
    for hd in sorted({r["headdim"] for r in rows}):
        sel = [r for r in rows if r["headdim"] == hd]
        modes = [m for m in ("fwd", "bwd") if any(r["mode"] == m for r in sel)]
        if not modes:
            continue
        fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes) + 2.2, 5), squeeze=False)
        legend = {}
        for ax, mode in zip(axes[0], modes):
            seqlens = sorted({r["seqlen"] for r in sel if r["mode"] == mode})
            for impl in IMPLS:
                for causal in (False, True):
                    pts = sorted((r["seqlen"], r["tflops"]) for r in sel
                                 if r["mode"] == mode and r["impl"] == impl and r["causal"] == causal
                                 and r.get("status") == "ok" and r.get("tflops") is not None)
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--" if causal else "-",
                            marker="o", markersize=3, color=COLORS.get(impl),
                            label=f"{impl}{' (causal)' if causal else ''}")
            ax.set_xscale("log", base=2)
            if seqlens:
                ax.set_xticks(seqlens)
                ax.set_xticklabels([fmt_size(s) for s in seqlens])
            ax.set_ylim(bottom=0)
            dtype = sel[0].get("dtype", "")
            drop = dropout_desc([r for r in sel if r["mode"] == mode])
            ax.set_title(f"{mode}: headdim {hd}, nheads {HIDDEN // hd}, {dtype}, {fmt_size(TOKENS)} tokens"
                         + (f"\n{drop}" if drop else ""), fontsize=10 if drop else None)
            ax.set_xlabel("seqlen (batch = 16k / seqlen)")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
        if legend:
            order = sorted(legend, key=lambda lab: (IMPLS.index(lab.split()[0]) if lab.split()[0] in IMPLS else 99,
                                                    lab))
            fig.legend([legend[lab] for lab in order], order, loc="center right", fontsize=8,
                       title="solid: non-causal\ndashed: causal", title_fontsize=8)
        fig.tight_layout(rect=(0, 0, 1 - 2.0 / (6.5 * len(modes) + 2.2), 1))
        path = os.path.join(outdir, f"{prefix}_hd{hd}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_decode(rows, outdir, copy_gbps=None, prefix="decode"):
    """Achieved bandwidth vs seqlen_k, one panel per batch size; dotted line = device copy bandwidth."""
    if not rows:
        return []
    plt = _pyplot()
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4.2), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], batches):
        sks = sorted({r["seqlen_k"] for r in rows if r["batch"] == b})
        for impl in IMPLS:
            pts = sorted((r["seqlen_k"], r["gbps"]) for r in rows if r["batch"] == b and r["impl"] == impl
                         and r.get("status") == "ok" and r.get("gbps") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                        color=COLORS.get(impl), label=impl)
        if copy_gbps:
            ax.axhline(copy_gbps, color="gray", linestyle=":", label="D2D copy")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sks)
        ax.set_xticklabels([fmt_size(s) for s in sks], fontsize=7)
        ax.set_title(f"decode batch {b}")
        ax.set_xlabel("seqlen_k")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(outdir, f"{prefix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ---- results container -------------------------------------------------------------------------

class Results:
    def __init__(self):
        self.env = {}
        self.timer_desc = ""
        self.grid = []
        self.decode = []
        self.decode_notes = set()
        self.copy_gbps = None
        self.memory = []
        self.latency = {}
        self.dropout = {}        # {"p", "compare", "seed"} of the run
        self.notes = {}          # (impl, status, reason) -> count
        self.fatal = None
        self.files = []
        self.elapsed = 0.0


# ---- GPU side ----------------------------------------------------------------------------------

class Bench:
    """What to time: ``fn()``; kind 'events' (CUDA events) or 'wall' (JAX); ``canon(result)`` gives
    BSHD torch tensors for the correctness check; ``sub``: a function whose time is subtracted."""

    def __init__(self, fn, kind="events", block=None, canon=None, note="", sub=None):
        self.fn, self.kind, self.block, self.canon, self.note, self.sub = fn, kind, block, canon, note, sub


class Timing:
    def __init__(self, torch, warmup_ms, rep_ms, min_iters, method):
        self.torch = torch
        self.warmup, self.rep, self.min_iters, self.method = warmup_ms, rep_ms, min_iters, method
        self.do_bench, self.do_bench_err, self._flush = None, None, None
        self.last = "events-median"
        if method != "wall":
            try:
                from triton.testing import do_bench

                self.do_bench = do_bench
            except Exception as e:  # noqa: BLE001
                self.do_bench_err = f"{type(e).__name__}: {e}"

    def events_name(self):
        return "wall-pipelined" if self.method == "wall" else self.last

    def describe(self):
        if self.method == "wall":
            ev = "torch/cuflash: same wall-clock method as JAX"
        elif self.do_bench:
            ev = (f"torch/cuflash: triton.testing.do_bench median (CUDA events, L2 flushed before each call, "
                  f"warmup {self.warmup:g} ms, rep {self.rep:g} ms; calls slower than rep/{self.min_iters}: "
                  f"same method in an own loop, {self.min_iters} calls or {SLOW_CAP_MS / 1e3:g} s worth, >= 3)")
        else:
            ev = (f"torch/cuflash: own CUDA-event loop, median, 256 MiB L2 flush before each call (triton not "
                  f"importable: {short(self.do_bench_err, 60)})")
        return (ev + "; jax: wall clock, median over 7 rounds of N back-to-back jitted calls then "
                "block_until_ready, /N (no L2 flush); first call (compile) excluded everywhere")

    def measure(self, bench):
        ms = self._one(bench.fn, bench)
        if bench.sub is not None:
            ms -= self._one(bench.sub, bench)
        return ms

    def _one(self, fn, bench):
        if bench.kind == "events" and self.method != "wall":
            return self.events(fn)
        block = bench.block or (lambda r: self.torch.cuda.synchronize())
        return self.wall(fn, block)

    def _estimate(self, fn, n=3):
        torch = self.torch
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        e.synchronize()
        return max(s.elapsed_time(e) / n, 1e-3)

    def events(self, fn):
        est = self._estimate(fn, 2)
        if self.do_bench is not None and est * self.min_iters <= self.rep:
            self.last = "do_bench-median"
            try:
                r = self.do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median")
            except TypeError:  # older triton: no return_mode
                r = self.do_bench(fn, warmup=self.warmup, rep=self.rep, quantiles=[0.5])
            return float(r[0] if isinstance(r, (list, tuple)) else r)
        # No triton, or a slow call (do_bench would time fewer than min_iters calls after its own
        # 5-call estimate): the same method (L2 flush, CUDA events, median) with a call count floor.
        self.last = "events-median"
        return self._own_events(fn, est)

    def _own_events(self, fn, est):
        torch = self.torch
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        n_warm = max(1, int(self.warmup / est))
        n_rep = min(10000, max(self.min_iters, int(self.rep / est)))
        if est * n_rep > SLOW_CAP_MS:   # very slow calls: bound the time spent, keep >= 3 samples
            n_rep = max(3, int(SLOW_CAP_MS / est))
        for _ in range(n_warm):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            self._flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def wall(self, fn, block, rounds=7):
        block(fn())
        t0 = time.perf_counter()
        block(fn())
        est = max(time.perf_counter() - t0, 1e-6)
        n = max(1, min(2000, int(self.rep / 1e3 / rounds / est)), -(-self.min_iters // rounds))
        t_end = time.perf_counter() + self.warmup / 1e3
        while time.perf_counter() < t_end:
            r = None
            for _ in range(n):
                r = fn()
            block(r)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            r = None
            for _ in range(n):
                r = fn()
            block(r)
            times.append((time.perf_counter() - t0) / n)
        return statistics.median(times) * 1e3


class Cell:
    """Fresh random inputs (randn) of one shape, BSHD, in torch (JAX copies made on demand)."""

    def __init__(self, runner, batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, need_dout, seed):
        torch = runner.torch
        self.runner = runner
        self.shape_q = (batch, seqlen_q, nheads, headdim)
        self.shape_k = (batch, seqlen_k, nheads_k, headdim)
        self.seed = seed
        torch.manual_seed(seed)
        dt = runner.tdtype
        self.q = torch.randn(self.shape_q, device="cuda", dtype=dt)
        self.k = torch.randn(self.shape_k, device="cuda", dtype=dt)
        self.v = torch.randn(self.shape_k, device="cuda", dtype=dt)
        self.dout = torch.randn(self.shape_q, device="cuda", dtype=dt) if need_dout else None
        self._jax = None

    def jax_inputs(self):
        if self._jax is None:
            jax = self.runner.jax
            keys = jax.random.split(jax.random.PRNGKey(self.seed), 4)
            dt = self.runner.jdtype
            self._jax = (jax.random.normal(keys[0], self.shape_q, dt), jax.random.normal(keys[1], self.shape_k, dt),
                         jax.random.normal(keys[2], self.shape_k, dt), jax.random.normal(keys[3], self.shape_q, dt))
            jax.block_until_ready(self._jax)
        return self._jax


def _first_line(e) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def _is_oom(e) -> bool:
    m = str(e).lower()
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in m or "resource_exhausted" in m


class Runner:
    def __init__(self, cfg, res):
        self.cfg, self.res = cfg, res
        self.reported = set()
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False: this benchmark needs a CUDA GPU")
        self.torch = torch
        self.tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
        self.timing = Timing(torch, cfg.warmup, cfg.rep, cfg.min_iters, cfg.timer)
        res.timer_desc = self.timing.describe()
        self.available = {}      # impl -> None (ok) or reason
        self.cuflash = self.cupy = self.jax = self.jdtype = None
        self._probe()
        res.env = self._env()

    # -- availability --
    def _probe(self):
        impls = self.cfg.impls
        if any(VARIANT_BASE.get(i, i) == "cuflash" or i == "cuflash-cupy" for i in impls):
            try:
                import cuflash

                self.cuflash = cuflash
                self.available["cuflash"] = None
            except Exception as e:  # noqa: BLE001
                self.available["cuflash"] = f"import cuflash failed: {_first_line(e)}"
        if "cuflash-cupy" in impls:
            if self.available.get("cuflash"):
                self.available["cuflash-cupy"] = self.available["cuflash"]
            else:
                try:
                    import cupy

                    self.cupy = cupy
                    self.available["cuflash-cupy"] = None
                except Exception as e:  # noqa: BLE001
                    self.available["cuflash-cupy"] = f"import cupy failed: {_first_line(e)}"
        for name in ("cuflash-det", "cuflash-drop", NODECODE):
            if name in impls:
                self.available[name] = self.available.get("cuflash")
        for name in impls:
            be = SDPA_BACKENDS.get(VARIANT_BASE.get(name, name))
            if be is None:
                continue
            try:
                from torch.nn.attention import SDPBackend

                getattr(SDPBackend, be)
                self.available[name] = None
            except Exception as e:  # noqa: BLE001
                self.available[name] = f"torch.nn.attention.SDPBackend.{be} unavailable: {_first_line(e)}"
        if "jax-cudnn" in impls:
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch
            try:
                import jax
                import jax.numpy as jnp

                plat = jax.devices()[0].platform
                if plat != "gpu":
                    raise RuntimeError(f"jax default device is {plat!r}, not a GPU")
                if "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ or \
                        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"].lower() != "false":
                    print("note: jax may preallocate most GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE not 'false')")
                self.jax = jax
                self.jdtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16}[self.cfg.dtype]
                self.available["jax-cudnn"] = None
            except Exception as e:  # noqa: BLE001
                self.available["jax-cudnn"] = f"jax with a GPU backend unavailable: {_first_line(e)}"
        for name in impls:
            if self.available.get(name):
                print(f"[skip] {name}: {self.available[name]}")

    def _env(self):
        torch = self.torch
        p = torch.cuda.get_device_properties(0)
        env = {"gpu": f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                      f"{p.total_memory / 2 ** 30:.0f} GiB)",
               "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
               "python": sys.version.split()[0]}
        if self.cuflash is not None:
            env["cuflash"] = f"{getattr(self.cuflash, '__version__', '?')} ({os.path.dirname(self.cuflash.__file__)})"
        for mod in ("cupy", "triton"):
            try:
                env[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001
                pass
        if self.jax is not None:
            env["jax"] = self.jax.__version__
        return env

    # -- bookkeeping --
    def note(self, impl, where, status, reason):
        key = (impl, status, reason)
        self.res.notes[key] = self.res.notes.get(key, 0) + 1
        if key not in self.reported:
            self.reported.add(key)
            print(f"  [{status}] {impl} {where}: {reason}" +
                  ("  (same reason: not repeated)" if status != "error" else ""))

    def context_ok(self):
        try:
            self.torch.cuda.synchronize()
            x = self.torch.ones(4, device="cuda")
            (x + 1).sum().item()
            return True
        except Exception:  # noqa: BLE001
            return False

    def _sync(self, bench, r):
        if bench.kind == "wall" and bench.block is not None:
            bench.block(r)
        else:
            self.torch.cuda.synchronize()

    def run_impl(self, impl, builder, where, keep_output=False):
        """Build, call once (compile; timed as first_call_s), time. Never raises (except KeyboardInterrupt)."""
        row = {"impl": impl, "status": "ok", "ms": None, "first_call_s": None, "timer": "", "note": ""}
        out = None
        if self.res.fatal:
            row.update(status="skip", note="CUDA context lost earlier")
            return row, None
        if self.available.get(impl):
            row.update(status="skip", note=self.available[impl])
            return row, None
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            try:
                bench = builder()
                self.torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = bench.fn()
                self._sync(bench, r)
                row["first_call_s"] = time.perf_counter() - t0
                if keep_output and bench.canon is not None:
                    out = bench.canon(r)
                del r
                row["ms"] = self.timing.measure(bench)
                if not (row["ms"] > 0):
                    raise RuntimeError(f"non-positive time {row['ms']}")
                row["timer"] = self.timing.events_name() if bench.kind == "events" else "wall-pipelined"
                if bench.sub is not None:
                    row["timer"] += "(total-minus-fwd)"
                row["note"] = bench.note
            except Skip as e:
                row.update(status="skip", note=str(e))
            except NotImplementedError as e:
                row.update(status="skip", note=f"not implemented: {_first_line(e)}")
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                out = None
                if impl.startswith("cuflash") and isinstance(e, (ImportError, AttributeError)):
                    # a cuflash feature that is not there yet (e.g. the backward's module)
                    row.update(status="skip", note=f"not available yet: {_first_line(e)}", ms=None)
                else:
                    self._failed(row, e, wlist, impl, where)
        if row["status"] != "ok":
            self.note(impl, where, row["status"], row["note"])
        return row, out

    def _failed(self, row, e, wlist, impl, where):
        status = "oom" if _is_oom(e) else "error"
        msg = _first_line(e)
        extra = [str(w.message) for w in wlist if issubclass(w.category, UserWarning)]
        extra = [short(x, 120) for x in dict.fromkeys(extra) if "not used because" not in x][:2]
        if extra:
            msg += " | warnings: " + " / ".join(extra)
        row.update(status=status, note=short(msg, 400), ms=None)
        if not self.context_ok():
            self.res.fatal = f"CUDA context unusable after {impl} {where}: {msg}"
            print(f"FATAL: {self.res.fatal}")
        else:
            self.torch.cuda.empty_cache()

    # -- builders --
    def impl_dropout(self, impl) -> float:
        """Dropout probability of ``impl`` in the grid: --dropout-compare P for *-drop, else --dropout."""
        if impl in DROP_IMPLS:
            return self.cfg.dropout_compare or 0.0
        return self.cfg.dropout

    def builder(self, impl, cell, mode, causal, p=None):
        """``p``: dropout probability (default: the grid's for ``impl``; decode passes 0)."""
        p = self.impl_dropout(impl) if p is None else p
        # While run_decode compares with the decode path off, every cuflash call sets the switch.
        dec = (impl != NODECODE) if getattr(self, "decode_switch", False) else None
        if impl in ("cuflash", "cuflash-drop", NODECODE):
            return functools.partial(self._build_cuflash, cell, mode, causal, False, p, decode=dec)
        if impl == DET:
            return functools.partial(self._build_cuflash, cell, mode, causal, False, p, True, decode=dec)
        if impl == "cuflash-cupy":
            return functools.partial(self._build_cuflash, cell, mode, causal, True, p, decode=dec)
        if VARIANT_BASE.get(impl, impl) in SDPA_BACKENDS:
            return functools.partial(self._build_sdpa, cell, mode, causal, VARIANT_BASE.get(impl, impl), p)
        if impl == "jax-cudnn":
            return functools.partial(self._build_jax, cell, mode, causal, p)
        raise ValueError(impl)

    def _build_cuflash(self, cell, mode, causal, use_cupy, p=0.0, deterministic=False, decode=None):
        """``decode``: None leaves the dispatcher alone; True / False turn the decode path on / off
        (CUFLASH_DISABLE_DECODE, read at dispatch) and clear the plan cache, so that the calls timed
        next record their plan on the intended path."""
        cf, torch = self.cuflash, self.torch
        q, k, v, dout = cell.q, cell.k, cell.v, cell.dout
        note = ""
        if decode is not None:
            if decode:
                os.environ.pop("CUFLASH_DISABLE_DECODE", None)
            else:
                os.environ["CUFLASH_DISABLE_DECODE"] = "1"
                note = "CUFLASH_DISABLE_DECODE=1"
            clear = getattr(getattr(cf, "_api", None), "clear_plan_cache", None)
            if clear is not None:
                clear()
        # Only non-default options are passed, so the p=0 calls are exactly the plain ones.
        fkw = {"dropout_p": p, "seed": self.cfg.dropout_seed} if p > 0 else {}
        bkw = dict(fkw, deterministic=True) if deterministic else fkw
        if deterministic and mode == "fwd":
            raise Skip("cuflash-det is backward only")
        if use_cupy:
            cp = self.cupy
            try:
                q, k, v = (cp.from_dlpack(x) for x in (q, k, v))
                dout = None if dout is None else cp.from_dlpack(dout)
            except Exception as e:  # noqa: BLE001
                raise Skip(f"cupy.from_dlpack of {cell.q.dtype} torch tensors failed: {_first_line(e)}") from None
            note = (note + "; " if note else "") + "CuPy views of the torch buffers"

            def to_t(x):
                return torch.from_dlpack(x)
        else:
            def to_t(x):
                return x
        if p > 0:
            note = (note + "; " if note else "") + f"dropout_p={p:g} seed={self.cfg.dropout_seed}"
        if deterministic:
            note = (note + "; " if note else "") + "deterministic=True"
        if mode == "fwd":
            return Bench(lambda: cf.attention(q, k, v, causal=causal, **fkw), canon=lambda r: [to_t(r)], note=note)
        if mode == "train":
            def train():
                o, lse = cf.attention(q, k, v, causal=causal, return_lse=True, **fkw)
                return cf.attention_backward(dout, q, k, v, o, lse, causal=causal, **bkw)
            if not hasattr(cf, "attention_backward"):
                raise Skip("cuflash has no attention_backward")
            return Bench(train, note=note)
        if not hasattr(cf, "attention_backward"):
            raise Skip("cuflash has no attention_backward")
        out, lse = cf.attention(q, k, v, causal=causal, return_lse=True, **fkw)
        return Bench(lambda: cf.attention_backward(dout, q, k, v, out, lse, causal=causal, **bkw),
                     canon=lambda r: [to_t(x) for x in r], note=note)

    def _build_sdpa(self, cell, mode, causal, impl, p=0.0):
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[impl])
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q, k, v = cell.q, cell.k, cell.v
        kw, note = ({"dropout_p": p}, f"dropout_p={p:g}") if p > 0 else ({}, "")
        hq, hk = q.shape[2], k.shape[2]
        if p > 0:
            # A backend without dropout (cuDNN on older torch) is a skip, not an error: try it once here,
            # the backward too (through autograd, which replays the forward's dropout mask).
            with warnings.catch_warnings(record=True) as wl:
                warnings.simplefilter("always")
                try:
                    xs = [x.detach().requires_grad_(mode != "fwd") for x in (q, k, v)]
                    with sdpa_kernel(backend):
                        o = sdpa(*(x.transpose(1, 2) for x in xs), is_causal=causal, **kw)
                    if mode != "fwd":
                        torch.autograd.grad(o, xs, cell.dout.transpose(1, 2))
                    torch.cuda.synchronize()
                    del o, xs
                except Exception as e:  # noqa: BLE001
                    if _is_oom(e) or not self.context_ok():
                        raise
                    why = [str(w.message) for w in wl if issubclass(w.category, UserWarning)]
                    why = [x for x in why if "dropout" in x.lower()] or why
                    raise Skip(f"{impl} with dropout_p={p:g} ({mode}) failed: {_first_line(e)}"
                               + (f" | {short(why[0], 120)}" if why else "")) from None

        def call(qb, kb, vb):
            with sdpa_kernel(backend):
                return sdpa(qb, kb, vb, is_causal=causal, **kw)

        if hq != hk:
            kw["enable_gqa"] = True
            try:
                call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                torch.cuda.synchronize()
                note = "enable_gqa=True"
            except Exception as e:  # noqa: BLE001
                if not self.context_ok():
                    raise
                kw.pop("enable_gqa")
                k, v = (x.repeat_interleave(hq // hk, dim=2) for x in (k, v))
                note = f"repeat_interleave'd K/V (reads {hq // hk}x the K/V bytes; enable_gqa failed: " \
                       f"{short(_first_line(e), 60)})"
        if mode == "fwd":
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            return Bench(lambda: call(qt, kt, vt), canon=lambda r: [r.transpose(1, 2)], note=note)
        ql, kl, vl = (x.detach().requires_grad_(True) for x in (q, k, v))
        dot = cell.dout.transpose(1, 2)
        if mode == "train":
            def train():
                o = call(ql.transpose(1, 2), kl.transpose(1, 2), vl.transpose(1, 2))
                return torch.autograd.grad(o, (ql, kl, vl), dot)
            return Bench(train, note=note)
        o = call(ql.transpose(1, 2), kl.transpose(1, 2), vl.transpose(1, 2))
        return Bench(lambda: torch.autograd.grad(o, (ql, kl, vl), dot, retain_graph=True), canon=list,
                     note=(note + " " if note else "") + "autograd.grad(retain_graph=True) only")

    def _build_jax(self, cell, mode, causal, p=0.0):
        if p > 0:
            raise Skip("jax.nn.dot_product_attention has no dropout")
        jax = self.jax
        jq, jk, jv, jdo = cell.jax_inputs()
        f = functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn")
        block = jax.block_until_ready
        if mode == "fwd":
            jf = jax.jit(f)
            return Bench(lambda: jf(jq, jk, jv), kind="wall", block=block, note="own random inputs")
        _, vjp_fn = jax.vjp(f, jq, jk, jv)
        g = jax.jit(lambda vf, do: vf(do))
        try:
            block(g(vjp_fn, jdo))
            return Bench(lambda: g(vjp_fn, jdo), kind="wall", block=block,
                         note="jit(vjp_fn)(dout): backward only")
        except Exception as e:  # noqa: BLE001
            jf = jax.jit(f)
            fb = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
            block(jf(jq, jk, jv))
            return Bench(lambda: fb(jq, jk, jv, jdo), kind="wall", block=block, sub=lambda: jf(jq, jk, jv),
                         note=f"fwd+bwd minus fwd (jit of vjp_fn failed: {short(_first_line(e), 60)})")

    # -- correctness --
    def rel_err(self, got, ref):
        torch = self.torch
        worst = 0.0
        for a, b in zip(got, ref):
            a, b = a.float(), b.float()
            if not bool(torch.isfinite(a).all()):
                return float("inf")
            den = float(b.abs().max()) or 1.0
            worst = max(worst, float((a - b).abs().max()) / den)
        return worst

    # -- the grid --
    def run_grid(self):
        cfg, res = self.cfg, self.res
        order = [i for i in MEASURE_ORDER if i in cfg.impls]
        if DET in order and "fwd" in cfg.modes:
            print(f"[skip] {DET}: backward only (deterministic=True changes only the backward); "
                  f"not measured in fwd cells")
        check = cfg.check and cfg.dropout == 0
        if cfg.check and not check:
            print("note: correctness check off: with dropout the implementations draw different masks")
        if cfg.dropout > 0:
            print(f"dropout: p={cfg.dropout:g} on every implementation that has it; cuflash seed {cfg.dropout_seed}")
        if cfg.dropout_compare:
            print(f"dropout compare: cuflash-drop and torch-fa2-drop at p={cfg.dropout_compare:g}, the others at "
                  f"p=0; cuflash seed {cfg.dropout_seed}")
        for hd in cfg.headdims:
            for s in cfg.seqlens:
                if res.fatal:
                    break
                batch, nheads = grid_shape(s, hd)
                try:
                    cell = Cell(self, batch, s, s, nheads, nheads, hd, need_dout="bwd" in cfg.modes,
                                seed=cfg.seed + 1000 * hd + s)
                except Exception as e:  # noqa: BLE001
                    print(f"  [error] inputs d{hd} s{fmt_size(s)}: {_first_line(e)}")
                    self.torch.cuda.empty_cache()
                    continue
                for causal in cfg.causals:
                    for mode in cfg.modes:
                        where = f"{mode} {causal_name(causal)} d{hd} s{fmt_size(s)}"
                        flops = attn_flops(batch, nheads, s, s, hd, causal, mode)
                        ref, got = None, {}
                        morder = [i for i in order if i != DET or mode == "bwd"]
                        for impl in morder:
                            keep = check and ((impl in REF_ORDER and ref is None) or impl in CHECKED)
                            row, out = self.run_impl(impl, self.builder(impl, cell, mode, causal), where, keep)
                            if out is not None and impl in REF_ORDER and ref is None:
                                ref = out
                            elif out is not None and impl in CHECKED:
                                got[impl] = out
                            row.update(mode=mode, causal=causal, headdim=hd, seqlen=s, batch=batch, nheads=nheads,
                                       dtype=cfg.dtype, check_rel_err=None, dropout_p=self.impl_dropout(impl),
                                       tflops=(flops / (row["ms"] * 1e-3) / 1e12) if row["ms"] else None)
                            res.grid.append(row)
                        for impl, out in got.items():
                            if ref is not None:
                                r = next(x for x in reversed(res.grid) if x["impl"] == impl)
                                try:
                                    r["check_rel_err"] = self.rel_err(out, ref)
                                except Exception as e:  # noqa: BLE001
                                    print(f"  [check] {impl} {where}: {_first_line(e)}")
                                if r["check_rel_err"] is not None and not (r["check_rel_err"] <= CHECK_TOL[mode]):
                                    print(f"  CHECK FAILED {impl} {where}: rel err {r['check_rel_err']:.3e} "
                                          f"(tol {CHECK_TOL[mode]})")
                        del ref, got
                        cur = [r for r in res.grid[-len(morder):]]
                        print(f"{where:<28} " + " | ".join(
                            f"{r['impl']} {fnum(r['tflops'], 0, 1).strip()}" for r in cur), flush=True)
                del cell
                self.torch.cuda.empty_cache()
            for mode in cfg.modes:
                for causal in cfg.causals:
                    t = format_grid_table(res.grid, mode, causal, hd,
                                          [i for i in IMPLS if i in cfg.impls and i != NODECODE])
                    if t:
                        print("\n" + t + "\n", flush=True)

    # -- decode --
    def copy_bandwidth(self):
        torch = self.torch
        try:
            bufs = [torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").fill_(7)]
            bufs.append(torch.empty_like(bufs[0]))

            def copy():
                return bufs[1].copy_(bufs[0])
            ms = self.timing.events(copy) if self.cfg.timer != "wall" else \
                self.timing.wall(copy, lambda r: torch.cuda.synchronize())
            bufs.clear()
            torch.cuda.empty_cache()
            return 2 * COPY_BYTES / (ms * 1e-3) / 1e9
        except Exception as e:  # noqa: BLE001
            print(f"  [error] device copy bandwidth: {_first_line(e)}")
            torch.cuda.empty_cache()
            return None

    def run_decode(self):
        cfg, res = self.cfg, self.res
        res.copy_gbps = self.copy_bandwidth()
        print(f"device-to-device copy bandwidth (torch copy_ of {COPY_BYTES >> 30} GiB, 2*bytes/time): "
              f"{fnum(res.copy_gbps, 0, 0).strip()} GB/s")
        order = [i for i in MEASURE_ORDER if i in cfg.impls and i not in VARIANTS]   # inference: no dropout
        if NODECODE in cfg.impls:   # right after cuflash: the same inputs, the decode path off
            order.insert(order.index("cuflash") + 1 if "cuflash" in order else len(order), NODECODE)
            self.decode_switch = True
            print("decode compare: cuflash-nodecode = cuflash with CUFLASH_DISABLE_DECODE=1 (the sm80 path's "
                  "packed-GQA split-KV forward)")
        try:
            self._decode_cells(order)
        finally:
            if getattr(self, "decode_switch", False):
                self.decode_switch = False
                os.environ.pop("CUFLASH_DISABLE_DECODE", None)
                clear = getattr(getattr(self.cuflash, "_api", None), "clear_plan_cache", None)
                if clear is not None:
                    clear()

    def _decode_cells(self, order):
        cfg, res = self.cfg, self.res
        itemsize = 2
        for b in cfg.decode_batches:
            for sk in cfg.decode_seqlens:
                if res.fatal:
                    return
                where = f"decode b{b} sk{fmt_size(sk)}"
                try:
                    cell = Cell(self, b, 1, sk, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEADDIM, False,
                                seed=cfg.seed + 7 * b + sk)
                except Exception as e:  # noqa: BLE001
                    print(f"  [error] inputs {where}: {_first_line(e)}")
                    self.torch.cuda.empty_cache()
                    continue
                nbytes = decode_bytes(b, sk, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEADDIM, itemsize)
                ref, got = None, {}
                for impl in order:
                    keep = cfg.check and ((impl in REF_ORDER and ref is None) or impl in CHECKED)
                    builder = self.builder(impl, cell, "fwd", False, p=0.0)
                    row, out = self.run_impl(impl, builder, where, keep)
                    if out is not None and impl in REF_ORDER and ref is None:
                        ref = out
                    elif out is not None and impl in CHECKED:
                        got[impl] = out
                    gbps = nbytes / (row["ms"] * 1e-3) / 1e9 if row["ms"] else None
                    row.update(batch=b, seqlen_k=sk, nheads=DECODE_HEADS, nheads_k=DECODE_KV_HEADS,
                               headdim=DECODE_HEADDIM, dtype=cfg.dtype, bytes=nbytes, gbps=gbps,
                               frac_copy=ratio(gbps, res.copy_gbps), wall_us=None, check_rel_err=None)
                    if row["status"] == "ok" and impl != "jax-cudnn" and cfg.timer != "wall":
                        try:   # end-to-end per call, host overhead included (no flush, back-to-back calls)
                            bench = builder()
                            row["wall_us"] = 1e3 * self.timing.wall(bench.fn, lambda r: self.torch.cuda.synchronize())
                        except Exception:  # noqa: BLE001
                            pass
                    elif row["status"] == "ok":
                        row["wall_us"] = row["ms"] * 1e3
                    if row["status"] == "ok" and row.get("note") and impl in SDPA_BACKENDS:
                        res.decode_notes.add(f"{impl}: {row['note']}")
                    res.decode.append(row)
                for impl, out in got.items():
                    if ref is not None:
                        r = next(x for x in reversed(res.decode) if x["impl"] == impl)
                        try:
                            r["check_rel_err"] = self.rel_err(out, ref)
                        except Exception as e:  # noqa: BLE001
                            print(f"  [check] {impl} {where}: {_first_line(e)}")
                            continue
                        if not (r["check_rel_err"] <= CHECK_TOL["fwd"]):
                            print(f"  CHECK FAILED {impl} {where}: rel err {r['check_rel_err']:.3e}")
                del ref, got
                cur = [r for r in res.decode[-len(order):]]
                print(f"{where:<22} " + " | ".join(f"{r['impl']} {fnum(r['gbps'], 0, 0).strip()} GB/s" for r in cur),
                      flush=True)
                del cell
                self.torch.cuda.empty_cache()
        print("\n" + format_decode_table(res.decode, [i for i in IMPLS if i in cfg.impls and i not in VARIANTS],
                                         res.copy_gbps))
        for line in decode_ratio_summary(res.decode):
            print(line)
        print()

    # -- memory --
    def _peak_extra(self, fn):
        torch = self.torch
        r = fn()          # warm-up (compile, lazy workspaces)
        torch.cuda.synchronize()
        del r
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del r
        return peak

    def _jax_memory(self, shape, causal, phase):
        jax = self.jax
        f = functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn")
        sds = jax.ShapeDtypeStruct(shape, self.jdtype)
        if phase == "fwd":
            comp = jax.jit(f).lower(sds, sds, sds).compile()
        else:
            comp = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do)).lower(sds, sds, sds, sds).compile()
        ma = comp.memory_analysis()
        if ma is None:
            raise RuntimeError("compiled.memory_analysis() returned None")
        return ma.output_size_in_bytes + ma.temp_size_in_bytes

    def run_memory(self):
        cfg, res, torch = self.cfg, self.res, self.torch
        b, h, d = MEMORY_BATCH, MEMORY_HEADS, MEMORY_HEADDIM
        for s in cfg.memory_seqlens:
            shape = (b, s, h, d)
            el = b * s * h * d * 2
            base = dict(seqlen=s, batch=b, nheads=h, headdim=d, dtype=cfg.dtype, dropout_p=cfg.dropout)
            res.memory.append(dict(base, impl="outputs-only", phase="fwd", status="ok", dropout_p=None,
                                   extra_mib=(el + b * h * s * 4) / 2 ** 20, method="out + lse"))
            res.memory.append(dict(base, impl="outputs-only", phase="fwd+bwd", status="ok", dropout_p=None,
                                   extra_mib=(4 * el + b * h * s * 4) / 2 ** 20, method="out, lse, dq, dk, dv"))
            try:
                cell = Cell(self, b, s, s, h, h, d, True, seed=cfg.seed + s)
            except Exception as e:  # noqa: BLE001
                print(f"  [error] memory inputs s{fmt_size(s)}: {_first_line(e)}")
                continue
            for impl in [i for i in MEASURE_ORDER if i in cfg.impls and i not in VARIANTS]:
                for phase in ("fwd", "fwd+bwd"):
                    where = f"memory {phase} s{fmt_size(s)}"
                    row = dict(base, impl=impl, phase=phase, status="ok", extra_mib=None, method="", note="")
                    if res.fatal or self.available.get(impl):
                        row.update(status="skip", note=res.fatal or self.available[impl])
                        res.memory.append(row)
                        continue
                    if impl == "cuflash-cupy":
                        row.update(status="skip", note="allocates from CuPy's pool, invisible to torch's counters")
                        res.memory.append(row)
                        continue
                    try:
                        if impl == "jax-cudnn":
                            if cfg.dropout > 0:
                                raise Skip("jax.nn.dot_product_attention has no dropout")
                            row["extra_mib"] = self._jax_memory(shape, False, phase) / 2 ** 20
                            row["method"] = "XLA memory_analysis: output+temp"
                        else:
                            mode = "fwd" if phase == "fwd" else "train"
                            bench = self.builder(impl, cell, mode, False)()
                            row["extra_mib"] = self._peak_extra(bench.fn) / 2 ** 20
                            row["method"] = "torch max_memory_allocated - inputs"
                    except Skip as e:
                        row.update(status="skip", note=str(e))
                    except NotImplementedError as e:
                        row.update(status="skip", note=f"not implemented: {_first_line(e)}")
                    except Exception as e:  # noqa: BLE001
                        if impl.startswith("cuflash") and isinstance(e, (ImportError, AttributeError)):
                            row.update(status="skip", note=f"not available yet: {_first_line(e)}")
                        else:
                            row.update(status="oom" if _is_oom(e) else "error", note=short(_first_line(e), 300))
                        if not self.context_ok():
                            res.fatal = f"CUDA context unusable after {impl} {where}"
                        torch.cuda.empty_cache()
                    if row["status"] != "ok":
                        self.note(impl, where, row["status"], row["note"])
                    res.memory.append(row)
                    print(f"{where:<24} {impl:<13} {fnum(row['extra_mib'], 0, 0).strip()} MiB", flush=True)
            del cell
            torch.cuda.empty_cache()
        print("\n" + format_memory_table(res.memory) + "\n")

    # -- first-call latency --
    def run_latency(self):
        self.res.latency = run_latency(self.cfg)
        print("\n" + format_latency(self.res.latency) + "\n")


LATENCY_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import cuflash
t2 = time.perf_counter()
shape, dtype = SHAPE, getattr(torch, DTYPE)
res = {"import_torch_s": t1 - t0, "import_cuflash_s": t2 - t1}
q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
torch.cuda.synchronize()
def timed(f):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = f()
    torch.cuda.synchronize()
    return time.perf_counter() - t, r
res["fwd_first_s"], _ = timed(lambda: cuflash.attention(q, k, v, causal=True))
res["fwd_second_s"], _ = timed(lambda: cuflash.attention(q, k, v, causal=True))
res["fwd_lse_first_s"], (o, lse) = timed(lambda: cuflash.attention(q, k, v, causal=True, return_lse=True))
try:
    res["bwd_first_s"], _ = timed(lambda: cuflash.attention_backward(do, q, k, v, o, lse, causal=True))
    res["bwd_second_s"], _ = timed(lambda: cuflash.attention_backward(do, q, k, v, o, lse, causal=True))
except Exception as e:
    res["bwd_error"] = type(e).__name__ + ": " + str(e).strip().splitlines()[0][:200]
print("CUFLASH_LATENCY " + json.dumps(res), flush=True)
"""


def _cuflash_root():
    """Directory to put on PYTHONPATH so that a fresh process imports the same cuflash."""
    spec = importlib.util.find_spec("cuflash")
    if spec and spec.origin:
        return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    return None


def _dir_summary(path):
    n, size = 0, 0
    for root, _, files in os.walk(path):
        for f in files:
            n += 1
            try:
                size += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return n, size


def run_latency(cfg):
    out = {"shape": LATENCY_SHAPE, "dtype": cfg.dtype}
    root = _cuflash_root()
    code = LATENCY_CODE.replace("SHAPE", repr(tuple(LATENCY_SHAPE))).replace(
        "DTYPE", repr({"bf16": "bfloat16", "fp16": "float16"}[cfg.dtype]))
    tmp = tempfile.mkdtemp(prefix="cuflash_latency_")
    try:
        env = dict(os.environ)
        env["CUFLASH_CACHE_DIR"] = os.path.join(tmp, "cuflash")
        env["CUPY_CACHE_DIR"] = os.path.join(tmp, "cupy")
        env["CUDA_CACHE_PATH"] = os.path.join(tmp, "cuda")
        if root:
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for run in ("cold", "warm"):
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   timeout=cfg.latency_timeout)
            except subprocess.TimeoutExpired:
                out[run] = {"error": f"timed out after {cfg.latency_timeout} s"}
                print(f"latency {run}: timed out")
                continue
            wall = time.perf_counter() - t0
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CUFLASH_LATENCY ")), None)
            if p.returncode != 0 or line is None:
                tail = (p.stderr or p.stdout or "").strip().splitlines()[-3:]
                out[run] = {"error": f"exit {p.returncode}: " + " | ".join(tail)}
            else:
                out[run] = json.loads(line.split(" ", 1)[1])
                out[run]["process_s"] = wall
            print(f"latency {run}: {json.dumps(out[run])}", flush=True)
            if run == "cold":
                n, size = _dir_summary(env["CUFLASH_CACHE_DIR"])
                out["cache"] = f"{n} files, {size / 2 ** 20:.1f} MiB in CUFLASH_CACHE_DIR"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- configuration -----------------------------------------------------------------------------

def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog, description="Benchmark cuflash against torch SDPA (FA2, cuDNN, mem-efficient) and JAX cuDNN.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --mode, the fwd+bwd grid runs unless --decode/--memory/--latency is given (then only "
               "those run; add --mode both to get the grid too). Sizes accept 'k': 512,1k,16k. "
               "cuflash-det (cuflash backward with deterministic=True) is measured in bwd cells by default; the "
               "summary reports cuflash-det/cuflash ('deterministic cost').")
    p.add_argument("--mode", choices=("fwd", "bwd", "both", "none"), default=None,
                   help="grid: forward, backward (timed alone), both, or none (default: both)")
    p.add_argument("--headdims", type=parse_sizes, default=None, help="comma list (default 64,128,256)")
    p.add_argument("--seqlens", type=parse_sizes, default=None, help="comma list (default 512,1k,2k,4k,8k,16k)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "bfloat16", "float16"), default="bf16")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--impls", default=None,
                   help=f"comma list among {','.join(IMPLS)} (default: all but cuflash-cupy and the *-drop ones, "
                        "which --dropout-compare adds; cuflash-det runs in bwd cells only)")
    p.add_argument("--cupy", action="store_true", help="also measure cuflash on CuPy arrays (cuflash-cupy)")
    p.add_argument("--dropout", type=parse_prob, default=0.0, metavar="P",
                   help="dropout probability for every implementation that has it (grid and --memory; cuflash "
                        f"with seed {DROPOUT_SEED}+--seed, fwd and bwd alike; jax-cudnn: skipped; the correctness "
                        "check is off). Default 0")
    p.add_argument("--dropout-compare", type=parse_prob, default=None, metavar="P",
                   help="grid: also measure cuflash-drop (cuflash at dropout P) and torch-fa2-drop (torch-fa2 at "
                        "P) next to the p=0 implementations; the summary gives cuflash-drop/cuflash and "
                        "cuflash-drop/torch-fa2-drop per cell")
    p.add_argument("--no-jax", action="store_true", help="leave out jax-cudnn (JAX is not imported)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: headdim 128, seqlen 1k and 4k (decode: batch 1,8, seqlen_k 4k,32k; memory: 16k)")
    p.add_argument("--decode", action="store_true", help="decode bandwidth: q len 1, GQA 32/8, d128, batch 1..8, "
                                                         "seqlen_k 4k..128k")
    p.add_argument("--decode-compare", action="store_true",
                   help="--decode, plus cuflash-nodecode: cuflash with CUFLASH_DISABLE_DECODE=1 (the sm80 path) "
                        "in the same cells; the table adds cf/off = cuflash / cuflash-nodecode")
    p.add_argument("--decode-batches", type=parse_sizes, default=None)
    p.add_argument("--decode-seqlens", type=parse_sizes, default=None)
    p.add_argument("--memory", action="store_true", help="peak memory at seqlen 16k and 64k (b1, h16, d128)")
    p.add_argument("--memory-seqlens", type=parse_sizes, default=None)
    p.add_argument("--latency", action="store_true", help="cold/warm first-call latency in fresh processes")
    p.add_argument("--latency-timeout", type=float, default=420.0, help="seconds per latency subprocess")
    p.add_argument("--all", action="store_true", help="grid + decode + memory + latency")
    p.add_argument("--warmup", type=float, default=25.0, help="warm-up per measurement, ms (default 25)")
    p.add_argument("--rep", type=float, default=50.0, help="timed repetitions per measurement, ms (default 50)")
    p.add_argument("--min-iters", type=int, default=10, help="at least this many timed calls (default 10)")
    p.add_argument("--timer", choices=("auto", "events", "wall"), default="auto",
                   help="torch/cuflash timing: CUDA events via do_bench (auto/events) or pipelined wall clock")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the cuflash-vs-torch-fa2 correctness check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", default=None, help="default: $OUT if set, else bench_out")
    p.add_argument("--csv", default=None, help="grid CSV (default bench_results.csv in --outdir; decode and "
                                                "memory go to <stem>_decode.csv, <stem>_memory.csv)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--selftest", action="store_true", help="check tables/CSV/plots on fake numbers (no GPU)")
    return p


class Config:
    pass


def resolve(args) -> Config:
    c = Config()
    c.dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, args.dtype)
    c.quick = args.quick
    extras = args.decode or args.decode_compare or args.memory or args.latency
    mode = args.mode or ("both" if (args.all or not extras) else "none")
    c.modes = {"fwd": ("fwd",), "bwd": ("bwd",), "both": ("fwd", "bwd"), "none": ()}[mode]
    c.headdims = args.headdims or (QUICK_HEADDIMS if args.quick else DEFAULT_HEADDIMS)
    c.seqlens = args.seqlens or (QUICK_SEQLENS if args.quick else DEFAULT_SEQLENS)
    c.causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    c.dropout = float(args.dropout or 0.0)
    c.dropout_compare = args.dropout_compare
    if c.dropout_compare is not None and not c.dropout_compare > 0:
        raise SystemExit("--dropout-compare P needs P > 0")
    if c.dropout_compare and c.dropout > 0:
        raise SystemExit("--dropout-compare P measures cuflash at p=0 and at p=P: do not combine it with --dropout")
    c.dropout_seed = DROPOUT_SEED + args.seed
    if args.impls:
        impls = tuple(x.strip() for x in args.impls.split(",") if x.strip())
        bad = [x for x in impls if x not in IMPLS]
        if bad:
            raise SystemExit(f"unknown --impls {bad}; choose among {', '.join(IMPLS)}")
        if not c.dropout_compare and any(x in DROP_IMPLS for x in impls):
            raise SystemExit(f"{', '.join(DROP_IMPLS)} need --dropout-compare P")
    else:
        impls = DEFAULT_IMPLS
    if c.dropout_compare:
        impls = impls + ("cuflash",) + DROP_IMPLS
    if args.cupy and "cuflash-cupy" not in impls:
        impls = impls + ("cuflash-cupy",)
    if args.decode_compare and NODECODE not in impls:
        impls = impls + (NODECODE,)
    if args.no_jax:
        impls = tuple(i for i in impls if i != "jax-cudnn")
    c.impls = tuple(i for i in IMPLS if i in impls)
    c.decode = args.decode or args.decode_compare or args.all
    c.memory = args.memory or args.all
    c.latency = args.latency or args.all
    c.decode_batches = args.decode_batches or (QUICK_DECODE_BATCHES if args.quick else DECODE_BATCHES)
    c.decode_seqlens = args.decode_seqlens or (QUICK_DECODE_SEQLENS if args.quick else DECODE_SEQLENS)
    c.memory_seqlens = args.memory_seqlens or (MEMORY_SEQLENS[:1] if args.quick else MEMORY_SEQLENS)
    c.latency_timeout = args.latency_timeout
    c.warmup, c.rep, c.min_iters, c.timer = args.warmup, args.rep, max(1, args.min_iters), args.timer
    c.check, c.seed = args.check, args.seed
    c.outdir = args.outdir or os.environ.get("OUT") or "bench_out"
    csv_path = args.csv or "bench_results.csv"
    c.csv = csv_path if os.path.dirname(csv_path) else os.path.join(c.outdir, csv_path)
    c.plot = not args.no_plot
    return c


def _ensure_importable():
    """Running ``python benchmarks/bench_attention.py`` from a checkout: make ../cuflash importable."""
    if importlib.util.find_spec("cuflash") is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isfile(os.path.join(root, "cuflash", "__init__.py")):
            sys.path.insert(0, root)


def write_outputs(cfg, res):
    stem, ext = os.path.splitext(cfg.csv)
    files = []
    try:
        if res.grid:
            files.append(write_csv(cfg.csv, res.grid, GRID_FIELDS))
        if res.decode:
            files.append(write_csv(f"{stem}_decode{ext or '.csv'}", res.decode, DECODE_FIELDS))
        if res.memory:
            files.append(write_csv(f"{stem}_memory{ext or '.csv'}", res.memory, MEMORY_FIELDS))
        meta = {"env": res.env, "timer": res.timer_desc, "copy_gbps": res.copy_gbps, "latency": res.latency,
                "dropout": res.dropout, "argv": sys.argv, "fatal": res.fatal}
        path = f"{stem}_meta.json"
        with open(path, "w") as f:
            json.dump(meta, f, indent=1, default=str)
        files.append(path)
    except Exception as e:  # noqa: BLE001
        print(f"[error] writing CSV: {_first_line(e)}")
    if cfg.plot:
        try:
            if res.grid:
                files += plot_grid(res.grid, cfg.outdir)
            if res.decode:
                files += plot_decode(res.decode, cfg.outdir, res.copy_gbps)
        except Exception as e:  # noqa: BLE001
            print(f"[skip] plots: {_first_line(e)}")
    res.files = files
    return files


def main(argv=None, prog=None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.selftest:
        return selftest(args.outdir)
    cfg = resolve(args)
    os.makedirs(cfg.outdir, exist_ok=True)
    _ensure_importable()
    t_start = time.time()
    res = Results()
    res.dropout = {"p": cfg.dropout, "compare": cfg.dropout_compare, "seed": cfg.dropout_seed}
    status = 0
    try:
        runner = Runner(cfg, res)
    except Exception as e:  # noqa: BLE001
        print(f"cannot benchmark: {_first_line(e)}")
        return 2
    env = res.env
    print(f"GPU {env.get('gpu')} | torch {env.get('torch')} | cuflash {env.get('cuflash', 'n/a')} | "
          f"jax {env.get('jax', 'n/a')} | triton {env.get('triton', 'n/a')} | cupy {env.get('cupy', 'n/a')}")
    print(f"timing: {res.timer_desc}")
    print(f"grid: modes {','.join(cfg.modes) or 'none'} | headdims {cfg.headdims} | seqlens "
          f"{','.join(fmt_size(s) for s in cfg.seqlens)} | causal {cfg.causals} | {cfg.dtype} | impls "
          f"{','.join(cfg.impls)}; FLOPs = 4*B*H*S*S*D (/2 causal, x2.5 bwd), B*S = {TOKENS}, H*D = {HIDDEN}")
    # torch SDPA explains each backend it rejects with UserWarnings; run_impl records them for the
    # failure message, everywhere else they are noise.
    warnings.filterwarnings("ignore", message=r"(?s).*(kernel not used because|has been runtime disabled|"
                                              r"For dense input|Triggered internally)")
    try:
        if cfg.latency:
            runner.run_latency()
        if cfg.modes:
            runner.run_grid()
        if cfg.decode and not res.fatal:
            runner.run_decode()
        if cfg.memory and not res.fatal:
            runner.run_memory()
    except KeyboardInterrupt:
        print("interrupted: writing what was measured")
        status = 130
    if res.fatal:
        status = status or 1
    write_outputs(cfg, res)
    res.elapsed = time.time() - t_start
    print("\n" + format_summary(res), flush=True)
    return status


# ---- self-test (no GPU) ------------------------------------------------------------------------

def _fake_results(seed=1, dropout=0.0, compare=0.1):
    """Synthetic Results. ``dropout``: every row at that p (as --dropout); ``compare``: add the *-drop rows
    at that p (as --dropout-compare; ignored when ``dropout`` > 0)."""
    import random

    rnd = random.Random(seed)
    res = Results()
    res.env = {"gpu": "FAKE H100 (selftest)", "torch": "x", "cuflash": "0.0", "jax": "x", "cupy": "x", "triton": "x"}
    res.timer_desc = "selftest: synthetic numbers"
    compare = None if dropout > 0 else compare
    res.dropout = {"p": dropout, "compare": compare, "seed": DROPOUT_SEED}
    peak = {"cuflash": 1.0, "torch-fa2": 0.8, "torch-cudnn": 1.05, "torch-memeff": 0.55, "jax-cudnn": 1.02,
            "cuflash-cupy": 0.99, "cuflash-det": 0.85, "cuflash-drop": 0.82, "torch-fa2-drop": 0.7,
            "cuflash-nodecode": 0.75}
    for hd in DEFAULT_HEADDIMS:
        for s in DEFAULT_SEQLENS:
            b, h = grid_shape(s, hd)
            for causal in (False, True):
                for mode in ("fwd", "bwd"):
                    flops = attn_flops(b, h, s, s, hd, causal, mode)
                    for impl in IMPLS:
                        if (impl == DET and mode == "fwd") or (impl in DROP_IMPLS and not compare) or impl == NODECODE:
                            continue
                        tf = 500 * peak[impl] * (1 - 0.5 / math.log2(s)) * (0.7 if causal and s < 2048 else 1.0) \
                            * (0.8 if mode == "bwd" else 1.0) * rnd.uniform(0.95, 1.05)
                        p = compare if impl in DROP_IMPLS else dropout
                        row = dict(mode=mode, causal=causal, headdim=hd, seqlen=s, batch=b, nheads=h, dtype="bf16",
                                   impl=impl, status="ok", timer="fake", note="", first_call_s=0.5,
                                   check_rel_err=None, dropout_p=p)
                        if impl == "torch-cudnn" and hd == 256 and mode == "bwd":
                            row.update(status="error", note="RuntimeError: No available kernel. Aborting execution.")
                        elif impl == "jax-cudnn" and dropout > 0:
                            row.update(status="skip", note="jax.nn.dot_product_attention has no dropout")
                        elif impl == "jax-cudnn" and s == 512 and causal:
                            row.update(status="skip", note="fake skip")
                        elif impl == DET and hd == 256 and s == 512 and causal:
                            row.update(status="skip", note="not implemented: fake deterministic skip")
                        if row["status"] == "ok":
                            row["ms"] = flops / (tf * 1e12) * 1e3
                            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                            if impl in CHECKED and not dropout:
                                row["check_rel_err"] = rnd.uniform(1e-3, 8e-3)
                        else:
                            row.update(ms=None, tflops=None)
                            key = (impl, row["status"], row["note"])
                            res.notes[key] = res.notes.get(key, 0) + 1
                        res.grid.append(row)
    if not dropout:
        next(r for r in res.grid if r["impl"] == "cuflash")["check_rel_err"] = 0.5   # one failure to display
    res.copy_gbps = 2950.0
    for b in DECODE_BATCHES:
        for sk in DECODE_SEQLENS:
            nbytes = decode_bytes(b, sk, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEADDIM)
            for impl in ("cuflash", NODECODE, "torch-fa2", "torch-cudnn", "torch-memeff", "jax-cudnn"):
                gbps = min(2700.0, 300.0 * b * sk / 4096) * peak[impl] * rnd.uniform(0.9, 1.0)
                ms = nbytes / (gbps * 1e9) * 1e3
                res.decode.append(dict(batch=b, seqlen_k=sk, nheads=DECODE_HEADS, nheads_k=DECODE_KV_HEADS,
                                       headdim=DECODE_HEADDIM, dtype="bf16", impl=impl, status="ok", ms=ms,
                                       bytes=nbytes, gbps=gbps, frac_copy=gbps / res.copy_gbps,
                                       wall_us=ms * 1e3 + 20, timer="fake",
                                       check_rel_err=2e-3 if impl == "cuflash" else None, note=""))
    res.decode_notes.add("torch-fa2: enable_gqa=True")
    for s in MEMORY_SEQLENS:
        el = s * 16 * 128 * 2
        for impl, fwd, tr in (("outputs-only", el, 4 * el), ("cuflash", el * 1.01, 4.2 * el),
                              ("torch-fa2", el * 1.02, 4.5 * el), ("torch-memeff", None, None),
                              ("jax-cudnn", el * 1.1, 5 * el)):
            for phase, v in (("fwd", fwd), ("fwd+bwd", tr)):
                res.memory.append(dict(seqlen=s, batch=1, nheads=16, headdim=128, dtype="bf16", impl=impl,
                                       phase=phase, status="ok" if v else "oom",
                                       extra_mib=v / 2 ** 20 if v else None, method="fake", note=""))
    res.latency = {"shape": LATENCY_SHAPE, "dtype": "bf16",
                   "cold": {"import_cuflash_s": 0.2, "fwd_first_s": 8.5, "fwd_second_s": 0.0004,
                            "fwd_lse_first_s": 0.001, "bwd_error": "NotImplementedError: later", "process_s": 12.0},
                   "warm": {"import_cuflash_s": 0.2, "fwd_first_s": 0.05, "fwd_second_s": 0.0004,
                            "fwd_lse_first_s": 0.001, "process_s": 3.0},
                   "cache": "3 files, 1.2 MiB in CUFLASH_CACHE_DIR"}
    res.elapsed = 123.0
    return res


def _raises(fn, *a):
    try:
        fn(*a)
    except (SystemExit, argparse.ArgumentTypeError, ValueError):
        return True
    return False


def _selftest_builders(check):
    """The cuflash calls behind cuflash / cuflash-det / cuflash-drop, on a stand-in module (no GPU)."""
    calls = []

    class FakeCuflash:
        @staticmethod
        def attention(q, k, v, **kw):
            calls.append(("fwd", kw))
            return ("out", "lse") if kw.get("return_lse") else "out"

        @staticmethod
        def attention_backward(dout, q, k, v, out, lse, **kw):
            calls.append(("bwd", kw))
            return ("dq", "dk", "dv")

    class FakeCell:
        q = k = v = dout = object()

    cfg = Config()
    cfg.dropout, cfg.dropout_compare, cfg.dropout_seed = 0.0, 0.2, DROPOUT_SEED
    r = Runner.__new__(Runner)
    r.cfg, r.cuflash, r.torch = cfg, FakeCuflash, None

    def run(impl, mode):
        del calls[:]
        r.builder(impl, FakeCell, mode, True)().fn()
        return list(calls)

    seed = DROPOUT_SEED
    ok = run("cuflash", "fwd") == [("fwd", {"causal": True})]
    ok = ok and run("cuflash", "bwd")[-1] == ("bwd", {"causal": True})
    got = run(DET, "bwd")
    ok = ok and got == [("fwd", {"causal": True, "return_lse": True}), ("bwd", {"causal": True, "deterministic": True})]
    got = run("cuflash-drop", "bwd")
    ok = ok and got == [("fwd", {"causal": True, "return_lse": True, "dropout_p": 0.2, "seed": seed}),
                        ("bwd", {"causal": True, "dropout_p": 0.2, "seed": seed})]
    ok = ok and run("cuflash-drop", "fwd") == [("fwd", {"causal": True, "dropout_p": 0.2, "seed": seed})]
    cfg.dropout, cfg.dropout_compare = 0.1, None
    got = run(DET, "train")
    ok = ok and got == [("fwd", {"causal": True, "return_lse": True, "dropout_p": 0.1, "seed": seed}),
                        ("bwd", {"causal": True, "dropout_p": 0.1, "seed": seed, "deterministic": True})]
    ok = ok and r.builder("cuflash", FakeCell, "fwd", True, p=0.0)().note == ""   # decode: never dropout
    check(ok, "cuflash builders: deterministic / dropout_p / seed passed as intended")
    # --decode-compare: cuflash-nodecode turns the decode path off (and clears the plan cache), cuflash on
    cleared = []
    FakeCuflash._api = type("A", (), {"clear_plan_cache": staticmethod(lambda: cleared.append(1))})
    saved = os.environ.pop("CUFLASH_DISABLE_DECODE", None)
    try:
        r.decode_switch = True
        del calls[:]
        b = r.builder(NODECODE, FakeCell, "fwd", False, p=0.0)()
        off = os.environ.get("CUFLASH_DISABLE_DECODE")
        b.fn()
        ok = off == "1" and calls == [("fwd", {"causal": False})] and "CUFLASH_DISABLE_DECODE=1" in b.note
        r.builder("cuflash", FakeCell, "fwd", False, p=0.0)()
        ok = ok and "CUFLASH_DISABLE_DECODE" not in os.environ and len(cleared) == 2
        r.decode_switch = False
        r.builder("cuflash", FakeCell, "fwd", False, p=0.0)()
        ok = ok and len(cleared) == 2
    finally:
        r.decode_switch = False
        if saved is not None:
            os.environ["CUFLASH_DISABLE_DECODE"] = saved
    check(ok, "decode compare builders: CUFLASH_DISABLE_DECODE set / unset, plan cache cleared")
    skips = []
    for impl, mode in ((DET, "fwd"), ("jax-cudnn", "fwd")):
        try:
            r.builder(impl, FakeCell, mode, False)()
        except Skip as e:
            skips.append(str(e))
    check(len(skips) == 2 and "no dropout" in skips[1], "cuflash-det fwd and jax-cudnn with dropout are skips")


def selftest(outdir=None) -> int:
    """Exercise parsing, FLOP counting, tables, summary, CSV round trip and plots on synthetic numbers."""
    failures = []

    def check(cond, what):
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    print("selftest (no GPU):")
    check(parse_size("1k") == 1024 and parse_size("64K") == 65536 and parse_size("512") == 512, "parse_size")
    check(parse_sizes("512,1k,16k") == (512, 1024, 16384), "parse_sizes")
    check(fmt_size(16384) == "16k" and fmt_size(512) == "512" and fmt_size(1536) == "1536", "fmt_size")
    check(attn_flops(32, 16, 512, 512, 128, False, "fwd") == 4 * 32 * 16 * 512 * 512 * 128, "flops fwd")
    check(attn_flops(1, 16, 16384, 16384, 128, True, "fwd") == 2 * 16 * 16384 ** 2 * 128, "flops causal")
    check(attn_flops(2, 8, 100, 200, 64, True, "bwd") == 4 * 2 * 8 * 100 * 200 * 64 / 2 * 2.5, "flops bwd")
    check(all(grid_shape(s, d)[0] * s == TOKENS and grid_shape(s, d)[1] * d == HIDDEN
              for s in DEFAULT_SEQLENS for d in DEFAULT_HEADDIMS), "grid shapes: 16k tokens, hidden 2048")
    check(decode_bytes(1, 4096, 32, 8, 128) == 2 * 128 * (2 * 4096 * 8 + 2 * 32), "decode bytes")
    check(abs(geomean([1.0, 4.0]) - 2.0) < 1e-12 and geomean([None]) is None, "geomean")

    # configuration resolution
    p = build_parser("bench")
    c = resolve(p.parse_args([]))
    check(c.modes == ("fwd", "bwd") and c.headdims == DEFAULT_HEADDIMS and c.seqlens == DEFAULT_SEQLENS
          and c.causals == (False, True) and c.impls == DEFAULT_IMPLS and not c.decode, "default config")
    c = resolve(p.parse_args(["--quick"]))
    check(c.headdims == (128,) and c.seqlens == (1024, 4096), "--quick")
    c = resolve(p.parse_args(["--decode"]))
    check(c.modes == () and c.decode and not c.memory, "--decode alone skips the grid")
    c = resolve(p.parse_args(["--decode", "--mode", "fwd", "--cupy", "--no-jax", "--causal", "true",
                              "--dtype", "float16", "--seqlens", "2k", "--csv", "x.csv", "--outdir", "/tmp/o"]))
    check(c.modes == ("fwd",) and "cuflash-cupy" in c.impls and "jax-cudnn" not in c.impls and c.causals == (True,)
          and c.dtype == "fp16" and c.seqlens == (2048,) and c.csv == os.path.join("/tmp/o", "x.csv"), "flag combo")
    c = resolve(p.parse_args(["--all"]))
    check(c.modes == ("fwd", "bwd") and c.decode and c.memory and c.latency, "--all")
    c = resolve(p.parse_args(["--decode-compare"]))
    check(c.modes == () and c.decode and NODECODE in c.impls and "cuflash" in c.impls
          and NODECODE not in MEASURE_ORDER, "--decode-compare: decode only, cuflash-nodecode added")
    check(parse_prob("0.1") == 0.1 and parse_prob("0") == 0.0 and _raises(parse_prob, "1")
          and _raises(parse_prob, "-0.1") and _raises(parse_prob, "x"), "parse_prob")
    c = resolve(p.parse_args([]))
    check(DET in c.impls and c.dropout == 0 and c.dropout_compare is None
          and not any(i in c.impls for i in DROP_IMPLS), "default: cuflash-det in, no dropout")
    c = resolve(p.parse_args(["--dropout", "0.1", "--seed", "3"]))
    check(c.dropout == 0.1 and c.dropout_seed == DROPOUT_SEED + 3 and c.impls == DEFAULT_IMPLS, "--dropout")
    c = resolve(p.parse_args(["--dropout-compare", "0.15", "--impls", "torch-cudnn"]))
    check(c.dropout == 0 and c.dropout_compare == 0.15
          and c.impls == ("cuflash", "cuflash-drop", "torch-fa2-drop", "torch-cudnn"), "--dropout-compare adds impls")
    check(_raises(resolve, p.parse_args(["--dropout", "0.1", "--dropout-compare", "0.1"]))
          and _raises(resolve, p.parse_args(["--impls", "cuflash-drop"]))
          and _raises(resolve, p.parse_args(["--dropout-compare", "0"])), "dropout flag misuse refused")
    with contextlib.redirect_stderr(io.StringIO()):   # argparse prints its usage message
        check(_raises(p.parse_args, ["--dropout", "1.5"]), "--dropout 1.5 refused by the parser")
    _selftest_builders(check)

    res = _fake_results()
    t = format_grid_table(res.grid, "fwd", True, 128, list(DEFAULT_IMPLS))
    print(t)
    lines = t.splitlines()
    check(len(lines) == 3 + len(DEFAULT_SEQLENS) and "cf/FA2" in lines[1], "grid table shape")
    t = format_grid_table(res.grid, "bwd", False, 256, list(DEFAULT_IMPLS))
    check("n/a" in t, "n/a shown for a failed cell")
    # ratio columns agree with the rows
    idx = index_grid(res.grid)
    key = ("fwd", False, 64, 1024)
    want = _tflops(idx[key + ("cuflash",)]) / _tflops(idx[key + (FA2,)])
    row = [ln for ln in format_grid_table(res.grid, "fwd", False, 64, list(DEFAULT_IMPLS)).splitlines()
           if ln.strip().startswith("1k")][0]
    check(abs(float(row.split("|")[1].split()[0]) - want) < 0.006, "cf/FA2 ratio column")
    check(DET not in format_grid_table(res.grid, "fwd", False, 64, list(IMPLS)), "fwd table: no cuflash-det")
    t = format_grid_table(res.grid, "bwd", False, 64, list(IMPLS))
    print(t)
    key = ("bwd", False, 64, 1024)
    row = [ln for ln in t.splitlines() if ln.strip().startswith("1k")][0].split("|")[1].split()
    want = [_tflops(idx[key + (a,)]) / _tflops(idx[key + (b,)]) for a, b in
            ((DET, "cuflash"), ("cuflash-drop", "cuflash"), ("cuflash-drop", "torch-fa2-drop"))]
    check(DET in t and "det/cf" in t and "drop/FA2d" in t and "*-drop: dropout p=0.1" in t
          and all(abs(float(x) - w) < 0.006 for x, w in zip(row[2:], want)), "bwd table: det/cf, drop/cf, drop/FA2d")
    dets = grid_ratios(idx, "bwd", DET, "cuflash")
    check(len(dets) == 2 * len(DEFAULT_HEADDIMS) * len(DEFAULT_SEQLENS) - 1
          and abs(geomean([x for x, _ in dets]) - 0.85) < 0.05, "det ratios: one per bwd cell where both ran")
    xb = [t for t in grid_ratios(idx, "fwd", "cuflash-drop", "cuflash") if in_drop_bar(*t[1])]
    check(len(xb) == 2 * len(DROP_BAR_HEADDIMS) * 4, "dropout bar cells: d64/d128, 2k..16k, both causal")

    outdir = outdir or tempfile.mkdtemp(prefix="cuflash_bench_selftest_")
    cfg = resolve(p.parse_args(["--outdir", outdir]))
    files = write_outputs(cfg, res)
    res.elapsed = 1.0
    s = format_summary(res)
    print(s)
    check(len(s) <= SUMMARY_LIMIT and "truncated" not in s,
          f"summary fits untruncated, all sections, det + dropout compare ({len(s)} <= {SUMMARY_LIMIT} chars)")
    check("cf/FA2" in s and "cf/off" in s and "decode cuflash / torch-fa2: geomean" in s
          and "decode cuflash / decode path off: geomean" in s, "decode table: cf/FA2, cf/off and their summary")
    check("CHECK FAILED" in s and "geomean" in s and "decode" in s and "memory" in s and "cold" in s
          and "DETERMINISTIC COST" in s and "DROPOUT COMPARE p=0.1" in s, "summary sections")
    want = f"cuflash-det/cuflash bwd: geomean {geomean([x for x, _ in dets]):.2f} over {len(dets)}"
    xs = grid_ratios(idx, "bwd", "cuflash-drop", "cuflash")
    ys = grid_ratios(idx, "bwd", "cuflash-drop", "torch-fa2-drop")
    want_y = (f"| y {geomean([x for x, _ in ys]):.2f}/{min(ys)[0]:.2f} ({_where(min(ys)[1])}) "
              f"{sum(1 for x, _ in ys if x >= 1.0)}/{len(ys)} >= 1.00")
    check(want in s and f"bwd: x all {geomean([x for x, _ in xs]):.2f}/{min(xs)[0]:.2f}" in s and want_y in s,
          "summary det/dropout stats match rows")
    # --dropout P on everything: like-for-like a/b, jax skipped, no compare section, no check
    res2 = _fake_results(seed=2, dropout=0.1)
    res2.elapsed = 1.0
    s2 = format_summary(res2)
    t2 = format_grid_table(res2.grid, "bwd", True, 128, list(DEFAULT_IMPLS))
    print(t2)
    check("DROPOUT p=0.1 on every" in s2 and "DROPOUT COMPARE" not in s2 and "DETERMINISTIC COST" in s2
          and "dropout p=0.1" in t2 and "jax-cudnn skip" in s2 and "fwd worst" not in s2
          and len(s2) <= SUMMARY_LIMIT, f"--dropout summary ({len(s2)} chars) and table")
    check(all(os.path.isfile(f) and os.path.getsize(f) > 0 for f in files), f"{len(files)} files written")
    back = load_csv(cfg.csv)
    check(len(back) == len(res.grid) and back[0]["causal"] == res.grid[0]["causal"]
          and abs(back[10]["tflops"] - res.grid[10]["tflops"]) < 1e-6 * res.grid[10]["tflops"]
          and back[10]["seqlen"] == res.grid[10]["seqlen"]
          and [r["dropout_p"] for r in back] == [r["dropout_p"] for r in res.grid]
          and {r["impl"] for r in back} == {r["impl"] for r in res.grid}, "grid CSV round trip (dropout_p, new impls)")
    stem = os.path.splitext(cfg.csv)[0]
    dec = load_csv(stem + "_decode.csv")
    check(len(dec) == len(res.decode) and isinstance(dec[0]["bytes"], int), "decode CSV round trip")
    check(len(load_csv(stem + "_memory.csv")) == len(res.memory), "memory CSV round trip")
    pngs = [f for f in files if f.endswith(".png")]
    ok = len(pngs) == len(DEFAULT_HEADDIMS) + 1
    for f in pngs:
        with open(f, "rb") as fh:
            ok = ok and fh.read(8) == b"\x89PNG\r\n\x1a\n"
    check(ok, f"{len(pngs)} PNG plots ({', '.join(os.path.basename(f) for f in pngs)})")
    # plots from a re-read CSV (what plot.py does)
    again = plot_grid(back, outdir, prefix="reread")
    check(len(again) == len(DEFAULT_HEADDIMS), "plots from the CSV")
    print(f"selftest outputs in {outdir}")
    print("SELFTEST " + ("PASSED" if not failures else f"FAILED: {failures}"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
