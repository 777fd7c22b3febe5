"""Driver for Nsight Compute runs of the dropout kernels (issue 6): a few forward (and with --bwd,
backward) calls of one bf16 cell at dropout p, through the PyTorch API, so that ncu can profile the
Hopper kernels. Example (pipe utilisation, issue slots and stall reasons of the d64 forward):

    ncu -k regex:fwd_sm90 -c 2 --section ComputeWorkloadAnalysis --section SchedulerStats \
        --section WarpStateStats python benchmarks/ncu_dropout.py --headdim 64 --seqlen 4096 --p 0.1
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args(argv)
    import torch

    import cuflash.torch as ct

    b, h = max(1, 16384 // a.seqlen), 2048 // a.headdim
    q, k, v = (torch.randn(b, a.seqlen, h, a.headdim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=a.bwd) for _ in range(3))
    for _ in range(a.iters):
        out = ct.flash_attn_func(q, k, v, dropout_p=a.p, causal=a.causal)
        if a.bwd:
            out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    print("done", tuple(out.shape))


if __name__ == "__main__":
    main()
