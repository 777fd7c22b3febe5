"""The Hopper forward path (``kernels_cu/fwd_sm90.cu``): wgmma + TMA + warp specialisation, sm_90a.

``supports(run)`` says whether a run takes this path: fp16/bf16 on a compute-capability-9.0 GPU (the
kernels are built for sm_90a), head dim <= 256, no dropout, operands the copy engine can address
(16-byte aligned base and strides), and not a decoding shape that the sm80 path splits across the key
range or packs by GQA group (``_launch_sm80.plan``). Everything else falls back to the sm80 path.
``CUFLASH_DISABLE_SM90=1`` turns this path off (benchmarks compare the two paths with it).
``forward_sm90(run)`` launches it; ``variants()`` lists the kernels for precompile and compile tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import _tma
from ._launch import CTYPES, launch

FILE = "fwd_sm90.cu"
_DTYPES = ("float16", "bfloat16")
BLOCK_M = 128      # two consumer warpgroups x 64 rows
THREADS = 384      # producer + 2 consumers
_GRID_YZ_MAX = 65535


@dataclass(frozen=True)
class Sm90Tile:
    headdim_bucket: int
    block_n: int
    stages: int
    pingpong: bool = True    # consumers take turns issuing MMAs (named barriers)
    sched: int = 2           # consumer order per tile: 0 serial, 1 overlap, 2 batched (fwd_sm90.cu kSched*)

    @property
    def smem(self) -> int:
        # Sm90FwdTraits::kSmemBytes: alignment slack + Q (128 x D) + K and V rings (stages x BN x D).
        return 1024 + BLOCK_M * self.headdim_bucket * 2 + 2 * self.stages * self.block_n * self.headdim_bucket * 2


# One tile per head-dim bucket (head dims pad up to the bucket inside the kernel: TMA zero-fills).
# Registers per consumer thread (240 with setmaxnreg): O takes D / 2, the score tile BN / 2, P BN / 4;
# shared memory 227 KB at most. Measured on the H100 (bf16, 16k tokens, hidden 2048, TFLOP/s at
# seqlen 4k / 16k non-causal; benchmarks/NOTES.md "Hopper forward" has every variant):
#   d64:  BN 128, 3 stages, ping-pong, batched: 423 / 437 (serial order 394 / 429; BN 192: 404 / 407)
#   d128: BN 128, 2 stages, ping-pong, batched: 580 / 662 (serial 559 / 605; BN 176: 581 / 513)
#   d256: BN 80, 2 stages, ping-pong, batched: 638 / 604 (serial 604 / 633; BN 64: 624 / 600)
#   d192: not measured (BN 96 fits the same registers and 193 KB).
SM90_FORWARD_TILES = {
    64: Sm90Tile(64, 128, 3),     # 113 KB
    128: Sm90Tile(128, 128, 2),   # 161 KB
    192: Sm90Tile(192, 96, 2),    # 193 KB
    256: Sm90Tile(256, 80, 2),    # 225 KB
}
HEADDIM_BUCKETS_SM90 = tuple(sorted(SM90_FORWARD_TILES))


def tile_for(headdim: int) -> Sm90Tile:
    for d in HEADDIM_BUCKETS_SM90:
        if headdim <= d:
            return SM90_FORWARD_TILES[d]
    raise ValueError(f"headdim {headdim} is above the largest sm90 bucket {HEADDIM_BUCKETS_SM90[-1]}")


def kernel_name(dtype: str, tile: Sm90Tile) -> str:
    pp = "true" if tile.pingpong else "false"
    return (f"cuflash::fwd_sm90<{CTYPES[dtype]}, {tile.headdim_bucket}, {tile.block_n}, {tile.stages}, {pp}, "
            f"{tile.sched}>")


def variants(arch: str | None = None) -> list[tuple[str, str]]:
    """Every (file, name expression) this path can launch (sm_90a only: empty for other archs)."""
    if arch is not None and arch != "sm_90a":
        return []
    return [(FILE, kernel_name(dt, t)) for dt in _DTYPES for t in SM90_FORWARD_TILES.values()]


def _specs(run, tile: Sm90Tile):
    return (_tma.spec_for("q", run.q, BLOCK_M), _tma.spec_for("k", run.k, tile.block_n),
            _tma.spec_for("v", run.v, tile.block_n), _tma.spec_for("out", run.out, 64))


def supports(run) -> bool:
    """True when this path can run ``run`` (else the sm80 path, then the portable one)."""
    if run.arch != "sm_90a" or run.dtype not in _DTYPES or os.environ.get("CUFLASH_DISABLE_SM90") == "1":
        return False
    if not 1 <= run.headdim <= 256 or run.dropout_p > 0 or run.num_splits > 1:
        return False
    if min(run.batch, run.seqlen_q, run.seqlen_k, run.nheads, run.nheads_k) < 1:
        return False
    if run.batch > _GRID_YZ_MAX or run.nheads > _GRID_YZ_MAX:
        return False
    from . import _launch_sm80

    if not _launch_sm80.supports(run):  # alignment rules are the same (16-byte rows); and the fallback exists
        return False
    pl = _launch_sm80.plan(run)
    if pl["splits"] > 1 or pl["pack"] > 1:  # decoding shapes: the sm80 path splits / packs them
        return False
    tile = tile_for(run.headdim)
    try:
        for spec, a in zip(_specs(run, tile), (run.q, run.k, run.v, run.out)):
            _tma.encode(spec, int(a.data.ptr))
    except (_tma.TmaError, OSError):
        return False
    return True


def forward_sm90(run) -> None:
    tile = tile_for(run.headdim)
    grid = (-(-run.seqlen_q // BLOCK_M), run.nheads, run.batch)
    launch(run, FILE, kernel_name(run.dtype, tile), grid, (THREADS,), run.params(), tile.smem,
           maps=_specs(run, tile))
