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
d64), head dims whose 32-rounding is a bucket here (33..64 and 97..128: the sm80 path's dq_accum row length is then the bucket), operands the copy engine can
address, and everything ``_launch_bwd_sm80.supports`` requires (the fallback). Other runs take the sm80
path. ``CUFLASH_DISABLE_SM90=1`` or ``CUFLASH_DISABLE_SM90_BWD=1`` turns this path off;
``CUFLASH_BWD_SM90_MODE=<int>`` launches another variant (bwd_sm90.cu, MODE bits: 1 skips dQ, 2 skips
dK / dV (wrong results, for timing and bisecting only), 4 the experimental overlapped schedule (correct
results; serialised wgmma / spills today, see bwd_sm90.cu)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from . import _launch, _launch_bwd_sm80, _tma
from ._launch import CTYPES, Run, launch, ptr

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
    def smem(self) -> int:
        """Dynamic shared memory (kSmemBytes): 1024 alignment slack, K, V, the Q and dO slots, two dS^T
        buffers, L and D per slot, and with dropout the keep bits per slot (BN x BM bits)."""
        d, bm, bn, st = self.headdim_bucket, self.block_m, self.block_n, self.stages
        keep = bn * bm // 8 if self.dropout else 0
        return 1024 + 2 * bn * d * 2 + 2 * st * bm * d * 2 + 2 * bn * bm * 2 + st * 2 * bm * 4 + st * keep

    @property
    def flops_per_step(self) -> int:
        """Tensor-core FLOPs of one (query block x key block) step: S, dP, dV, dK, dQ."""
        return 5 * 2 * self.block_m * self.block_n * self.headdim_bucket


# One tile per bucket (FlashAttention-3's block shapes): d64 steps over 128 query rows (dQ split by rows
# between the two consumers), d128 over 64 (dQ split by 64-column halves). Registers per consumer thread:
# dK + dV D, S^T + dP^T BM (192 at both). d > 128 does not fit (dK + dV alone 192 at d192): sm80 path.
TILES = {
    64: Sm90BwdTile(64, 128),    # 161 KB
    128: Sm90BwdTile(128, 64),   # 161 KB
}
HEADDIM_BUCKETS = tuple(sorted(TILES))


MODE_ORDERED = 8  # bwd_sm90.cu kModeOrdered
ORDERED_ACYCLIC = 1  # bwd_sm90.cu kOrderedAcyclic (Params::flags)
MODE_OVERLAP = 4  # bwd_sm90.cu kModeOverlap


def tile_for(headdim: int, dropout: bool = False) -> Sm90BwdTile | None:
    """The tile of a head dim (its dropout variant with ``dropout``), None where this path does not take
    it (dq_accum's row is headdim rounded up to 32, which must be the bucket)."""
    t = TILES.get(-(-headdim // 32) * 32)
    return replace(t, dropout=True) if t is not None and dropout else t


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
    tiles = [t for t0 in TILES.values() for t in (t0, replace(t0, dropout=True))]
    return [(FILE, kernel_name(dt, t, m)) for dt in _DTYPES for t in tiles for m in modes(t)]


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
    if tile.dropout:
        m &= ~MODE_OVERLAP  # the dropout variants take the serial schedule only
    return (m & ~MODE_ORDERED) | (MODE_ORDERED if ordered else 0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the ordered deterministic mode's walk (bwd_sm90.cu: query_block_range, ordered_pivot, ordered_turn) ----

def query_block_range(n0: int, sq: int, sk: int, wl: int, wr: int, bm: int, bn: int) -> tuple[int, int]:
    """(m_first, n_m): the query blocks of ``bm`` rows that keep a key of [n0, n0 + bn)."""
    shift = sk - sq
    n1 = min(n0 + bn, sk) - 1
    i_lo, i_hi = 0, sq - 1
    if wr >= 0:
        i_lo = max(i_lo, n0 - shift - wr)
    if wl >= 0:
        i_hi = min(i_hi, n1 - shift + wl)
    m_first = i_lo // bm
    return m_first, (i_hi // bm - m_first + 1 if i_lo <= i_hi else 0)


def ordered_pivot(nb: int, n_kb: int, sq: int, sk: int, wr: int, bm: int, bn: int) -> int:
    """The first query block of key block ``nb``'s walk (its upper part: pivot .. M - 1; then the lower
    part m_first .. pivot - 1)."""
    m_first, _ = query_block_range(nb * bn, sq, sk, -1, wr, bm, bn)
    return max(m_first, nb * _cdiv(sq, bm) // n_kb)


def ordered_turn(nb: int, m: int, n_kb: int, sq: int, sk: int, wr: int, two: bool, bm: int, bn: int) -> tuple[int, int]:
    """(part, rank): key block ``nb``'s turn on query block ``m`` (bwd_sm90.cu's ordered_turn, for tests)."""
    def last(lo: int, upper: bool) -> int:
        hi = n_kb - 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            mf, nm = query_block_range(mid * bn, sq, sk, -1, wr, bm, bn)
            start = ordered_pivot(mid, n_kb, sq, sk, wr, bm, bn) if upper else mf
            if nm > 0 and start <= m:
                lo = mid
            else:
                hi = mid - 1
        return lo
    if m >= ordered_pivot(nb, n_kb, sq, sk, wr, bm, bn):
        return 0, last(nb, True) - nb
    return (1 if two else 0), last(nb, False) - nb + (0 if two else last(0, True) + 1)


def ordered_has_lower(sq: int, sk: int, wr: int, bm: int, bn: int) -> bool:
    """True when some key block's walk has a lower part (then two dq_accum planes keep the order)."""
    n_kb = _cdiv(sk, bn)
    for nb in range(n_kb):
        m_first, n_m = query_block_range(nb * bn, sq, sk, -1, wr, bm, bn)
        if n_m > 0 and ordered_pivot(nb, n_kb, sq, sk, wr, bm, bn) > m_first:
            return True
    return False


ORDERED_ONE_PLANE_MAX_BLOCKS = 8


def ordered_planes(run: Run, tile: Sm90BwdTile, lower: bool) -> int:
    """dq_accum planes of the ordered mode (bwd_sm90.cu's header): 1 where no key block's walk has a lower
    part; else 2 (each part adds into its own plane, a block only ever waits on key block nb + 1) unless
    there are at most ORDERED_ONE_PLANE_MAX_BLOCKS key blocks: then the lower visitors follow the upper
    ones in one plane (key block N - 1 waits on block 0, harmless when a head's few key blocks run side by
    side), which saves a plane's memset and reads: measured on the H100 (bf16, non-causal, 16k tokens),
    deterministic / default at seqlen 512 / 1k: d128 0.90 / 0.89 with one plane vs 0.80 / 0.86 with two,
    d64 0.95 / 0.93 vs 0.87 / 0.90; from 2k two planes were level or ahead (8k: 0.92-0.95 vs 0.83-0.85).
    CUFLASH_BWD_ORDERED_PLANES=1 or 2 forces the choice (tests, benchmarks)."""
    if not lower:
        return 1
    forced = os.environ.get("CUFLASH_BWD_ORDERED_PLANES", "")
    if forced in ("1", "2"):
        return int(forced)
    return 1 if _cdiv(run.seqlen_k, tile.block_n) <= ORDERED_ONE_PLANE_MAX_BLOCKS else 2


def plan(run: Run, splits: int | None = None, tile: Sm90BwdTile | None = None, mode_: int | None = None) -> dict:
    """Tile, kernel names, splits and grids of this run (exposed for tests and benchmarks)."""
    tile = tile or tile_for(run.headdim, run.dropout_p > 0)
    if tile is None:
        raise ValueError(f"cuflash: the sm90 backward takes no head dim {run.headdim}")
    b, h, hk, sq, sk = run.batch, run.nheads, run.nheads_k, run.seqlen_q, run.seqlen_k
    n_blocks = _cdiv(sk, tile.block_n)
    # Deterministic mode: ordered (the default: one block per key block, dQ additions in key-block order
    # through per-query-block counters) or, with ``splits`` given or a left window, the sm80 path's
    # per-split dQ copies.
    # Ordered needs every key block from 0 up to a query block's last to visit it: no left window.
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
    b, h, sq_pad = run.batch, run.nheads, pl["sq_pad"]
    vec = _launch.empty(run, (2, b, h, sq_pad), "float32")
    dq_accum = _launch.empty(run, (pl["splits"], b, h, sq_pad, tile.headdim_bucket), "float32")
    run.scratch["bwd_sm90_vec"] = vec            # kept alive with the run (the launches are asynchronous)
    run.scratch["bwd_sm90_dq_accum"] = dq_accum
    _launch.memset(run, dq_accum)
    extra = {}
    if pl["ordered"]:
        counters = _launch.empty(run, (pl["counters"],), "int32")
        run.scratch["bwd_sm90_counters"] = counters
        _launch.memset(run, counters)
        extra["counters"] = ptr(counters)
        # bwd_sm90.cu kOrderedAcyclic: with two planes or no lower part every wait is on key block nb + 1
        extra["flags"] = ORDERED_ACYCLIC if pl["splits"] == 2 or not pl["lower"] else 0
    params = run.params(dsum=ptr(vec), dq_accum=ptr(dq_accum), num_splits=pl["splits"], **extra)
    rows = (_launch_bwd_sm80.ROW_THREADS,)
    launch(run, _launch_bwd_sm80.FILE, names["preprocess"], pl["grid_rows"], rows, params)
    launch(run, FILE, names["main"], pl["grid_main"], (THREADS,), params, tile.smem, maps=_specs(run, tile))
    launch(run, _launch_bwd_sm80.FILE, names["convert"], pl["grid_convert"], rows, params)


def expected_traits_checks() -> list[str]:
    """static_asserts tying the host table to the kernel traits (compiled by the CPU test)."""
    out = []
    for t in [t for t0 in TILES.values() for t in (t0, replace(t0, dropout=True))]:
        drop = ", true" if t.dropout else ""
        tr = f"cuflash::Sm90BwdTraits<{t.headdim_bucket}, {t.block_m}, {t.stages}{drop}>"
        out.append(f"static_assert({tr}::kSmemBytes == {t.smem}, \"smem {t.headdim_bucket}\");")
        out.append(f"static_assert({tr}::kThreads == {t.threads} && {tr}::kBN == {t.block_n}, \"shape\");")
    return out


__all__ = ["supports", "backward_sm90", "variants", "plan", "tile_for", "TILES", "kernel_name"]
