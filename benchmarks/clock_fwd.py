"""SM clock and board power while a forward runs back to back: is a gap to a peer per cycle or per clock?

    python benchmarks/clock_fwd.py --cells 128:0:4k,256:0:4k [--seconds 3] [--impls cudnn,cuflash,fa2]

Each implementation runs alone for --seconds (launches queued back to back, CUDA events around the
whole run) while ``nvidia-smi -lms 50`` samples clocks.sm and power.draw; the samples of the middle 80%
of the window are averaged. Printed per cell and implementation: TFLOP/s (FlashAttention's convention,
bf16, 16k tokens, hidden 2048), mean SM clock (MHz), mean power (W) and TFLOP/s per GHz of SM clock (work
per cycle, whatever the clock). Under the board's power cap a kernel that spends less energy per FLOP
runs at a higher clock; this separates that from cycles lost inside the kernel.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_fwd_sm90 import parse_cell  # noqa: E402  (HEADDIM:CAUSAL:SEQLEN)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", required=True)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--impls", default="cudnn,cuflash,fa2")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash

    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "50"], stdout=subprocess.PIPE, text=True)
    windows = []  # (cell, impl, t0, t1, tflops)
    for cell in (parse_cell(c) for c in args.cells.split(",")):
        hd, causal, s = cell
        b, h = max(1, 16384 // s), 2048 // hd
        q, k, v = (torch.randn(b, s, h, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        flops = 4 * b * h * s * s * hd / (2 if causal else 1)

        def peer(backend):
            def fn():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            return fn
        fns = {"cudnn": peer(SDPBackend.CUDNN_ATTENTION), "fa2": peer(SDPBackend.FLASH_ATTENTION),
               "cuflash": lambda: cuflash.attention(q, k, v, causal=causal)}
        for name in args.impls.split(","):
            fn = fns[name]
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.time()
            e0.record()
            n = 0
            while time.time() - t0 < args.seconds:
                for _ in range(10):
                    fn()
                n += 10
                torch.cuda.current_stream().synchronize() if n % 200 == 0 else None
            e1.record()
            torch.cuda.synchronize()
            t1 = time.time()
            ms = e0.elapsed_time(e1) / n
            windows.append((cell, name, t0, t1, flops / ms / 1e9))
            time.sleep(1.0)  # a gap between implementations
    time.sleep(0.2)
    smi.terminate()
    samples = []
    for line in smi.stdout.read().splitlines():
        try:
            ts, clk, pw = (x.strip() for x in line.split(","))
            t = time.mktime(time.strptime(ts.split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + ts.split(".")[1])
            samples.append((t, float(clk), float(pw)))
        except (ValueError, IndexError):
            continue
    print(f"{'hd':>4} {'c':>2} {'seqlen':>6} {'impl':>8} {'TFLOP/s':>8} {'MHz':>6} {'W':>6} {'TF/GHz':>7} {'n':>4}")
    for (hd, causal, s), name, t0, t1, tf in windows:
        lo, hi = t0 + 0.1 * (t1 - t0), t1 - 0.1 * (t1 - t0)
        sel = [x for x in samples if lo <= x[0] <= hi]
        clk = sum(x[1] for x in sel) / len(sel) if sel else float("nan")
        pw = sum(x[2] for x in sel) / len(sel) if sel else float("nan")
        print(f"{hd:>4} {int(causal):>2} {s:>6} {name:>8} {tf:>8.1f} {clk:>6.0f} {pw:>6.0f} {tf / clk * 1000:>7.1f} {len(sel):>4}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
