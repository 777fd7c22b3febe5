"""Smoke check before a long GPU run: one forward + backward with dropout per head dim at a benchmark shape
(bf16, 16k tokens), on the default dispatch, against p = 0; prints the paths and a rough time ratio.
A hang shows up here within seconds instead of inside the benchmark."""
import logging
import time

import torch

import cuflash

logging.basicConfig(level=logging.DEBUG, format="%(message)s")
for name in ("cuflash",):
    logging.getLogger(name).setLevel(logging.WARNING)


def timed(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


for d in (64, 128):
    for causal in (False, True):
        b, s, h = 16384 // 4096, 4096, 2048 // d
        q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        res = {}
        for p in (0.0, 0.1):
            kw = {"dropout_p": p, "seed": 1} if p else {}
            o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True, **kw)
            res[p] = (timed(lambda: cuflash.attention(q, k, v, causal=causal, **kw)),
                      timed(lambda: cuflash.attention_backward(do, q, k, v, o, lse, causal=causal, **kw)))
        print(f"d{d} causal={causal}: fwd drop/p0 {res[0.0][0] / res[0.1][0]:.2f}  "
              f"bwd drop/p0 {res[0.0][1] / res[0.1][1]:.2f}", flush=True)
