"""Host-side overhead of one cuflash call (Python dispatch), profiled with cProfile on a decode shape."""
import cProfile
import pstats
import time

import torch

import cuflash

q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
for _ in range(20):
    cuflash.attention(q, k, v)
torch.cuda.synchronize()
n = 500
t0 = time.perf_counter()
for _ in range(n):
    cuflash.attention(q, k, v)
torch.cuda.synchronize()
print(f"wall per call: {(time.perf_counter() - t0) / n * 1e6:.1f} us")
pr = cProfile.Profile()
pr.enable()
for _ in range(n):
    cuflash.attention(q, k, v)
torch.cuda.synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
