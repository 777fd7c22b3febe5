"""The tensor-core backward for fp16 / bf16 on sm80 and later (``kernels_cu/bwd_sm80.cu``).

``supports(run)`` says whether a run can take this path (else the portable backward runs),
``backward_sm80(run)`` launches it, ``variants(arch)`` lists every kernel it can launch on an
architecture (precompile, compile tests) and ``plan(run)`` the launch plan (tests, benchmarks).

Kernels, in launch order (see the header of ``bwd_sm80.cu``)::

    (memset)                        dq_accum = 0
    bwd_sm80_preprocess<T>          D = rowsum(dO * O) and L = lse * log2(e) (+inf for rows without
                                    keys), padded to sq_pad = seqlen_q rounded up to 128 rows
    bwd_sm80<T, D, STAGES[, true]>  dK, dV per key block (registers), dQ by fp32 red.add into dq_accum
                                    (", true": the DROPOUT variant, for dropout_p > 0)
    bwd_sm80_dq_convert<T>          dq = scale * (sum of the dq_accum splits), in T, with dq's strides

Scratch (``run.empty``): ``vec`` (2, batch, nheads, sq_pad) fp32 (D then L; passed as Params::dsum)
and ``dq_accum`` (splits, batch, nheads, sq_pad, bucket) fp32.

Deterministic mode: the grid's x dimension is ``splits`` instead of the number of key blocks; block x
walks key blocks x, x + splits, ... in order and adds its dQ into its own split (a single writer per
address, reductions applied in program order), and the convert sums the splits in a fixed order:
bitwise reproducible on a given GPU (the split count depends on the SM count and the shape).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from . import _config, _launch
from ._launch import CTYPES, Run, launch, ptr

FILE = "bwd_sm80.cu"
HEADDIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
PAD_ROWS = 128            # kBwdSm80Pad: scratch rows per (batch, head) rounded up to this
ROW_THREADS = 256         # kBwdSm80RowThreads: preprocess / convert, 8 threads per row
ROWS_PER_BLOCK = 32       # kBwdSm80Rows
THREADS = 256             # the main kernel: 8 warps
_DTYPES = ("float16", "bfloat16")
_GRID_YZ_MAX = 65535
MAX_SPLIT_BYTES = 1 << 30  # deterministic mode: dq_accum splits use at most this much scratch (or 1 split)


@dataclass(frozen=True)
class Sm80BwdTile:
    """Mirror of ``Sm80BwdShape`` in ``kernels_cu/traits_bwd_sm80.cuh`` (the compile test checks it)."""

    headdim_bucket: int
    block_m: int        # query rows per step
    block_n: int        # keys per block
    warps_m_s: int      # S / dP warp grid: warps_m_s x (8 / warps_m_s)
    warps_n_kv: int     # dK / dV warp grid: warps_n_kv (keys) x (8 / warps_n_kv) (columns)
    warps_m_q: int      # dQ warp grid: warps_m_q (rows) x (8 / warps_m_q) (columns)
    stages: int = 2     # Q / dO buffers

    threads = THREADS

    @property
    def smem(self) -> int:
        """Dynamic shared memory (Sm80BwdShape::kSmemBytes): Q and dO (stages each), K, V, P, dS,
        and per stage D and L of the rows."""
        d, bm, bn, st = self.headdim_bucket, self.block_m, self.block_n, self.stages
        return 2 * st * bm * d * 2 + 2 * bn * d * 2 + 2 * bm * bn * 2 + st * 2 * bm * 4

    @property
    def acc_regs(self) -> int:
        """fp32 accumulator registers per thread of the dK / dV tiles (live through the whole loop)."""
        return 2 * self.block_n * self.headdim_bucket // THREADS

    @property
    def flops_per_step(self) -> int:
        """Tensor-core FLOPs of one (query block x key block) step: S, dP, dV, dK, dQ."""
        return 5 * 2 * self.block_m * self.block_n * self.headdim_bucket


# One tile per bucket; "to measure" on an H100 (bf16, seqlen 1k-16k, causal and not) against the
# alternatives named in benchmarks/NOTES_bwd_sm80.md. Each fits the H100 (227 KB per block); all but 224
# and 256 fit the A100 (163 KB), which takes the single-stage tiles below for those two.
TILES = {
    32: Sm80BwdTile(32, 128, 128, 4, 4, 4),    # FA2's H100 tile (128 x 128, 8 warps)
    64: Sm80BwdTile(64, 128, 128, 4, 4, 4),    # FA2's H100 tile
    96: Sm80BwdTile(96, 64, 128, 2, 4, 4),     # FA2's tile
    128: Sm80BwdTile(128, 64, 128, 2, 4, 2),   # FA2's H100 tile
    160: Sm80BwdTile(160, 64, 64, 4, 4, 4),    # FA2's tile
    192: Sm80BwdTile(192, 64, 64, 4, 2, 2),    # FA2's tile
    224: Sm80BwdTile(224, 64, 64, 4, 4, 4),    # 64 x 64 as 192 / 256 (column groups must be even here)
    256: Sm80BwdTile(256, 64, 64, 4, 2, 2),    # FA2's H100 tile (FA2 single-buffers dO: 176 KB)
}
# Single-stage (Q / dO not double-buffered) versions where the tile above exceeds a 163 KB GPU.
TILES_SMALL_SMEM = {
    224: Sm80BwdTile(224, 64, 64, 4, 4, 4, stages=1),   # 128 KB
    256: Sm80BwdTile(256, 64, 64, 4, 2, 2, stages=1),   # 145 KB (FA2's A100 choice: no double buffering)
}


def bucket(headdim: int) -> int:
    for d in HEADDIM_BUCKETS:
        if headdim <= d:
            return d
    raise ValueError(f"cuflash: head dim {headdim} is above the largest sm80 backward bucket (256)")


# Dropout-only tiles (the DROPOUT kernel of that bucket and stage count, Sm80BwdTraits<D, STAGES, true>,
# has this shape) where the regular tile's DROPOUT variant spills with some NVRTC. d 128: (2, 4, 2) spilled
# 4 bytes (bf16, sm_80, NVRTC 13.0); warp grids (2, 2, 4) have none with NVRTC 13.0 and 13.5 on sm_80 and
# sm_90a. Same block shape and shared memory; 1216 instead of 1152 ldmatrix per step. To measure.
TILES_DROPOUT = {
    128: Sm80BwdTile(128, 64, 128, 2, 2, 4),
}


def kernel_tile(bucket: int, stages: int, dropout: bool = False) -> Sm80BwdTile | None:
    """The shape of the kernel ``bwd_sm80<T, bucket, stages[, true]>`` (Sm80BwdTraits<bucket, stages, dropout>)."""
    for table in ((TILES_DROPOUT,) if dropout else ()) + (TILES, TILES_SMALL_SMEM):
        t = table.get(bucket)
        if t is not None and t.stages == stages:
            return t
    return None


def tile_for(headdim: int, smem_limit: int | None = None, dropout: bool = False) -> Sm80BwdTile | None:
    """The tile for a head dim (1..256) within a per-block shared-memory limit (bytes), None if none fits.
    ``dropout`` (dropout_p > 0): the tiles of the DROPOUT kernels (TILES_DROPOUT where it has one)."""
    d = bucket(headdim)
    for table in ((TILES_DROPOUT,) if dropout else ()) + (TILES, TILES_SMALL_SMEM):
        t = table.get(d)
        if t is None or kernel_tile(d, t.stages, dropout) != t:  # a regular tile replaced for dropout
            continue
        if smem_limit is None or t.smem <= smem_limit:
            return t
    return None


def all_tiles() -> list[Sm80BwdTile]:
    """Every tile of the tables (regular, single-stage, dropout-only)."""
    out = []
    for t in list(TILES.values()) + list(TILES_SMALL_SMEM.values()) + list(TILES_DROPOUT.values()):
        if t not in out:
            out.append(t)
    return out


def tiles(dropout: bool = False, arch: str | None = None) -> list[Sm80BwdTile]:
    """The tiles the dispatcher can pick without / with dropout on GPUs of ``arch`` (None: on any GPU):
    by the per-block shared memory of the arch (``_config.SMEM_PER_BLOCK_BY_ARCH``); none below sm_80."""
    if arch is not None and _config.arch_number(arch) < 80:
        return []
    cands = [t for t in all_tiles() if kernel_tile(t.headdim_bucket, t.stages, dropout) == t]
    return _config.pickable(cands, lambda d, limit: tile_for(d, limit, dropout), HEADDIM_BUCKETS, arch)


def kernel_names(dtype: str, tile: Sm80BwdTile, dropout: bool = False) -> dict[str, str]:
    """The three kernels of a run; ``dropout`` (dropout_p > 0) picks the main kernel's DROPOUT variant
    (the template flag defaults to false: the no-dropout names are unchanged)."""
    if kernel_tile(tile.headdim_bucket, tile.stages, dropout) != tile:
        raise ValueError(f"cuflash: {tile} is not the shape of the {'DROPOUT ' if dropout else ''}kernel for "
                         f"head dim {tile.headdim_bucket}, {tile.stages} stage(s)")
    t = CTYPES[dtype]
    drop = ", true" if dropout else ""
    return {
        "preprocess": f"cuflash::bwd_sm80_preprocess<{t}>",
        "main": f"cuflash::bwd_sm80<{t}, {tile.headdim_bucket}, {tile.stages}{drop}>",
        "convert": f"cuflash::bwd_sm80_dq_convert<{t}>",
    }


def variants(arch: str | None = None) -> list[tuple[str, str]]:
    """Every (file, name expression) this path can launch on GPUs of ``arch`` (e.g. ``"sm_90a"``; None: on
    any GPU): per dtype the main kernel of each tile ``tiles(dropout, arch)`` without and with dropout,
    and preprocess and convert. sm_80: 2 x (8 + 8 + 2) = 36 (224 and 256 single-stage), sm_90a: 36
    (every bucket two-stage), arch None: 2 x (10 + 10 + 2) = 44, 99 KB GPUs (sm86, sm89, sm120): none."""
    out = []
    for dtype in _DTYPES:
        for drop in (False, True):
            out += [(FILE, kernel_names(dtype, t, drop)["main"]) for t in tiles(drop, arch)]
        if tiles(False, arch):
            names = kernel_names(dtype, TILES[HEADDIM_BUCKETS[0]])
            out.append((FILE, names["preprocess"]))
            out.append((FILE, names["convert"]))
    return out


# ---- device properties (cached per device) ------------------------------------------------------

from ._launch_sm80 import _device_attr  # noqa: E402  (one cached device-attribute query for both paths)


def _smem_optin(device_id: int) -> int:
    try:
        return _device_attr(device_id, "cudaDevAttrMaxSharedMemoryPerBlockOptin")
    except Exception:  # no device query possible: assume the sm80 limit
        return 163 * 1024


def _num_sms(device_id: int) -> int:
    try:
        return _device_attr(device_id, "cudaDevAttrMultiProcessorCount")
    except Exception:
        return 132


_arch_number = _config.arch_number


# ---- support ---------------------------------------------------------------------------------------

from ._launch_sm80 import _rows_16b_aligned  # noqa: E402  (the same 16-byte row rule as the forward)


def _tile(run: Run) -> Sm80BwdTile | None:
    return tile_for(run.headdim, _smem_optin(run.device_id), run.dropout_p > 0)


def supports(run: Run) -> bool:
    """True when this path can run ``run`` (else the portable backward must)."""
    if run.dtype not in _DTYPES or _arch_number(run.arch) < 80:
        return False
    # Dropout: every head dim has a spill-free DROPOUT kernel (kernel_names(..., dropout=True); d 128 takes
    # its own tile, TILES_DROPOUT).
    if not 1 <= run.headdim <= 256:
        return False
    if min(run.batch, run.seqlen_q, run.seqlen_k, run.nheads, run.nheads_k) < 1:
        return False
    if run.nheads % run.nheads_k:
        return False
    if run.batch > _GRID_YZ_MAX or run.nheads > _GRID_YZ_MAX:
        return False
    if run.lse is None or run.out is None or run.dout is None:
        return False
    if not all(_rows_16b_aligned(a) for a in (run.q, run.k, run.v, run.out, run.dout, run.dq, run.dk, run.dv)):
        return False
    return _tile(run) is not None


# ---- plan ------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def deterministic_splits(batch: int, nheads: int, nheads_k: int, seqlen_q: int, seqlen_k: int, tile: Sm80BwdTile,
                         num_sms: int, max_bytes: int = MAX_SPLIT_BYTES) -> int:
    """dq_accum splits (grid x) for deterministic mode.

    Block (x, kv head, batch) runs key blocks x, x + s, ...; a wave holds num_sms blocks (one per SM).
    Estimated time of s splits: ceil(s * batch * nheads_k / num_sms) waves of ceil(n_blocks / s) key
    blocks each (compute), plus zeroing and summing s fp32 dQ copies (memory). The smallest s within
    5% of the best estimate wins, under ``max_bytes`` of scratch.
    """
    n_blocks = _cdiv(seqlen_k, tile.block_n)
    group = nheads // nheads_k
    sq_pad = _cdiv(seqlen_q, PAD_ROWS) * PAD_ROWS
    split_bytes = batch * nheads * sq_pad * tile.headdim_bucket * 4
    # one key block over all query blocks of the group, at an assumed 1.5 TFLOP/s per SM
    t_block = tile.flops_per_step * _cdiv(seqlen_q, tile.block_m) * group / 1.5e12
    t_bytes = 2 * split_bytes / 2.5e12  # zeroing + reading one split at an assumed 2.5 TB/s
    best, costs = None, {}
    for s in range(1, min(n_blocks, 2 * num_sms) + 1):  # more splits than 2 waves of blocks never help
        if s > 1 and s * split_bytes > max_bytes:
            break
        waves = _cdiv(s * batch * nheads_k, num_sms)
        costs[s] = waves * _cdiv(n_blocks, s) * t_block + s * t_bytes
        best = costs[s] if best is None else min(best, costs[s])
    for s, c in costs.items():
        if c <= 1.05 * best:
            return s
    return 1


# ---- the ordered deterministic mode (bwd_common.cuh: query_block_range, ordered_pivot, ordered_turn) -------------
# Used by this path on sm_90a and by the Hopper backward (_launch_bwd_sm90).

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
    """(part, rank): key block ``nb``'s turn on query block ``m`` it visits (bwd_common.cuh's closed form)."""
    lower = n_kb - 1 if wr < 0 else min(n_kb - 1, ((m + 1) * bm + sk - sq + wr - 1) // bn)
    upper = min(lower, ((m + 1) * n_kb - 1) // _cdiv(sq, bm))
    if nb <= upper:
        return 0, upper - nb
    return (1 if two else 0), lower - nb + (0 if two else upper + 1)


def ordered_turn_bisect(nb: int, m: int, n_kb: int, sq: int, sk: int, wr: int, two: bool, bm: int,
                        bn: int) -> tuple[int, int]:
    """ordered_turn by bisection over the walks' own bounds (the reference the tests hold it to)."""
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


@functools.lru_cache(maxsize=1024)
def ordered_has_lower(sq: int, sk: int, wr: int, bm: int, bn: int) -> bool:
    """True when some key block's walk has a lower part (then two dq_accum planes keep the order). One pass
    over the key blocks, cached per shape (the full call path plans every call until the fast path
    records)."""
    n_kb = _cdiv(sk, bn)
    for nb in range(n_kb):
        m_first, n_m = query_block_range(nb * bn, sq, sk, -1, wr, bm, bn)
        if n_m > 0 and ordered_pivot(nb, n_kb, sq, sk, wr, bm, bn) > m_first:
            return True
    return False


ORDERED_ONE_PLANE_MAX_BLOCKS = 8


def ordered_planes(run: Run, tile, lower: bool) -> int:
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


def plan(run: Run, splits: int | None = None, tile: Sm80BwdTile | None = None) -> dict:
    """Tile, kernel names, splits and grids of this run (exposed for tests and benchmarks)."""
    tile = tile or _tile(run)
    if tile is None:
        raise ValueError("cuflash: no sm80 backward tile fits this GPU's shared memory (use the portable path)")
    b, h, hk, sq, sk = run.batch, run.nheads, run.nheads_k, run.seqlen_q, run.seqlen_k
    n_blocks = _cdiv(sk, tile.block_n)
    # Deterministic mode on sm_90a: ordered (bwd_sm80.cu, as the Hopper backward's: one block per key block,
    # dQ added in a fixed order through per-query-block counters; needs no left window), unless ``splits``
    # is given; elsewhere (and with a left window) per-split dQ copies. (The ordered mode is measured on the
    # H100 only; sm_80 GPUs keep the split copies.)
    ordered = bool(run.deterministic) and splits is None and run.window[0] < 0 and run.arch == "sm_90a"
    lower = ordered and ordered_has_lower(sq, sk, run.window[1], tile.block_m, tile.block_n)
    if ordered:
        splits = ordered_planes(run, tile, lower)  # dq_accum planes
    elif not run.deterministic:
        splits = 1
    elif splits is None:
        splits = deterministic_splits(b, h, hk, sq, sk, tile, _num_sms(run.device_id))
    if not ordered:
        splits = max(1, min(int(splits), n_blocks))
    sq_pad = _cdiv(sq, PAD_ROWS) * PAD_ROWS
    return {
        "tile": tile, "names": kernel_names(run.dtype, tile, run.dropout_p > 0), "splits": splits, "sq_pad": sq_pad,
        "n_blocks": n_blocks, "ordered": ordered,
        "counters": b * h * _cdiv(sq, tile.block_m) * splits if ordered else 0,
        "grid_rows": (sq_pad // ROWS_PER_BLOCK, h, b),
        "grid_main": (splits if run.deterministic and not ordered else n_blocks, hk, b),
        "grid_convert": (_cdiv(sq, ROWS_PER_BLOCK), h, b),
    }


# ---- launch ----------------------------------------------------------------------------------------

def scratch_fields(run: Run, pl: dict, prefix: str) -> dict:
    """The scratch of a backward plan (this path's or the Hopper backward's), kept alive in ``run.scratch``
    under ``prefix``_* (the launches are asynchronous): vec (D and L rows), dq_accum (zeroed) and, in the
    ordered deterministic mode, its counters (zeroed). Zeroing goes through the launch layer, so the fast
    path records and replays it. Returns the Params fields that point at them."""
    b, h, sq_pad = run.batch, run.nheads, pl["sq_pad"]
    vec = _launch.empty(run, (2, b, h, sq_pad), "float32")
    dq_accum = _launch.empty(run, (pl["splits"], b, h, sq_pad, pl["tile"].headdim_bucket), "float32")
    run.scratch[f"{prefix}_vec"] = vec
    run.scratch[f"{prefix}_dq_accum"] = dq_accum
    _launch.memset(run, dq_accum)
    fields = {"dsum": ptr(vec), "dq_accum": ptr(dq_accum), "num_splits": pl["splits"]}
    if pl["ordered"]:
        counters = _launch.empty(run, (pl["counters"],), "int32")
        run.scratch[f"{prefix}_counters"] = counters
        _launch.memset(run, counters)
        fields["counters"] = ptr(counters)
    return fields


def backward_sm80(run: Run, splits: int | None = None, tile: Sm80BwdTile | None = None) -> None:
    """dq, dk, dv of ``run`` (views with the caller's strides) through the tensor-core kernels.

    ``splits`` (deterministic mode only) overrides the dq_accum split count and ``tile`` the tile (tests)."""
    pl = plan(run, splits, tile)
    tile, names = pl["tile"], pl["names"]
    params = run.params(**scratch_fields(run, pl, "bwd_sm80"))
    launch(run, FILE, names["preprocess"], pl["grid_rows"], (ROW_THREADS,), params)
    launch(run, FILE, names["main"], pl["grid_main"], (THREADS,), params, tile.smem)
    launch(run, FILE, names["convert"], pl["grid_convert"], (ROW_THREADS,), params)


def expected_traits_checks() -> list[str]:
    """static_asserts tying the host table to the kernel traits (compiled by the CPU test)."""
    out = []
    for drop in (False, True):
        for t in tiles(drop):
            d = t.headdim_bucket
            tr = f"cuflash::Sm80BwdTraits<{d}, {t.stages}, {'true' if drop else 'false'}>"
            out.append(f"static_assert({tr}::kSmemBytes == {t.smem}, \"smem {d}\");")
            out.append(f"static_assert({tr}::kThreads == {t.threads}, \"threads {d}\");")
            out.append(f"static_assert({tr}::kBM == {t.block_m} && {tr}::kBN == {t.block_n}, \"tile {d}\");")
            out.append(f"static_assert({tr}::kWMS == {t.warps_m_s} && {tr}::kWNKV == {t.warps_n_kv} && "
                       f"{tr}::kWMQ == {t.warps_m_q} && {tr}::kStages == {t.stages}, \"warps {d}\");")
    out.append(f"static_assert(cuflash::kBwdSm80Pad == {PAD_ROWS} && cuflash::kBwdSm80Rows == {ROWS_PER_BLOCK} "
               f"&& cuflash::kBwdSm80RowThreads == {ROW_THREADS}, \"row kernels\");")
    return out


__all__ = ["supports", "backward_sm80", "variants", "plan", "tile_for", "tiles", "TILES", "TILES_SMALL_SMEM",
           "TILES_DROPOUT", "deterministic_splits"]
