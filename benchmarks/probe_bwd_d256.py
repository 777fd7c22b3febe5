#!/usr/bin/env python3
"""Probe: the d256 backward (sm80 path) with its H100 tile (2 stages) against the single-stage tile and
torch SDPA's flash backend (FA2), bf16, 16k tokens, 8 heads. Prints TFLOP/s per cell (FLOPs x2.5 of
4 B H S^2 D, halved for causal)."""
import sys

import torch
import triton.testing

import cuflash
from cuflash import _launch, _launch_bwd_sm80 as L

TOK, H, D = 16384, 8, 256


def main():
    tile = {"cur": None}

    def pinned(run):
        run.path = "sm80"
        L.backward_sm80(run, tile=tile["cur"])

    orig = _launch.backward
    rows = []
    for causal in (False, True):
        for s in (2048, 8192, 16384):
            b = TOK // s
            q, k, v, do = (torch.randn(b, s, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            flops = 2.5 * 4 * b * H * s * s * D / (2 if causal else 1)
            res = {}
            for name, t in (("s2", L.TILES[256]), ("s1", L.TILES_SMALL_SMEM[256])):
                tile["cur"] = t
                _launch.backward = pinned
                try:
                    fn = lambda: cuflash.attention_backward(do, q, k, v, out, lse, causal=causal)  # noqa: E731
                    fn()
                    res[name] = flops / triton.testing.do_bench(fn, warmup=25, rep=100) / 1e9
                finally:
                    _launch.backward = orig
            qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            g = do.transpose(1, 2)
            fn = lambda: torch.autograd.grad(o, (qt, kt, vt), g, retain_graph=True)  # noqa: E731
            res["fa2"] = flops / triton.testing.do_bench(fn, warmup=25, rep=100) / 1e9
            rows.append((causal, s, res))
            print(f"causal={causal} s={s}: " + "  ".join(f"{k} {v:.0f}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
