"""The tile table: (path, dtype, head dim, features) -> block sizes, threads, shared memory.

Each entry says why it was chosen (the measurement behind it, once there is one). The kernels'
traits templates derive and ``static_assert`` the same numbers; the compile test checks that the
shared memory the host asks for is what the kernel declares.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADDIM_BUCKETS_PORTABLE = (32, 64, 128, 256)


@dataclass(frozen=True)
class TileConfig:
    headdim_bucket: int
    block_m: int
    block_n: int
    threads: int
    smem: int          # dynamic shared memory bytes asked at launch (0: static only)


def bucket(headdim: int, buckets) -> int:
    for b in buckets:
        if headdim <= b:
            return b
    raise ValueError(f"headdim {headdim} is above the largest bucket {buckets[-1]}")


def portable_forward(headdim: int) -> TileConfig:
    # Portable fallback: a quad of threads per query row, 32 rows per 128-thread block, K/V tiles
    # in static shared memory (PortableFwdTraits in fwd_portable.cu). 32 keys per tile up to head
    # dim 64, 16 above (the per-thread score array would otherwise push past 255 registers).
    d = bucket(headdim, HEADDIM_BUCKETS_PORTABLE)
    return TileConfig(d, 32, 32 if d <= 64 else 16, 128, 0)


def portable_forward_variants():
    """Every (dtype, bucket) name expression of the portable forward, for precompile and tests."""
    from ._launch import CTYPES

    return [("fwd_portable.cu", f"cuflash::fwd_portable<{c}, {d}>")
            for c in CTYPES.values() for d in HEADDIM_BUCKETS_PORTABLE]
