#!/usr/bin/env python3
"""Decode-kernel tuning sweep: cuflash's decode path with other tiles / split counts, next to FA2.

    python benchmarks/bench_decode_tiles.py                      # d128, batch 1 and 8, 4k..128k keys
    python benchmarks/bench_decode_tiles.py --tiles 4x3,4x4,2x6 --splits 0,16,32,64 --batches 1,2,4,8

The decode benchmark's shape (seqlen_q 1, 32 query / 8 kv heads, bf16). Each row times
``cuflash.attention`` with ``CUFLASH_DECODE_TILE`` (WARPSxSTAGES[xKEYS], "default" = the dispatcher's
tile) and ``num_splits`` (0 = the heuristic), the plan cache cleared in between, then torch SDPA's
FlashAttention-2 (enable_gqa) and cuflash with the decode path off (CUFLASH_DISABLE_DECODE=1). Timing:
triton.testing.do_bench (CUDA events, L2 flushed before each call, median), as bench_attention.py.
GB/s = (K + V + q + out bytes) / time; the last column is the fraction of the device-to-device copy
bandwidth. Each cuflash output is checked against FA2's (max |diff|).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADS, KV_HEADS = 32, 8


def parse_sizes(s: str) -> list[int]:
    return [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seqlens", default="4k,16k,32k,128k")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--tiles", default="default,4x4,2x6,2x4x32,4x2x32,8x2",
                    help="CUFLASH_DECODE_TILE values (WARPSxSTAGES[xKEYS]); 'default' = the dispatcher's")
    ap.add_argument("--splits", default="0", help="num_splits values (0 = heuristic)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import cuflash
    from cuflash import _api, _launch_decode

    dev = torch.cuda.get_device_properties(0)
    print(f"# {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}")
    bufs = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(2)]
    copy_ms = do_bench(lambda: bufs[1].copy_(bufs[0]), rep=args.rep, return_mode="median")
    copy_gbps = 2 * bufs[0].numel() / (copy_ms * 1e-3) / 1e9
    bufs.clear()
    print(f"# device-to-device copy: {copy_gbps:.0f} GB/s")
    tiles = [t.strip() for t in args.tiles.split(",") if t.strip()]
    splits = [int(s) for s in args.splits.split(",") if s.strip()]
    d = args.headdim

    def timed(fn):
        return do_bench(fn, rep=args.rep, return_mode="median")

    def with_env(**env):
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _api.clear_plan_cache()

    print(f"{'batch':>5} {'seqlen_k':>8} {'config':>22} {'us':>9} {'GB/s':>7} {'copy%':>6} {'vs FA2':>7} "
          f"{'max|diff|':>10}  plan")
    for bsz in parse_sizes(args.batches):
        for sk in parse_sizes(args.seqlens):
            g = torch.Generator(device="cuda").manual_seed(bsz * 1000003 + sk)
            q = torch.randn(bsz, 1, HEADS, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(bsz, sk, KV_HEADS, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(bsz, sk, KV_HEADS, d, device="cuda", dtype=torch.bfloat16, generator=g)
            nbytes = 2 * (2 * bsz * sk * KV_HEADS * d + 2 * bsz * HEADS * d)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

            def fa2():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

            ref = fa2().transpose(1, 2)
            fa2_ms = timed(fa2)
            rows = [("torch-fa2", fa2_ms, 0.0, "")]
            with_env(CUFLASH_DISABLE_DECODE="1", CUFLASH_DECODE_TILE=None)
            out = cuflash.attention(q, k, v)
            rows.append(("decode path off", timed(lambda: cuflash.attention(q, k, v)),
                         float((out.float() - ref.float()).abs().max()), "sm90/sm80 path"))
            for tile in tiles:
                for ns in splits:
                    with_env(CUFLASH_DISABLE_DECODE=None, CUFLASH_DECODE_TILE=None if tile == "default" else tile)
                    try:
                        out = cuflash.attention(q, k, v, num_splits=ns)
                        ms = timed(lambda: cuflash.attention(q, k, v, num_splits=ns))
                    except Exception as e:  # noqa: BLE001 - e.g. a tile above the shared-memory limit
                        print(f"  {tile} splits {ns}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                        continue
                    run = type("R", (), {})()
                    run.q, run.k, run.device_id, run.num_splits = q, k, 0, ns
                    run.seqlen_q, run.seqlen_k, run.nheads, run.nheads_k = 1, sk, HEADS, KV_HEADS
                    run.batch, run.headdim, run.window = bsz, d, (-1, -1)
                    pl = _launch_decode.plan(run)
                    t = pl["tile"]
                    desc = (f"{t.warps}w x {t.warp_keys}k, {t.stages} st, {t.smem // 1024} KB, "
                            f"{pl['blocks_per_sm']}/SM, {pl['splits']} splits")
                    rows.append((f"{tile} s{ns}", ms, float((out.float() - ref.float()).abs().max()), desc))
            with_env(CUFLASH_DISABLE_DECODE=None, CUFLASH_DECODE_TILE=None)
            for name, ms, diff, desc in rows:
                gbps = nbytes / (ms * 1e-3) / 1e9
                print(f"{bsz:>5} {sk:>8} {name:>22} {ms * 1e3:>9.1f} {gbps:>7.0f} {100 * gbps / copy_gbps:>5.0f}% "
                      f"{fa2_ms / ms:>7.2f} {diff:>10.2e}  {desc}", flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
