"""The sm80 tensor-core forward path (``kernels_cu/fwd_sm80.cu``) and split-KV combine (``combine.cu``).

``supports(run)`` says whether a run can take this path (fp16/bf16, sm_80 or newer, headdim <= 256,
16-byte aligned rows; otherwise the portable path runs), ``forward_sm80(run)`` launches it,
``variants(arch)`` lists every kernel the dispatcher can pick on an architecture (precompile, compile
tests), and ``merge_partials`` is the device side of ``merge_attention``.

Split-KV: when batch x heads x query blocks cannot fill the GPU (decoding: seqlen_q = 1 against
long keys), each block's key tiles are cut into ``num_splits`` slices run by separate blocks; every
slice writes fp32 partial outputs and LSEs, and ``fwd_combine`` merges them in the output dtype.
``run.num_splits``: 0 = heuristic, >= 1 forced (capped at the number of key tiles).

Packed GQA: when nheads > nheads_k and seqlen_q is below the tile's block_m, the query heads of one
kv head share the blocks' rows, so each K/V tile is read once per kv head instead of once per query
head (the decoding case).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import _config
from ._launch import CTYPES, PARAMS_DTYPE, empty, launch, ptr

FWD_FILE = "fwd_sm80.cu"
COMBINE_FILE = "combine.cu"
FLAG_PACK_GQA = 1          # CUFLASH_FLAG_PACK_GQA in fwd_sm80.cu; the pack factor goes in flags >> 8
MAX_SPLITS = 128
_DTYPES = ("float16", "bfloat16")
_GRID_YZ_MAX = 65535
_COMBINE_ROWS_PER_BLOCK = 4  # one warp per row, 128 threads


def _cbool(b: bool) -> str:
    return "true" if b else "false"


def kernel_name(dtype: str, tile: _config.Sm80Tile, dropout: bool = False) -> str:
    """The kernel for a tile; ``dropout`` (dropout_p > 0) picks its DROPOUT variant (the template flag
    defaults to false, so the names of the no-dropout kernels are unchanged)."""
    return (f"cuflash::fwd_sm80<{CTYPES[dtype]}, {tile.headdim_bucket}, {tile.block_m}, {tile.block_n}, "
            f"{tile.warps}, {tile.stages}, {_cbool(tile.q_in_regs)}{', true' if dropout else ''}>")


def combine_name(dtype: str) -> str:
    return f"cuflash::fwd_combine<{CTYPES[dtype]}>"


def variants(arch: str | None = None) -> list[tuple[str, str]]:
    """Every (file, name expression) this path can launch on GPUs of ``arch`` (e.g. ``"sm_90a"``; None:
    on any GPU): the tiles the dispatcher picks there without and with dropout (``_config``
    ``sm80_forward_tiles``; none below sm_80), and the combine (also used by merge_attention, on any GPU)."""
    out = [(FWD_FILE, kernel_name(dt, t, drop)) for drop in (False, True) for dt in _DTYPES
           for t in _config.sm80_forward_tiles(drop, arch)]
    out += [(COMBINE_FILE, combine_name(dt)) for dt in ("float16", "bfloat16", "float32")]
    return out


# ---- device properties (cached per device) ------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _device_attr(device_id: int, attr_name: str) -> int:
    import cupy

    rt = cupy.cuda.runtime
    return int(rt.deviceGetAttribute(getattr(rt, attr_name), device_id))


def num_sms(device_id: int) -> int:
    return _device_attr(device_id, "cudaDevAttrMultiProcessorCount")


def smem_per_block_optin(device_id: int) -> int:
    return _device_attr(device_id, "cudaDevAttrMaxSharedMemoryPerBlockOptin")


_arch_number = _config.arch_number


# ---- support ---------------------------------------------------------------------------------------

def _rows_16b_aligned(a) -> bool:
    """Last dim contiguous, base 16-byte aligned, other strides multiples of 8 elements (16 bytes).

    Strides of dimensions of extent 1 are never used and not checked.
    """
    if a is None:
        return True
    if a.ndim != 4 or a.itemsize != 2:
        return False
    if int(a.data.ptr) % 16:
        return False
    if a.shape[3] > 1 and a.strides[3] != a.itemsize:
        return False
    for ext, st in zip(a.shape[:3], a.strides[:3]):
        if ext > 1 and (st % a.itemsize or (st // a.itemsize) % 8):
            return False
    return True


def _tile(run) -> _config.Sm80Tile | None:
    try:
        limit = smem_per_block_optin(run.device_id)
    except Exception:  # no device query possible: assume the sm80 limit
        limit = 163 * 1024
    return _config.sm80_forward(run.headdim, limit, run.dropout_p > 0)


def supports(run) -> bool:
    """True when this path can run ``run`` (else the portable forward must)."""
    if run.dtype not in _DTYPES or _arch_number(run.arch) < 80:
        return False
    if not 1 <= run.headdim <= 256:
        return False
    # Dropout: every head dim has a spill-free DROPOUT variant (kernel_name(..., dropout=True); d 160 takes
    # its own tile, _config.SM80_FORWARD_TILES_DROPOUT), so no restriction here.
    if min(run.batch, run.seqlen_q, run.seqlen_k, run.nheads, run.nheads_k) < 1:
        return False
    if run.batch > _GRID_YZ_MAX or run.nheads > _GRID_YZ_MAX:
        return False
    if not all(_rows_16b_aligned(a) for a in (run.q, run.k, run.v, run.out)):
        return False
    return _tile(run) is not None


# ---- split-KV heuristic ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def num_splits_heuristic(ctas: int, slots: int, n_blocks: int, max_splits: int = MAX_SPLITS) -> int:
    """Slices of the key range per block so that ctas * splits fills ``slots`` (SMs x blocks per SM).

    No split when the grid already covers 80% of the slots. Otherwise, among split counts that
    really change the slice length (ceil(n_blocks / s) differs from s - 1's), take the smallest whose
    wave efficiency (waves / ceil(waves)) is within 85% of the best: more splits cost fp32 partial
    traffic and a longer combine.
    """
    if ctas >= 0.8 * slots or n_blocks <= 1:
        return 1
    max_splits = max(1, min(max_splits, slots, n_blocks))
    eff = []
    for s in range(1, max_splits + 1):
        if s > 1 and -(-n_blocks // s) == -(-n_blocks // (s - 1)):
            eff.append(0.0)
            continue
        waves = ctas * s / slots
        eff.append(waves / math.ceil(waves))
    best = max(eff)
    for s, e in enumerate(eff, start=1):
        if e >= 0.85 * best:
            return s
    return 1


def plan(run, tile=None) -> dict:
    """Launch plan: tile, pack, grid, splits (exposed for tests and benchmarks)."""
    tile = tile or _tile(run)
    group = run.nheads // run.nheads_k
    pack = group if (group > 1 and run.seqlen_q < tile.block_m) else 1
    m_blocks = -(-(run.seqlen_q * pack) // tile.block_m)
    heads_y = run.nheads // pack
    n_blocks = -(-run.seqlen_k // tile.block_n)
    if run.num_splits >= 1:
        splits = run.num_splits
    else:
        per_sm = 2 if tile.warps == 4 else 1
        try:
            sms = num_sms(run.device_id)
        except Exception:
            sms = 132
        splits = num_splits_heuristic(run.batch * heads_y * m_blocks, sms * per_sm, n_blocks)
    splits = max(1, min(splits, n_blocks, MAX_SPLITS))
    return {"tile": tile, "pack": pack, "m_blocks": m_blocks, "heads_y": heads_y, "n_blocks": n_blocks,
            "splits": splits, "grid": (m_blocks * splits, heads_y, run.batch)}


# ---- launches --------------------------------------------------------------------------------------

def forward_sm80(run) -> None:
    """Launch the tensor-core forward (and the split-KV combine when it splits)."""
    pl = plan(run)
    tile, splits = pl["tile"], pl["splits"]
    extra = {"num_splits": splits, "flags": (FLAG_PACK_GQA | (pl["pack"] << 8)) if pl["pack"] > 1 else 0}
    if splits > 1:
        extra.update(split_partials(run, splits))
    params = run.params(**extra)
    launch(run, FWD_FILE, kernel_name(run.dtype, tile, run.dropout_p > 0), pl["grid"], (tile.threads,), params,
           tile.smem)
    if splits > 1:
        launch_combine(run, params)


def split_partials(run, splits: int) -> dict:
    """Split-KV scratch of a forward (fp32 partial outputs and LSEs, combine.cu's layout), kept alive in
    ``run.scratch``; returns the Params fields that point at it (fwd_sm80.cu and fwd_decode.cu)."""
    ldo = -(-run.headdim // 8) * 8
    o_part = empty(run, (splits, run.batch, run.nheads, run.seqlen_q, ldo), "float32")
    lse_part = empty(run, (splits, run.batch, run.nheads, run.seqlen_q), "float32")
    run.scratch["o_partial"], run.scratch["lse_partial"] = o_part, lse_part  # alive until enqueued
    return {"o_partial": ptr(o_part), "lse_partial": ptr(lse_part)}


def launch_combine(run, params) -> None:
    """combine.cu over the partials ``split_partials`` made (after the forward that wrote them)."""
    rows = run.batch * run.nheads * run.seqlen_q
    launch(run, COMBINE_FILE, combine_name(run.dtype), (-(-rows // _COMBINE_ROWS_PER_BLOCK),), (128,), params)


def merge_partials(run_like, outs, lses, out, lse) -> None:
    """Merge attention results computed over disjoint key sets (device side of merge_attention).

    outs: sequence of n CuPy arrays (batch, seqlen_q, nheads, headdim), any float dtype and strides;
    lses: n CuPy float32 arrays (batch, nheads, seqlen_q), natural log, -inf where a part saw no key.
    out: CuPy array (batch, seqlen_q, nheads, headdim) of float16 / bfloat16 / float32, last dim
    contiguous (written); lse: contiguous CuPy float32 (batch, nheads, seqlen_q) or None (written).
    run_like: anything with ``device_id`` and ``stream`` (a Run does), optionally ``empty``.

    out = sum_i exp(lse_i - lse) * outs_i and lse = log(sum_i exp(lse_i)); rows that no part saw get
    out = 0 and lse = -inf.
    """
    import cupy

    n = len(outs)
    if n == 0 or n != len(lses):
        raise ValueError("cuflash: merge needs as many LSEs as outputs, at least one")
    b, sq, h, d = out.shape
    dtype = out.dtype.name
    if dtype not in CTYPES:
        raise TypeError(f"cuflash: merge output must be float16, bfloat16 or float32, got {dtype}")
    if lse is not None and not lse.flags.c_contiguous:
        raise ValueError("cuflash: merge lse output must be contiguous")
    ldo = -(-d // 8) * 8
    with cupy.cuda.Device(run_like.device_id), run_like.stream:
        o_part = empty(run_like, (n, b, h, sq, ldo), "float32")
        lse_part = empty(run_like, (n, b, h, sq), "float32")
        for i, (o, l) in enumerate(zip(outs, lses)):
            o_part[i, :, :, :, :d] = o.transpose(0, 2, 1, 3)
            lse_part[i] = l
        p = np.zeros((), dtype=PARAMS_DTYPE)
        isz = out.itemsize
        p["o"], p["lse"] = ptr(out), ptr(lse)
        p["o_batch_stride"], p["o_row_stride"], p["o_head_stride"] = (out.strides[0] // isz,
                                                                      out.strides[1] // isz, out.strides[2] // isz)
        p["o_partial"], p["lse_partial"] = ptr(o_part), ptr(lse_part)
        p["batch"], p["seqlen_q"], p["nheads"], p["headdim"] = b, sq, h, d
        p["nheads_k"], p["seqlen_k"] = h, 1
        p["num_splits"] = n
        rows = b * h * sq
        if rows:
            launch(run_like, COMBINE_FILE, combine_name(dtype), (-(-rows // _COMBINE_ROWS_PER_BLOCK),), (128,), p)
