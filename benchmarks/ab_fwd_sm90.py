"""A / B of Hopper forward tile variants, interleaved over several rounds, with the torch SDPA peers.

    python benchmarks/ab_fwd_sm90.py --cells 128:0:4k,256:1:2k --variant 'new=Sm90Tile(128, 128, 2, sched=3)' \
        [--variant ...] [--rounds 5]

Each round times every implementation once per cell (triton do_bench median, CUDA events), in turn, so
that clock and thermal drift fall on all of them alike, and the order turns by one place each round (a
fixed order measured the one timed last a few percent faster); the table gives the median over the rounds,
TFLOP/s in FlashAttention's convention (bf16, 16k tokens, hidden 2048). A variant is a full Sm90Tile
and runs only on cells of its head-dim bucket (one label may name one tile per bucket; "cuflash" is the
table's choice); 'LABEL=Sm90Tile(...)|NAME=V,...' also compiles it with those -D switches
(CUFLASH_NVRTC_DEFINES). Every output is checked against torch's flash backend (max abs difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_cell(s: str) -> tuple[int, bool, int]:
    hd, c, n = s.split(":")
    return int(hd), bool(int(c)), int(n[:-1]) * 1024 if n.endswith("k") else int(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", required=True, help="HEADDIM:CAUSAL:SEQLEN,...")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=Sm90Tile(...)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep", type=int, default=40)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import cuflash
    from cuflash import _api, _launch_sm90

    variants = []  # (label, tile, -D switches): one label may name a tile per head-dim bucket
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        expr, _, defines = rest.partition("|")
        variants.append((label, eval(expr, {"Sm90Tile": _launch_sm90.Sm90Tile}), defines))  # noqa: S307
    tiles0, wide0 = dict(_launch_sm90.SM90_FORWARD_TILES), dict(_launch_sm90.SM90_WIDE_TILES)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.rounds} rounds")
    os.environ["CUFLASH_DISABLE_SM90"] = "0"
    times: dict[tuple, list[float]] = {}
    errs: dict[tuple, float] = {}
    cells = [parse_cell(c) for c in args.cells.split(",")]
    data = {}
    for hd, causal, s in cells:
        b, h = max(1, 16384 // s), 2048 // hd
        q, k, v = (torch.randn(b, s, h, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        data[(hd, causal, s)] = (q, k, v)

    def with_tile(tile, defines, fn):
        _launch_sm90.SM90_WIDE_TILES.clear()  # the variant replaces the bucket's tile (wide ones too)
        _launch_sm90.SM90_FORWARD_TILES[tile.headdim_bucket] = tile
        _api.clear_plan_cache()
        before = os.environ.get("CUFLASH_NVRTC_DEFINES", "")
        os.environ["CUFLASH_NVRTC_DEFINES"] = defines or before  # the variant's compile-time switches
        try:
            return fn()
        finally:
            os.environ["CUFLASH_NVRTC_DEFINES"] = before
            _launch_sm90.SM90_FORWARD_TILES.update(tiles0)
            _launch_sm90.SM90_WIDE_TILES.update(wide0)
            _api.clear_plan_cache()

    for r in range(args.rounds):
        for cell in cells:
            hd, causal, s = cell
            q, k, v = data[cell]
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            impls = {}
            for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                def peer(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                impls[name] = (peer, None)
            impls["cuflash"] = (lambda: cuflash.attention(q, k, v, causal=causal), None)
            bucket = _launch_sm90.tile_for(hd).headdim_bucket
            for label, tile, defines in variants:
                if tile.headdim_bucket == bucket:
                    impls[label] = (lambda: cuflash.attention(q, k, v, causal=causal), (tile, defines))
            ref = None
            order = list(impls.items())
            order = order[:1] + order[1:][r % (len(order) - 1):] + order[1:][:r % (len(order) - 1)]  # fa2 first
            for name, (fn, tile) in order:
                def timed(fn=fn):
                    o = fn()
                    return o, do_bench(fn, warmup=10, rep=args.rep, return_mode="median")
                o, ms = with_tile(*tile, timed) if tile is not None else timed()
                if name == "fa2":
                    ref = o.transpose(1, 2)
                elif r == 0 and name not in ("cudnn",):
                    errs[cell + (name,)] = float((o.float() - ref.float()).abs().max())
                times.setdefault(cell + (name,), []).append(ms)
        print(f"round {r + 1} done", flush=True)
    names = list(dict.fromkeys(key[3] for key in times))
    print(f"{'hd':>4} {'c':>2} {'seqlen':>6} " + " ".join(f"{n:>10}" for n in names) + "   (TFLOP/s, median of rounds; / cudnn)")
    for cell in cells:
        hd, causal, s = cell
        flops = 4 * 16384 * 2048 * s / (2 if causal else 1)  # 4 B H S^2 D with B S = 16k, H D = 2048
        vals = {n: flops / statistics.median(times[cell + (n,)]) / 1e9 for n in names if cell + (n,) in times}
        cd = vals.get("cudnn")
        line = f"{hd:>4} {int(causal):>2} {s:>6} " + " ".join(
            f"{vals[n]:>10.1f}" if n in vals else f"{'':>10}" for n in names)
        line += "   " + " ".join(f"{n}={vals[n] / cd:.3f}" for n in names if n in vals and n not in ("fa2", "cudnn"))
        print(line)
    bad = {k: e for k, e in errs.items() if not e < 0.05}
    print(f"outputs vs torch flash: {len(errs) - len(bad)} ok, {len(bad)} bad {bad if bad else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
