#!/usr/bin/env python3
"""Probe: where the Hopper backward's time goes. Times cuflash.attention_backward (bf16, 16k tokens,
hidden 2048) with CUFLASH_BWD_SM90_MODE = each debugging MODE of bwd_sm90.cu (0 the real kernel; 1 no dQ;
16 dQ GEMM without its reductions; 2 no dK / dV GEMMs; 3 neither) and prints TFLOP/s (the real kernel's
FLOPs, x2.5 of 4 B H S^2 D, halved for causal) per cell. Usage: probe_bwd_sm90_modes.py [d,d,..] [s,s,..]"""
import os
import sys

import torch
import triton.testing

import cuflash
from cuflash import _api

TOK, HID = 16384, 2048


def main():
    dims = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "256").split(",")]
    lens = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "2048,16384").split(",")]
    modes = [int(x) for x in os.environ.get("MODES", "0,1,16,2,3").split(",")]
    for d in dims:
        h = HID // d
        for causal in (False, True):
            for s in lens:
                b = TOK // s
                q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
                flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
                res = {}
                for m in modes:
                    os.environ["CUFLASH_BWD_SM90_MODE"] = str(m)
                    _api.clear_plan_cache()
                    fn = lambda: cuflash.attention_backward(do, q, k, v, out, lse, causal=causal)  # noqa: E731
                    fn()
                    res[m] = flops / triton.testing.do_bench(fn, warmup=25, rep=100) / 1e9
                os.environ["CUFLASH_BWD_SM90_MODE"] = "0"
                print(f"d{d} causal={int(causal)} s={s}: " + "  ".join(f"m{k} {v:.0f}" for k, v in res.items()),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
