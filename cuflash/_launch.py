"""Kernel launches: the ``Params`` struct on the host, and grid/launch of each kernel family.

``PARAMS_FIELDS`` mirrors ``struct Params`` of ``kernels_cu/params.cuh`` field for field (a CPU test
parses the header and compares). A launch fills one NumPy structured scalar and CuPy passes its
bytes as the kernel's single by-value argument.
"""

from __future__ import annotations

import array
import ctypes
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import _compile, _config, reference

_log = logging.getLogger("cuflash")

_P, _I64, _U64, _I32, _F32, _U32 = "u8", "i8", "u8", "i4", "f4", "u4"

POINTER_FIELDS = ("q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv", "dq_accum", "dsum", "dk_accum", "dv_accum",
                  "alibi", "o_partial", "lse_partial", "counters")
PARAMS_FIELDS: list[tuple[str, str]] = (
    [(n, _P) for n in POINTER_FIELDS]
    + [(f"{t}_{s}_stride", _I64) for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv")
       for s in ("batch", "row", "head")]
    + [("alibi_batch_stride", _I64), ("seed", _U64), ("rng_offset", _U64)]
    + [(n, _I32) for n in ("batch", "nheads", "nheads_k", "seqlen_q", "seqlen_k", "headdim",
                           "window_left", "window_right")]
    + [(n, _F32) for n in ("scale", "scale_log2", "softcap", "dropout_p", "dropout_scale")]
    + [("dropout_threshold", _U32)]
    + [(n, _I32) for n in ("num_splits", "deterministic", "flags", "pad0")]
)
PARAMS_DTYPE = np.dtype({"names": [n for n, _ in PARAMS_FIELDS],
                         "formats": [t for _, t in PARAMS_FIELDS]}, align=True)
# What is handed to CuPy: the same bytes as one unstructured void. CuPy reads a NumPy scalar argument
# through __array_interface__, whose "descr" NumPy rebuilds field by field for a structured dtype on
# every call (~60 recursive calls, about 150 us a launch); for a plain void it is one entry.
PARAMS_BYTES = np.dtype((np.void, PARAMS_DTYPE.itemsize))

# C++ type of each supported dtype, for name expressions.
CTYPES = {"float16": "cuflash::half_t", "bfloat16": "cuflash::bf16_t", "float32": "float"}


def ptr(a) -> int:
    return 0 if a is None else int(a.data.ptr)


def strides3(a) -> tuple[int, int, int]:
    """(batch, row, head) strides in elements of a (batch, seqlen, heads, headdim) CuPy array."""
    isz = a.itemsize
    return a.strides[0] // isz, a.strides[1] // isz, a.strides[2] // isz


@dataclass
class Run:
    """Everything one launch needs: CuPy views of the caller's memory, options, the device."""

    device_id: int
    arch: str
    stream: object                 # cupy stream (the caller's current stream)
    dtype: str                     # "float16" | "bfloat16" | "float32"
    q: object
    k: object
    v: object
    out: object = None
    lse: object = None
    dout: object = None
    dq: object = None
    dk: object = None
    dv: object = None
    alibi: object = None
    causal: bool = False
    softmax_scale: float = 1.0
    window: tuple[int, int] = (-1, -1)   # normalised: causal folded into window[1] = 0
    softcap: float = 0.0
    dropout_p: float = 0.0
    seed: int = 0
    rng_offset: int = 0
    deterministic: bool = False
    num_splits: int = 0
    path: str | None = None        # filled by dispatch: "portable" | "sm80" | "sm90" | "decode"
    scratch: dict = field(default_factory=dict)
    empty: object = None           # allocator: empty(shape, dtype_str) -> CuPy array (caller's framework)
    record: list | None = None     # when a list, every launch / memset is also appended here (plan cache)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[1]

    @property
    def nheads(self) -> int:
        return self.q.shape[2]

    @property
    def headdim(self) -> int:
        return self.q.shape[3]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[1]

    @property
    def nheads_k(self) -> int:
        return self.k.shape[2]

    def params(self, **extra) -> np.void:
        """The ``Params`` struct for this run (pointers, strides, sizes, options)."""
        p = np.zeros((), dtype=PARAMS_DTYPE)
        for name in ("q", "k", "v", "dout", "dq", "dk", "dv"):
            a = getattr(self, name)
            p[name] = ptr(a)
        p["o"] = ptr(self.out)
        p["lse"] = ptr(self.lse)
        p["alibi"] = ptr(self.alibi)
        for prefix, a in (("q", self.q), ("k", self.k), ("v", self.v), ("o", self.out),
                          ("do", self.dout), ("dq", self.dq), ("dk", self.dk), ("dv", self.dv)):
            if a is not None:
                s = strides3(a)
                p[f"{prefix}_batch_stride"], p[f"{prefix}_row_stride"], p[f"{prefix}_head_stride"] = s
        if self.alibi is not None:
            p["alibi_batch_stride"] = self.nheads if self.alibi.ndim == 2 else 0
        p["batch"], p["seqlen_q"], p["nheads"], p["headdim"] = self.q.shape
        p["seqlen_k"], p["nheads_k"] = self.k.shape[1], self.k.shape[2]
        # A side that cannot mask anything becomes -1 (exact: j >= i + sk - sq - left holds for all
        # i >= 0 once left >= sk, and j <= i + sk - sq + right for all j < sk once right >= sq). This keeps
        # the kernels' 32-bit mask arithmetic far from overflow for huge windows.
        left, right = self.window
        p["window_left"] = -1 if left >= self.seqlen_k else left
        p["window_right"] = -1 if right >= self.seqlen_q else right
        p["scale"] = self.softmax_scale
        p["scale_log2"] = self.softmax_scale * math.log2(math.e)
        p["softcap"] = self.softcap
        p["dropout_p"] = self.dropout_p
        p["dropout_scale"] = 1.0 / (1.0 - self.dropout_p)
        p["dropout_threshold"] = reference.dropout_threshold(self.dropout_p)  # the 16-bit rule, philox.cuh
        p["seed"], p["rng_offset"] = self.seed, self.rng_offset
        p["num_splits"] = max(1, self.num_splits)
        p["deterministic"] = int(self.deterministic)
        for key, val in extra.items():
            p[key] = val
        return p


def _cbool(b: bool) -> str:
    return "true" if b else "false"


def launch(run: Run, filename: str, name: str, grid, block, params, smem: int = 0, maps=(),
           attributes: tuple = ()) -> None:
    """Launch one kernel of ``kernels_cu/<filename>`` on the run's device and stream.

    ``maps``: TMA tensor-map specs (``_tma.MapSpec``) of run operands; when given, the kernel takes a
    second argument, their encoded maps at the operands' current addresses (sm90 kernels).
    ``attributes``: function attributes to set first (``_compile.get_function``).
    """
    fn = _compile.get_function(filename, name, run.device_id, dynamic_smem=smem, attributes=attributes)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("cuflash: launch %s grid=%s block=%s smem=%d", name, tuple(grid), tuple(block), smem)
    arg = params.view(PARAMS_BYTES)[()] if isinstance(params, np.ndarray) else params
    args = (arg,)
    if maps:
        from . import _tma

        args = (arg, _maps_arg(_tma.pack(maps, [ptr(getattr(run, m.operand)) for m in maps])))
    with run.stream:
        fn(tuple(grid), tuple(block), args, shared_mem=smem)
    rec = getattr(run, "record", None)
    if rec is not None:
        raw = arg.tobytes() if hasattr(arg, "tobytes") else b""
        rec.append(("launch", filename, name, fn, tuple(grid), tuple(block), smem, raw, tuple(maps)))


def _maps_arg(blob: bytes):
    """A by-value kernel argument holding ``blob`` (the TmaMaps struct)."""
    return np.frombuffer(blob, dtype=np.dtype((np.void, len(blob))))[0]


def empty(run, shape, dtype: str):
    """A scratch array for ``run``: from the caller framework's allocator (``run.empty``) when it has one,
    else CuPy on the run's device. Keep it alive (``run.scratch``) until its launches are enqueued."""
    if getattr(run, "empty", None) is not None:
        return run.empty(tuple(shape), dtype)
    import cupy

    with cupy.cuda.Device(run.device_id):
        return cupy.empty(tuple(shape), dtype)


def memset(run: Run, a) -> None:
    """Zero the CuPy array ``a`` (contiguous) on the run's stream; recorded like a launch.

    Device work of a forward or backward path must go through ``launch`` or this function (no CuPy
    ops): the plan cache (``Replay``) replays exactly what was recorded.
    """
    _memset_async(ptr(a), a.nbytes, run.stream)  # as a replay does it
    rec = getattr(run, "record", None)
    if rec is not None:
        rec.append(("memset", ptr(a), a.nbytes))


# ---- record and replay (the per-signature plan cache of _api) ---------------------------------------
#
# A call that the plan cache records (the second of its signature) runs the full path with
# ``run.record`` set: ``launch`` and ``memset`` append what they did. ``Replay.build`` turns that into templates: the recorded Params bytes with the
# pointer fields (q, k, v, o, lse, alibi, dout, dq, dk, dv by name; scratch pointers by the allocation
# they fall in) and the seed marked for patching. ``Replay.launch_all`` redoes the launches with the
# pointers of a new call: no dispatch, no Params filling, one byte copy per distinct template. Every
# other Params field must be a function of the signature (``rng_offset`` is 0 on every call today; a
# per-call value would have to be patched like the seed).

# Kernel files whose launch code does all its device work through ``launch`` / ``memset``. A recording
# that launched anything else is not cached (its path may do device work that a replay would miss).
# A path joins this list once its host code uses ``memset`` instead of direct CuPy memsets / ops.
REPLAYABLE_FILES = frozenset({"fwd_portable.cu", "fwd_sm80.cu", "fwd_sm90.cu", "fwd_decode.cu", "combine.cu",
                              "bwd_portable.cu", "bwd_sm80.cu", "bwd_sm90.cu"})

# Pointer slots of a replay: the named operands, then scratch allocations in allocation order.
SLOTS = ("q", "k", "v", "out", "lse", "alibi", "dout", "dq", "dk", "dv")
_FIELD_SLOT = {"q": 0, "k": 1, "v": 2, "o": 3, "lse": 4, "alibi": 5, "dout": 6, "dq": 7, "dk": 8, "dv": 9}
_PTR_WORDS = tuple((n, PARAMS_DTYPE.fields[n][1] // 8) for n in POINTER_FIELDS)
_PTR_SLOT_WORDS = tuple((_FIELD_SLOT.get(n), w) for n, w in _PTR_WORDS)
SEED_WORD = PARAMS_DTYPE.fields["seed"][1] // 8
_NWORDS = PARAMS_DTYPE.itemsize // 8
assert PARAMS_DTYPE.itemsize % 8 == 0 and all(PARAMS_DTYPE.fields[n][1] % 8 == 0 for n, _ in _PTR_WORDS)


class Replay:
    """Recorded launches of one signature, replayable with new pointers (see above)."""

    __slots__ = ("blocks", "ops", "nslots")

    def __init__(self, blocks, ops, nslots):
        self.blocks = blocks    # ((template Params bytes, ((word, slot, byte offset), ...)), ...)
        # (("launch", fn, grid, block, smem, block index, ((slot, MapSpec), ...)) | ("memset", slot, off, n), ...)
        self.ops = ops
        self.nslots = nslots

    @classmethod
    def build(cls, record, sources: dict, scratch) -> Replay | None:
        """``record``: ``Run.record`` of a full-path call; ``sources``: SLOTS name -> pointer of that call
        (0 or absent when unused); ``scratch``: [(pointer, nbytes)] of its scratch allocations, in
        order. None when something recorded cannot be explained (then the signature is not cached).

        A pointer field is patched from its named operand when it holds that operand's pointer (by
        field name, so aliased operands such as ``k is v`` stay apart), else from the one scratch
        allocation it falls in; a memset's pointer from the scratch allocation it falls in, or the one
        named operand it equals."""
        if not record:
            return None
        src = [int(sources.get(n) or 0) for n in SLOTS]
        ranges = [(int(p), int(p) + max(1, int(n))) for p, n in scratch]
        nsrc = len(SLOTS)

        def in_scratch(val):
            hit = None
            for i, (lo, hi) in enumerate(ranges):
                if lo <= val < hi:
                    if hit is not None:
                        return None
                    hit = (nsrc + i, val - lo)
            return hit

        blocks, index, ops = [], {}, []
        for entry in record:
            if entry[0] == "memset":
                _, p, n = entry
                p = int(p)
                where = in_scratch(p)
                named = [i for i, sp in enumerate(src) if sp == p]
                if where is None and len(named) == 1:
                    where = (named[0], 0)
                elif where is not None and named:
                    where = None
                if where is None:
                    return None
                ops.append(("memset", where[0], where[1], int(n)))
                continue
            _, filename, _name, fn, grid, block, smem, raw = entry[:8]
            maps = entry[8] if len(entry) > 8 else ()
            if filename not in REPLAYABLE_FILES or len(raw) != PARAMS_DTYPE.itemsize:
                return None
            map_slots = tuple((SLOTS.index(m.operand), m) for m in maps)
            words = memoryview(raw).cast("Q").tolist()
            patches = []
            for slot, w in _PTR_SLOT_WORDS:
                val = words[w]
                if not val:
                    continue
                if slot is not None and src[slot] == val:
                    patches.append((w, slot, 0))
                else:
                    where = in_scratch(val)
                    if where is None:
                        return None
                    patches.append((w, where[0], where[1]))
                words[w] = 0
            words[SEED_WORD] = 0
            blk = (array.array("Q", words).tobytes(), tuple(patches))
            b = index.get(blk)
            if b is None:
                b = index[blk] = len(blocks)
                blocks.append(blk)
            ops.append(("launch", fn, tuple(grid), tuple(block), int(smem), b, map_slots))
        return cls(tuple(blocks), tuple(ops), nsrc + len(ranges))

    def launch_all(self, ptrs, seed: int, stream) -> None:
        """Replay on ``stream`` (anything with ``.ptr``) in the current device's context. ``ptrs``: one
        pointer per slot (SLOTS, then each scratch allocation's base)."""
        bufs = []
        for tmpl, patches in self.blocks:
            buf = _Words.from_buffer_copy(tmpl)
            for w, s, off in patches:
                buf[w] = ptrs[s] + off
            buf[SEED_WORD] = seed
            bufs.append(buf)
        for op in self.ops:
            if op[0] == "launch":
                _, fn, grid, block, smem, b, map_slots = op
                if map_slots:
                    from . import _tma

                    blob = _tma.pack([m for _, m in map_slots], [ptrs[s] for s, _ in map_slots])
                    fn(grid, block, (_arg(bufs[b]), _maps_arg(blob)), shared_mem=smem, stream=stream)
                else:
                    fn(grid, block, (_arg(bufs[b]),), shared_mem=smem, stream=stream)
            else:
                _, s, off, n = op
                _memset_async(ptrs[s] + off, n, stream)


_Words = ctypes.c_uint64 * _NWORDS
_CPointer = None


def _arg(buf):
    """The kernel argument for a Params buffer: CuPy's by-address argument (cuLaunchKernel copies the
    bytes at launch), else a one-element array that CuPy passes by value."""
    global _CPointer
    if _CPointer is None:
        try:
            from cupy.cuda.function import CPointer as _CPointer
        except Exception:  # pragma: no cover - depends on the CuPy build
            _CPointer = False
    if _CPointer is not False:
        return _CPointer(ctypes.addressof(buf))
    return np.frombuffer(buf, dtype=PARAMS_BYTES)  # pragma: no cover


def _memset_async(p: int, n: int, stream) -> None:
    import cupy

    cupy.cuda.runtime.memsetAsync(p, 0, n, stream.ptr)


# ---- forward -------------------------------------------------------------------------------------

def forward_portable(run: Run) -> None:
    cfg = _config.portable_forward(run.headdim)
    name = f"cuflash::fwd_portable<{CTYPES[run.dtype]}, {cfg.headdim_bucket}, {_cbool(run.dropout_p > 0)}>"
    grid = (-(-run.seqlen_q // cfg.block_m), run.nheads, run.batch)
    launch(run, "fwd_portable.cu", name, grid, (cfg.threads,), run.params(), cfg.smem)


def forward(run: Run) -> None:
    """Pick the forward path for this run and launch it (``run.path`` says which ran)."""
    from . import _launch_decode, _launch_sm80, _launch_sm90

    if _launch_decode.supports(run):  # at most 16 rows per kv head (decoding): before the prefill paths
        run.path = "decode"
    elif _launch_sm90.supports(run):
        run.path = "sm90"
    else:
        sm80 = os.environ.get("CUFLASH_DISABLE_SM80") != "1" and _launch_sm80.supports(run)
        run.path = "sm80" if sm80 else "portable"
    _log.debug("cuflash: forward path=%s dtype=%s headdim=%d", run.path, run.dtype, run.headdim)
    if run.path == "decode":
        _launch_decode.forward_decode(run)
    elif run.path == "sm90":
        _launch_sm90.forward_sm90(run)
    elif run.path == "sm80":
        _launch_sm80.forward_sm80(run)
    else:
        forward_portable(run)


# ---- backward ------------------------------------------------------------------------------------

def backward(run: Run) -> None:
    """Pick the backward path for this run and launch it."""
    from . import _launch_bwd_sm80, _launch_bwd_sm90
    from ._launch_bwd import backward_portable

    # Dropout: the portable kernels regenerate the forward's mask from (seed, rng_offset) (DROPOUT variants).
    if _launch_bwd_sm90.supports(run):
        run.path = "sm90"
    else:
        run.path = "sm80" if _launch_bwd_sm80.supports(run) else "portable"
    _log.debug("cuflash: backward path=%s dtype=%s headdim=%d deterministic=%s", run.path, run.dtype,
               run.headdim, run.deterministic)
    if run.path == "sm90":
        return _launch_bwd_sm90.backward_sm90(run)
    if run.path == "sm80":
        return _launch_bwd_sm80.backward_sm80(run)
    backward_portable(run)
