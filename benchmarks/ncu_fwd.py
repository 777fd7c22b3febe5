"""Driver for Nsight Compute runs of one forward cell, cuflash and torch's cuDNN / FA2 backends (only the
calls between cudaProfilerStart / Stop are profiled). Example (pipe utilisation and stall reasons at the
board's own clocks):

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats python benchmarks/ncu_fwd.py --headdim 128
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--impls", default="cuflash,cudnn")
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash

    b, h = max(1, 16384 // a.seqlen), 2048 // a.headdim
    q, k, v = (torch.randn(b, a.seqlen, h, a.headdim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    fns = {"cuflash": lambda: cuflash.attention(q, k, v, causal=a.causal)}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        def peer(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=a.causal)
        fns[name] = peer
    for name in a.impls.split(","):
        for _ in range(3):  # warm: compile, plans
            fns[name]()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fns[name]()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
