"""Launches of the portable backward (``kernels_cu/bwd_portable.cu``): tiles, scratch, kernel order.

Kernels (see the header of ``bwd_portable.cu``)::

    bwd_preprocess_portable<T>      D = rowsum(dO * O) -> dsum; zeroes dq_accum (default path)
    bwd_dkdv_portable<T, D, DROP>   dK, dV per key block (and dQ through fp32 atomics, default path)
    bwd_dq_convert_portable<T>      dq_accum -> dq in T                       (default path)
    bwd_dq_portable<T, D, DROP>     dQ per query block in a fixed order       (deterministic path)

``DROP`` is ``dropout_p > 0``: the dropout mask is regenerated from the forward's seed (Philox, the same
bits as the forward), so dropout needs no stored mask; ``DROP = false`` compiles the generator out.

``deterministic=True`` uses no floating-point atomics anywhere: dK and dV are always summed in
registers (GQA included) and dQ comes from ``bwd_dq_portable``, which recomputes P and dS for its
query rows and walks the key tiles in a fixed order; results are bitwise identical run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _config
from ._launch import CTYPES, Run, launch, ptr

FILE = "bwd_portable.cu"
HEADDIM_BUCKETS = _config.HEADDIM_BUCKETS_PORTABLE   # (32, 64, 128, 256)

# bwd_preprocess_portable / bwd_dq_convert_portable: a warp per row, 8 warps, 32 rows per block.
ROW_KERNEL_THREADS = 256
ROW_KERNEL_ROWS = 32


@dataclass(frozen=True)
class PortableBwdTiles:
    """Mirror of ``PortableBwdTraits<D>`` in ``bwd_portable.cu`` (the compile test checks the smem)."""

    headdim_bucket: int
    threads: int       # both kernels
    tpr: int           # threads per key row (dK/dV) or query row (dQ); each owns headdim_bucket / tpr columns
    block_n: int       # dK/dV kernel: keys per block (= threads / tpr)
    block_q: int       # dK/dV kernel: query rows per shared-memory tile
    dq_block_m: int    # dQ kernel: query rows per block (= threads / tpr)
    dq_block_n: int    # dQ kernel: keys per shared-memory tile

    @property
    def dkdv_smem(self) -> int:
        """Static shared memory of bwd_dkdv_portable: sK, sQ, sdO, sdS, lse and D, fp32."""
        d, bn, bq = self.headdim_bucket, self.block_n, self.block_q
        return 4 * (bn * d + 2 * bq * d + bq * bn + 2 * bq)

    @property
    def dkdv_smem_dropout(self) -> int:
        """bwd_dkdv_portable with dropout: plus one 32-bit keep mask per query row of the tile."""
        return self.dkdv_smem + 4 * self.block_q

    @property
    def dq_smem(self) -> int:
        """Static shared memory of bwd_dq_portable: K and V tiles, fp32."""
        return 4 * 2 * self.dq_block_n * self.headdim_bucket


def portable_backward_tiles(headdim: int) -> PortableBwdTiles:
    # 128 threads; a group of tpr threads per row, each thread owning at most 16 head-dim columns
    # (4 float4 chunks): the dK/dV kernel keeps K, V, dK, dV slices (64 floats) in registers, the dQ
    # kernel Q, dO, dQ. __launch_bounds__(128, 3) caps registers at 168 (3 blocks per SM); ptxas uses
    # about 100-168 of them with no spills (tests/test_bwd_compile.py). 256-thread blocks were tried:
    # 2 blocks per SM need <= 128 registers, which spills at head dim >= 128 on sm_80.
    d = _config.bucket(headdim, HEADDIM_BUCKETS)
    threads = 128
    tpr = 4 if d <= 64 else (8 if d == 128 else 16)
    block_q = 32 if d <= 32 else 16
    dq_block_n = 32 if d <= 128 else 16
    return PortableBwdTiles(d, threads, tpr, threads // tpr, block_q, threads // tpr, dq_block_n)


def _names(dtype: str, d: int, dropout: bool = False) -> dict[str, str]:
    t, drop = CTYPES[dtype], ("true" if dropout else "false")
    return {
        "preprocess": f"cuflash::bwd_preprocess_portable<{t}>",
        "dkdv": f"cuflash::bwd_dkdv_portable<{t}, {d}, {drop}>",
        "dq_convert": f"cuflash::bwd_dq_convert_portable<{t}>",
        "dq": f"cuflash::bwd_dq_portable<{t}, {d}, {drop}>",
    }


def backward_portable_variants() -> list[tuple[str, str]]:
    """Every (file, name expression) the portable backward can launch, for precompile and tests."""
    out: list[tuple[str, str]] = []
    for dtype in CTYPES:
        for d in HEADDIM_BUCKETS:
            for dropout in (False, True):
                names = _names(dtype, d, dropout)
                for key in ("dkdv", "dq"):
                    out.append((FILE, names[key]))
        names = _names(dtype, HEADDIM_BUCKETS[0])
        out.append((FILE, names["preprocess"]))
        out.append((FILE, names["dq_convert"]))
    return out


def variant_headdim(name_expression: str) -> int:
    """The head-dim bucket D of a ``bwd_dkdv_portable<T, D, DROP>`` / ``bwd_dq_portable<T, D, DROP>`` name."""
    return int(name_expression.split("<", 1)[1].split(",")[1].strip())


def variant_dropout(name_expression: str) -> bool:
    """The DROP flag of a ``bwd_dkdv_portable`` / ``bwd_dq_portable`` name expression."""
    return name_expression.split("<", 1)[1].split(",")[2].strip(" >") == "true"


def expected_static_smem(name_expression: str) -> int:
    """Static shared memory (bytes) that a variant of ``backward_portable_variants`` declares."""
    if "bwd_dkdv_portable" in name_expression or "bwd_dq_portable" in name_expression:
        tiles = portable_backward_tiles(variant_headdim(name_expression))
        if "bwd_dq_portable" in name_expression:
            return tiles.dq_smem
        return tiles.dkdv_smem_dropout if variant_dropout(name_expression) else tiles.dkdv_smem
    return 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def backward_portable(run: Run) -> None:
    """dq, dk, dv of ``run`` (views with the caller's strides) through the portable kernels."""
    tiles = portable_backward_tiles(run.headdim)
    names = _names(run.dtype, tiles.headdim_bucket, run.dropout_p > 0)
    b, h, hk, sq, sk = run.batch, run.nheads, run.nheads_k, run.seqlen_q, run.seqlen_k

    # Scratch: D per row, and the fp32 dQ accumulator (contiguous (b, h, sq, headdim)) unless deterministic.
    dsum = run.empty((b, h, sq), "float32")
    dq_accum = None if run.deterministic else run.empty((b, h, sq, run.headdim), "float32")
    run.scratch["dsum"] = dsum          # kept alive with the run (the launches are asynchronous)
    run.scratch["dq_accum"] = dq_accum
    params = run.params(dsum=ptr(dsum), dq_accum=ptr(dq_accum))

    row_grid = (_cdiv(sq, ROW_KERNEL_ROWS), h, b)
    launch(run, FILE, names["preprocess"], row_grid, (ROW_KERNEL_THREADS,), params)
    launch(run, FILE, names["dkdv"], (_cdiv(sk, tiles.block_n), hk, b), (tiles.threads,), params)
    if run.deterministic:
        launch(run, FILE, names["dq"], (_cdiv(sq, tiles.dq_block_m), h, b), (tiles.threads,), params)
    else:
        launch(run, FILE, names["dq_convert"], row_grid, (ROW_KERNEL_THREADS,), params)
