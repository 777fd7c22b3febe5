"""The Hopper backward (``kernels_cu/bwd_sm90.cu``): wgmma + TMA + warp specialisation, sm_90a.

Only the main kernel is new: the launcher runs ``bwd_sm80.cu``'s preprocess and dQ convert exactly as
``_launch_bwd_sm80.backward_sm80`` does (same scratch layout: ``vec`` (2, batch, nheads, sq_pad) fp32 and
``dq_accum`` (splits, batch, nheads, sq_pad, ld) fp32 with ld = headdim rounded up to 32, which equals the
bucket D for every head dim this path takes)::

    (memset)                          dq_accum = 0
    bwd_sm80_preprocess<T>            D = rowsum(dO * O), L = lse * log2(e) (+inf for rows without keys)
    bwd_sm90<T, D, BM, STAGES, MODE[, true]>  dK, dV per key block of 128 keys; dQ by red.add into
                                      dq_accum (true: the dropout variant, keep bits from RNG warps)
    bwd_sm80_dq_convert<T>            dq = scale * (sum of the dq_accum splits)

``supports(run)``: fp16 / bf16 on sm_90a (with or without dropout; not dropout with softcap or ALiBi at
d64, nor dropout at d256), head dims whose 32-rounding is a bucket here (33..64, 97..128, 225..256: the
sm80 path's dq_accum row length is then the bucket), operands the copy engine can address, and
everything ``_launch_bwd_sm80.supports`` requires (the fallback). Other runs take the sm80 path.
``CUFLASH_DISABLE_SM90=1`` or ``CUFLASH_DISABLE_SM90_BWD=1`` turns this path off;
``CUFLASH_BWD_SM90_MODE=<int>`` launches another variant (bwd_sm90.cu, MODE bits: 1 skips dQ, 16 only
its additions into dq_accum, 2 skips dK / dV (wrong results, for timing and bisecting only), 4 the
experimental overlapped schedule (correct results; serialised wgmma / spills today, see bwd_sm90.cu)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from . import _launch, _launch_bwd_sm80, _tma
from ._launch_bwd_sm80 import (ORDERED_ONE_PLANE_MAX_BLOCKS, ordered_has_lower, ordered_pivot,  # noqa: F401
                               ordered_planes, ordered_turn, query_block_range)
from ._launch import CTYPES, Run, launch

FILE = "bwd_sm90.cu"
_DTYPES = ("float16", "bfloat16")
THREADS = 384
BLOCK_N = 128
PAD_ROWS = _launch_bwd_sm80.PAD_ROWS
_GRID_YZ_MAX = 65535


@dataclass(frozen=True)
class Sm90BwdTile:
    """Mirror of ``Sm90BwdTraits<D, BM, STAGES>`` (kernels_cu/traits_bwd_sm90.cuh; the compile test checks it)."""

    headdim_bucket: int
    block_m: int        # query rows per step
    stages: int = 2     # Q / dO / L / D ring slots
    block_n: int = BLOCK_N
    dropout: bool = False  # the DROPOUT variant (keep-bit ring filled by the producer's RNG warps)
    threads = THREADS

    @property
    def split_d(self) -> bool:
        """kSplitD: the consumers split dK / dV by head-dim halves (d256; traits_bwd_sm90.cuh)."""
        return self.headdim_bucket == 256

    @property
    def smem(self) -> int:
        """Dynamic shared memory (kSmemBytes): 1024 alignment slack, K, V, the Q and dO slots, two dS^T
        buffers (split_d: and two P^T buffers), L and D per slot, and with dropout the keep bits per slot
        (BN x BM bits)."""
        d, bm, bn, st = self.headdim_bucket, self.block_m, self.block_n, self.stages
        keep = bn * bm // 8 if self.dropout else 0
        staged = (4 if self.split_d else 2) * bn * bm * 2
        return 1024 + 2 * bn * d * 2 + 2 * st * bm * d * 2 + staged + st * 2 * bm * 4 + st * keep

    @property
    def flops_per_step(self) -> int:
        """Tensor-core FLOPs of one (query block x key block) step: S, dP, dV, dK, dQ."""
        return 5 * 2 * self.block_m * self.block_n * self.headdim_bucket


# One tile per bucket (FlashAttention-3's block shapes): d64 steps over 128 query rows (dQ split by rows
# between the two consumers), d128 over 64 (dQ split by 64-column halves). Registers per consumer thread:
# dK + dV D, S^T + dP^T BM (192 at both). d256 takes 64 keys per block and splits dK / dV between the
# consumers by head-dim halves (dK + dV 128, S^T + dP^T 32, dQ 64; P^T and dS^T staged in shared
# memory); no dropout variant (the sm80 path takes those runs). d160 / d192 / d224: sm80 path.
TILES = {
    64: Sm90BwdTile(64, 128),    # 161 KB
    128: Sm90BwdTile(128, 64),   # 161 KB
    256: Sm90BwdTile(256, 64, block_n=64),  # 226 KB
}
DROPOUT_BUCKETS = (64, 128)  # buckets with a DROPOUT variant
HEADDIM_BUCKETS = tuple(sorted(TILES))


MODE_ORDERED = 8  # bwd_sm90.cu kModeOrdered
ORDERED_ACYCLIC = 1  # bwd_sm90.cu kOrderedAcyclic (Params::flags)
MODE_OVERLAP = 4  # bwd_sm90.cu kModeOverlap


def tile_for(headdim: int, dropout: bool = False) -> Sm90BwdTile | None:
    """The tile of a head dim (its dropout variant with ``dropout``), None where this path does not take
    it (dq_accum's row is headdim rounded up to 32, which must be the bucket)."""
    t = TILES.get(-(-headdim // 32) * 32)
    if t is not None and dropout:
        return replace(t, dropout=True) if t.headdim_bucket in DROPOUT_BUCKETS else None
    return t


def mode() -> int:
    try:
        return int(os.environ.get("CUFLASH_BWD_SM90_MODE", "0") or 0)
    except ValueError:
        return 0


def kernel_name(dtype: str, tile: Sm90BwdTile, mode_: int = 0) -> str:
    drop = ", true" if tile.dropout else ""
    return (f"cuflash::bwd_sm90<{CTYPES[dtype]}, {tile.headdim_bucket}, {tile.block_m}, {tile.stages}, "
            f"{int(mode_)}{drop}>")


def kernel_names(dtype: str, tile: Sm90BwdTile, mode_: int = 0) -> dict[str, str]:
    t = CTYPES[dtype]
    return {
        "preprocess": f"cuflash::bwd_sm80_preprocess<{t}>",
        "main": kernel_name(dtype, tile, mode_),
        "convert": f"cuflash::bwd_sm80_dq_convert<{t}>",
    }


def variants(arch: str | None = None) -> list[tuple[str, str]]:
    """Every (file, name expression) of this path's main kernel (sm_90a only; preprocess and convert are
    listed by ``_launch_bwd_sm80.variants``)."""
    if arch is not None and arch != "sm_90a":
        return []
    # MODE 0: the default; MODE_ORDERED: the ordered deterministic mode; each without and with dropout
    return [(FILE, kernel_name(dt, t, m)) for dt in _DTYPES for t in all_tiles() for m in modes(t)]


def all_tiles() -> list[Sm90BwdTile]:
    """Every compiled tile: each bucket's, and its dropout variant where it has one."""
    return [t for t0 in TILES.values()
            for t in ((t0, replace(t0, dropout=True)) if t0.headdim_bucket in DROPOUT_BUCKETS else (t0,))]


def modes(tile: Sm90BwdTile) -> tuple[int, ...]:
    """MODE values the dispatcher launches for a tile: the default and the ordered deterministic mode."""
    return (0, MODE_ORDERED)


def _specs(run: Run, tile: Sm90BwdTile):
    return (_tma.spec_for("q", run.q, tile.block_m), _tma.spec_for("k", run.k, tile.block_n),
            _tma.spec_for("v", run.v, tile.block_n), _tma.spec_for("dout", run.dout, tile.block_m))


def supports(run: Run) -> bool:
    """True when this path can run ``run`` (else the sm80 backward, then the portable one)."""
    if run.arch != "sm_90a" or run.dtype not in _DTYPES:
        return False
    if os.environ.get("CUFLASH_DISABLE_SM90") == "1" or os.environ.get("CUFLASH_DISABLE_SM90_BWD") == "1":
        return False
    if not 1 <= run.headdim <= 256:
        return False
    tile = tile_for(run.headdim, run.dropout_p > 0)
    if tile is None:
        return False
    # the d64 dropout variant has no softcap / ALiBi code (bwd_sm90.cu: ptxas spills with it)
    if tile.dropout and tile.headdim_bucket == 64 and (run.softcap > 0 or run.alibi is not None):
        return False
    if min(run.batch, run.seqlen_q, run.seqlen_k, run.nheads, run.nheads_k) < 1 or run.nheads % run.nheads_k:
        return False
    if run.batch > _GRID_YZ_MAX or run.nheads_k > _GRID_YZ_MAX:
        return False
    if not _launch_bwd_sm80.supports(run):  # alignment, lse / out / dout present; and the fallback exists
        return False
    try:
        for spec, a in zip(_specs(run, tile), (run.q, run.k, run.v, run.dout)):
            _tma.encode(spec, int(a.data.ptr))
    except (_tma.TmaError, OSError):
        return False
    return True


def _mode_bits(tile: Sm90BwdTile, mode_: int | None, ordered: bool) -> int:
    m = mode() if mode_ is None else mode_
    if tile.dropout or tile.split_d:
        m &= ~MODE_OVERLAP  # the dropout and d256 variants take the serial schedule only
    return (m & ~MODE_ORDERED) | (MODE_ORDERED if ordered else 0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(run: Run, splits: int | None = None, tile: Sm90BwdTile | None = None, mode_: int | None = None) -> dict:
    """Tile, kernel names, splits and grids of this run (exposed for tests and benchmarks)."""
    tile = tile or tile_for(run.headdim, run.dropout_p > 0)
    if tile is None:
        raise ValueError(f"cuflash: the sm90 backward takes no head dim {run.headdim}")
    b, h, hk, sq, sk = run.batch, run.nheads, run.nheads_k, run.seqlen_q, run.seqlen_k
    n_blocks = _cdiv(sk, tile.block_n)
    # Deterministic mode: ordered (the default: one block per key block, dQ added in a fixed order through
    # per-query-block counters, bwd_sm90.cu's header; it needs no left window) or, with ``splits`` given
    # or a left window, the sm80 path's per-split dQ copies.
    ordered = bool(run.deterministic) and splits is None and run.window[0] < 0
    if run.deterministic and not ordered and splits is None:
        splits = _launch_bwd_sm80.deterministic_splits(b, h, hk, sq, sk, tile, _launch_bwd_sm80._num_sms(run.device_id))
    lower = ordered and ordered_has_lower(sq, sk, run.window[1], tile.block_m, tile.block_n)
    if ordered:
        splits = ordered_planes(run, tile, lower)  # dq_accum planes (bwd_sm90.cu: the lower part's plane)
    else:
        splits = 1 if not run.deterministic else max(1, min(int(splits), n_blocks))
    sq_pad = _cdiv(sq, PAD_ROWS) * PAD_ROWS
    ld = _cdiv(run.headdim, 32) * 32
    assert ld == tile.headdim_bucket, "dq_accum rows must be the kernel's bucket"
    return {
        "tile": tile,
        "names": kernel_names(run.dtype, tile, _mode_bits(tile, mode_, ordered)),
        "splits": splits, "sq_pad": sq_pad, "n_blocks": n_blocks, "ordered": ordered, "lower": lower,
        "counters": b * h * _cdiv(sq, tile.block_m) * splits if ordered else 0,
        "grid_rows": (sq_pad // _launch_bwd_sm80.ROWS_PER_BLOCK, h, b),
        "grid_main": (splits if run.deterministic and not ordered else n_blocks, hk, b),
        "grid_convert": (_cdiv(sq, _launch_bwd_sm80.ROWS_PER_BLOCK), h, b),
    }


def backward_sm90(run: Run, splits: int | None = None, tile: Sm90BwdTile | None = None,
                  mode_: int | None = None) -> None:
    """dq, dk, dv of ``run`` through the Hopper main kernel (preprocess / convert from bwd_sm80.cu).

    ``splits`` (deterministic mode only) overrides the dq_accum split count, ``tile`` the tile and ``mode_``
    the MODE template argument (tests, benchmarks, debugging)."""
    pl = plan(run, splits, tile, mode_)
    tile, names = pl["tile"], pl["names"]
    fields = _launch_bwd_sm80.scratch_fields(run, pl, "bwd_sm90")
    if pl["ordered"]:
        # bwd_sm90.cu kOrderedAcyclic: with two planes or no lower part every wait is on key block nb + 1
        fields["flags"] = ORDERED_ACYCLIC if pl["splits"] == 2 or not pl["lower"] else 0
    params = run.params(**fields)
    rows = (_launch_bwd_sm80.ROW_THREADS,)
    launch(run, _launch_bwd_sm80.FILE, names["preprocess"], pl["grid_rows"], rows, params)
    launch(run, FILE, names["main"], pl["grid_main"], (THREADS,), params, tile.smem, maps=_specs(run, tile))
    launch(run, _launch_bwd_sm80.FILE, names["convert"], pl["grid_convert"], rows, params)


def expected_traits_checks() -> list[str]:
    """static_asserts tying the host table to the kernel traits (compiled by the CPU test)."""
    out = []
    for t in all_tiles():
        drop = ", true" if t.dropout else ""
        tr = f"cuflash::Sm90BwdTraits<{t.headdim_bucket}, {t.block_m}, {t.stages}{drop}>"
        out.append(f"static_assert({tr}::kSmemBytes == {t.smem}, \"smem {t.headdim_bucket}\");")
        out.append(f"static_assert({tr}::kThreads == {t.threads} && {tr}::kBN == {t.block_n}, \"shape\");")
    return out


__all__ = ["supports", "backward_sm90", "variants", "plan", "tile_for", "TILES", "kernel_name"]
