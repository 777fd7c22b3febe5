"""The public functions: validation, defaults, dispatch to the reference or the kernels."""

from __future__ import annotations

import logging
import math
import numbers
import os
import secrets
import sys
import threading

import numpy as np

from . import _interop, reference
from ._interop import describe

_MAX_HEADDIM = 256


class _Checked:
    """Validated arguments of one call."""

    __slots__ = ("kind", "device", "dtype", "batch", "seqlen_q", "seqlen_k", "nheads", "nheads_k",
                 "headdim", "scale", "window", "causal", "softcap", "dropout_p", "seed", "alibi_info")


# ---- option checks ---------------------------------------------------------------------------

def _check_bool(name, v):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"cuflash: {name} must be a bool, got {describe(v)}")
    return bool(v)


def _check_float(name, v, *, lo=None, lo_open=False, hi=None, hi_open=False):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"cuflash: {name} must be a real number, got {describe(v)}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"cuflash: {name} must be finite, got {f}")
    if lo is not None and (f < lo or (lo_open and f == lo)):
        raise ValueError(f"cuflash: {name} must be {'>' if lo_open else '>='} {lo}, got {f}")
    if hi is not None and (f > hi or (hi_open and f == hi)):
        raise ValueError(f"cuflash: {name} must be {'<' if hi_open else '<='} {hi}, got {f}")
    return f


def _check_window(window_size):
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"cuflash: window_size must be a pair (left, right) of ints, -1 = unbounded; "
                        f"got {window_size!r}")
    out = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral):
            raise TypeError(f"cuflash: window_size {side} must be an int, got {describe(w)}")
        if int(w) < -1:
            raise ValueError(f"cuflash: window_size {side} must be >= -1 (-1 = unbounded), got {int(w)}")
        out.append(int(w))
    return tuple(out)


def _check_seed(seed):
    if seed is None:
        return secrets.randbits(63)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"cuflash: seed must be an int or None, got {describe(seed)}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"cuflash: seed must be in [0, 2**64), got {int(seed)}")
    return int(seed)


def _options(c: _Checked, *, causal, softmax_scale, window_size, softcap, dropout_p, seed):
    c.causal = _check_bool("causal", causal)
    c.window = _check_window(window_size)
    if c.causal:  # causal is a window whose right edge is the diagonal
        c.window = (c.window[0], 0 if c.window[1] < 0 else min(c.window[1], 0))
    c.softcap = _check_float("softcap", softcap, lo=0.0)
    if isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, (bool, np.bool_)) \
            and math.isnan(float(dropout_p)):
        raise ValueError("cuflash: dropout_p must be in [0, 1), got nan")
    c.dropout_p = _check_float("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    c.seed = _check_seed(seed) if c.dropout_p > 0 else (0 if seed is None else _check_seed(seed))
    if softmax_scale is None:
        c.scale = 1.0 / math.sqrt(c.headdim) if c.headdim > 0 else 1.0
    else:
        c.scale = _check_float("softmax_scale", softmax_scale)


# ---- array checks --------------------------------------------------------------------------------

def _arrays(named: dict, *, allow_cpu=True):
    """Check that all named arrays are arrays of one kind on one device; return their infos."""
    infos = {}
    first = None
    for name, x in named.items():
        kind = _interop.kind_of(x)
        if kind is None:
            raise TypeError(f"cuflash: {name} must be a CuPy, NumPy, PyTorch or JAX array (or any DLPack "
                            f"producer), got {describe(x)}")
        inf = _interop.info(x, kind)
        if first is None:
            first = (name, inf)
        else:
            fname, finf = first
            if inf.kind != finf.kind:
                raise TypeError(f"cuflash: {name} is a {inf.kind} array but {fname} is a {finf.kind} array; "
                                "pass arrays of one framework")
            if inf.device != finf.device:
                raise ValueError(f"cuflash: {name} is on {inf.device[0]}:{inf.device[1]} but {fname} is on "
                                 f"{finf.device[0]}:{finf.device[1]}; pass arrays on one device")
        infos[name] = inf
    return infos


def _check_last_dim(name, inf):
    """CUDA arrays must be contiguous in the last dimension (any other strides are fine)."""
    if inf.is_cuda and inf.strides is not None and 0 not in inf.shape and inf.shape[-1] > 1 \
            and inf.strides[-1] != 1:
        raise ValueError(f"cuflash: {name} must be contiguous in its last dimension (headdim), got strides "
                         f"{inf.strides}; other dimensions may have any strides")


def _check_qkv(c: _Checked, infos: dict):
    q, k, v = infos["q"], infos["k"], infos["v"]
    for name in ("q", "k", "v"):
        inf = infos[name]
        if len(inf.shape) != 4:
            raise ValueError(f"cuflash: {name} must be 4-D (batch, seqlen, nheads, headdim), got shape {inf.shape}")
        if inf.dtype not in _interop.SUPPORTED_DTYPES and not (not inf.is_cuda and inf.dtype == "float64"):
            raise TypeError(f"cuflash: {name} must be float16, bfloat16 or float32, got {inf.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"cuflash: q, k, v must have one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    b, sq, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"cuflash: k and v must have the same shape, got k {k.shape} and v {v.shape}")
    bk, sk, hk, dk = k.shape
    if bk != b:
        raise ValueError(f"cuflash: k must have q's batch size {b}, got {bk} (k shape {k.shape})")
    if dk != d:
        raise ValueError(f"cuflash: k and v must have q's headdim {d}, got {dk} (k shape {k.shape})")
    if d > _MAX_HEADDIM or (d < 1 and b * sq * h > 0):
        raise ValueError(f"cuflash: headdim must be in 1..{_MAX_HEADDIM}, got {d}")
    if hk == 0 and h > 0 or (hk > 0 and h % hk != 0):
        raise ValueError(f"cuflash: nheads of q ({h}) must be a multiple of nheads of k and v ({hk}) (MQA/GQA)")
    for name in ("q", "k", "v"):
        _check_last_dim(name, infos[name])
    c.kind, c.device, c.dtype = q.kind, q.device, q.dtype
    c.batch, c.seqlen_q, c.nheads, c.headdim = b, sq, h, d
    c.seqlen_k, c.nheads_k = sk, hk


def _check_alibi(c: _Checked, alibi_slopes, q):
    if alibi_slopes is None:
        return None
    inf = _arrays({"q": q, "alibi_slopes": alibi_slopes})["alibi_slopes"]
    if inf.shape not in ((c.nheads,), (c.batch, c.nheads)):
        raise ValueError(f"cuflash: alibi_slopes must have shape (nheads,) = ({c.nheads},) or (batch, nheads) = "
                         f"({c.batch}, {c.nheads}), got {inf.shape}")
    if inf.dtype != "float32":
        raise TypeError(f"cuflash: alibi_slopes must be float32, got {inf.dtype}")
    if inf.strides is not None and inf.strides != tuple(int(np.prod(inf.shape[i + 1:])) for i in range(len(inf.shape))):
        raise ValueError(f"cuflash: alibi_slopes must be contiguous, got strides {inf.strides}")
    return inf


def _check_out(name, out, c: _Checked, shape, dtype, q):
    if out is None:
        return
    inf = _arrays({"q": q, name: out})[name]
    if inf.kind == "jax":
        raise TypeError(f"cuflash: {name}= cannot be a JAX array (JAX arrays are immutable)")
    if inf.shape != tuple(shape):
        raise ValueError(f"cuflash: {name} must have shape {tuple(shape)}, got {inf.shape}")
    if inf.dtype != dtype:
        raise TypeError(f"cuflash: {name} must have dtype {dtype}, got {inf.dtype}")
    _check_last_dim(name, inf)


def _validate(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p, seed,
              extra_arrays=None) -> _Checked:
    c = _Checked()
    named = {"q": q, "k": k, "v": v}
    named.update(extra_arrays or {})
    infos = _arrays(named)
    _check_qkv(c, infos)
    _options(c, causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
             dropout_p=dropout_p, seed=seed)
    c.alibi_info = _check_alibi(c, alibi_slopes, q)
    return c, infos


# ---- per-signature plan cache (the fast path) -----------------------------------------------------
#
# The first CUDA call of a signature runs the full path above; the second runs it too and records its
# launches (``_launch.Replay``), so a signature that never comes back (a key length that grows at every
# decoding step) costs only its key. Later calls with an equal key replay: allocate the outputs and
# the scratch with the caller's framework, patch the pointers (and the dropout seed) into the recorded
# Params bytes and launch on the caller's current stream: no validation objects, no CuPy views, no
# dispatch. The key holds everything that validation and dispatch read: the array class; per array
# its shape, strides, dtype, device and pointer mod 16 (the sm80 path needs 16-byte aligned rows); the
# option values, each of a plain type (bool, int, float but -0.0, None, a pair of ints) whose
# validation depends on the value alone; and the dispatch function (a monkeypatched
# ``_launch.forward`` records anew). A plan is stored only after its call passed validation, so an
# equal key means an equal validation outcome; an input that would fail has another key (or none:
# other types go the full path) and raises there, before anything runs. Fresh memory must come back
# 16-byte aligned as when recorded, else the call takes the full path. Only torch.Tensor and
# cupy.ndarray (exact classes) take the fast path, so the JAX integration does through its CuPy
# views; NumPy, CPU tensors, empty inputs and paths whose recording cannot be explained do not.
# CUFLASH_NO_FASTPATH=1 at import (or ``_api._FASTPATH = False``) turns it off.

_FASTPATH = os.environ.get("CUFLASH_NO_FASTPATH", "").strip().lower() in ("", "0", "false", "no")
_PLANS_MAX = 256
_plans: dict = {}            # key -> _Plan or _NO_PLAN; insertion order = eviction order (bounded FIFO)
_SEEN_MAX = 1024
_seen: dict = {}             # keys that came once: the second call of a signature records, later ones replay
_NO_PLAN = object()          # a signature whose launches cannot be replayed
_plans_lock = threading.Lock()
_UNSET = object()
_kinds: dict = {}            # array class -> "torch" | "cupy" | None
_SEED_LIMIT = 2**64
_SCRATCH_ALIGN = 256         # scratch buffers of a replay share one allocation, each at a multiple of this
_mods: dict = {}             # lazily imported modules and functions of the fast path


def _classify(cls):
    """'torch' / 'cupy' for the exact array classes the fast path takes, else None (cached per class)."""
    kind = None
    top = getattr(cls, "__module__", "").split(".", 1)[0]
    torch = sys.modules.get("torch")
    cupy = sys.modules.get("cupy")
    if top == "torch" and torch is not None and cls is torch.Tensor:
        kind = "torch"
    elif top == "cupy" and cupy is not None and cls is cupy.ndarray:
        kind = "cupy"
    if len(_kinds) < 64:
        _kinds[cls] = kind
    return kind


def _sig_torch(x):
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15)


def _sig_cupy(x):
    d = x.data
    return (x.shape, x.strides, x.dtype, d.device_id, d.ptr & 15)


_SIGS = {"torch": _sig_torch, "cupy": _sig_cupy}


def _plain_real(x) -> bool:
    """An int or a float that is not -0.0 (equal keys must mean equal values, bit for bit)."""
    c = x.__class__
    return c is int or (c is float and (x != 0.0 or math.copysign(1.0, x) > 0))


def _opts_key(causal, softmax_scale, window_size, softcap, dropout_p):
    """The options' part of a key, or None when one has a type the fast path leaves to validation."""
    if causal.__class__ is not bool:
        return None
    if softmax_scale is not None and not _plain_real(softmax_scale):
        return None
    if not (_plain_real(softcap) and _plain_real(dropout_p)):
        return None
    wc = window_size.__class__
    if wc is not tuple:
        if wc is not list:
            return None
        window_size = tuple(window_size)
    if len(window_size) != 2 or window_size[0].__class__ is not int or window_size[1].__class__ is not int:
        return None
    return (causal, softmax_scale, window_size, softcap, dropout_p)


def _launch_mod():
    m = _mods.get("launch")
    if m is None:
        from . import _launch as m

        _mods["launch"] = m
    return m


def _kind_of_class(cls):
    """The fast path's array kind of a class (cached), or None when it is not for the fast path."""
    kind = _kinds.get(cls, _UNSET)
    return _classify(cls) if kind is _UNSET else kind


def _fwd_key(q, k, v, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p, seed, deterministic,
             return_lse, out, num_splits, lse_out):
    """The plan-cache key of a forward call, or None when the call is not for the fast path."""
    try:
        cls = q.__class__
        kind = _kind_of_class(cls)
        if kind is None or k.__class__ is not cls or v.__class__ is not cls:
            return None
        if deterministic.__class__ is not bool or return_lse.__class__ is not bool \
                or num_splits.__class__ is not int or (seed is not None and seed.__class__ is not int):
            return None
        opts = _opts_key(causal, softmax_scale, window_size, softcap, dropout_p)
        if opts is None or _debug_logging():
            return None
        sig = _SIGS[kind]
        extra = [None if a is None else (sig(a) if a.__class__ is cls else _UNSET)
                 for a in (alibi_slopes, out, lse_out)]
        if _UNSET in extra:
            return None
        return ("fwd", _launch_mod().forward, kind, num_splits, opts, sig(q), sig(k), sig(v), *extra)
    except Exception:  # e.g. a sparse tensor has no strides: the full path says what is wrong
        return None


def _bwd_key(dout, q, k, v, out, lse, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p, seed,
             deterministic, dq, dk, dv):
    """The plan-cache key of a backward call, or None when the call is not for the fast path."""
    try:
        cls = q.__class__
        kind = _kind_of_class(cls)
        if kind is None or deterministic.__class__ is not bool:
            return None
        if seed is None:
            if dropout_p:  # the full path raises: dropout needs the forward's seed
                return None
        elif seed.__class__ is not int:
            return None
        if dout.__class__ is not cls or k.__class__ is not cls or v.__class__ is not cls \
                or out.__class__ is not cls or lse.__class__ is not cls:
            return None
        opts = _opts_key(causal, softmax_scale, window_size, softcap, dropout_p)
        if opts is None or _debug_logging():
            return None
        sig = _SIGS[kind]
        extra = [None if a is None else (sig(a) if a.__class__ is cls else _UNSET) for a in (alibi_slopes, dq, dk, dv)]
        if _UNSET in extra:
            return None
        return ("bwd", _launch_mod().backward, kind, deterministic, opts, sig(dout), sig(q), sig(k), sig(v),
                sig(out), sig(lse), *extra)
    except Exception:
        return None


def _debug_logging() -> bool:
    """The full path logs each launch at DEBUG level: while that is on, every call takes it."""
    return _log_enabled(logging.DEBUG)


_log_enabled = logging.getLogger("cuflash").isEnabledFor


def _first_sighting(key) -> bool:
    """True the first time a key comes (it is noted); False when it came before: record this call."""
    if key in _seen:
        return False
    with _plans_lock:
        while len(_seen) >= _SEEN_MAX:
            try:
                del _seen[next(iter(_seen))]
            except (KeyError, StopIteration, RuntimeError):  # pragma: no cover - a concurrent change
                break
        _seen[key] = None
    return True


def _remember(key, plan) -> None:
    with _plans_lock:
        while len(_plans) >= _PLANS_MAX:
            try:
                del _plans[next(iter(_plans))]
            except (KeyError, StopIteration, RuntimeError):  # pragma: no cover - a concurrent change
                break
        _plans[key] = plan
        _seen.pop(key, None)


def clear_plan_cache() -> None:
    """Forget every recorded plan (each signature takes the full path again twice)."""
    with _plans_lock:
        _plans.clear()
        _seen.clear()


class _Recorder:
    """Set on a Run of a cacheable call: collects its launches and its scratch allocations."""

    def __init__(self, run):
        self.scratch = []                 # (pointer, nbytes)
        self._empty = run.empty
        run.record = self.launches = []
        run.empty = self.empty

    def empty(self, shape, dtype):
        a = self._empty(shape, dtype)
        self.scratch.append((int(a.data.ptr) if a.size else 0, int(a.nbytes)))
        return a


def _layout(sizes):
    """Offsets of buffers of the given byte sizes in one allocation (each aligned) and its total size."""
    offs, total = [], 0
    for n in sizes:
        offs.append(total)
        total += -(-int(n) // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    return offs, total


class _Plan:
    """What a replay needs: the recorded launches and how to allocate outputs and scratch."""

    __slots__ = ("replay", "kind", "device_id", "tdevice", "shapes", "dtype", "lse_shape", "layouts")

    def __init__(self, replay, kind, device_id, tdevice, shapes, dtype, lse_shape, scratch_sizes):
        self.replay = replay
        self.kind = kind
        self.device_id = device_id
        self.tdevice = tdevice          # torch.device of the inputs (torch only)
        self.shapes = shapes            # output shapes: (o,) forward, (dq, dk, dv) backward
        self.dtype = dtype              # their dtype (torch.dtype or NumPy dtype)
        self.lse_shape = lse_shape      # forward only
        sizes = list(scratch_sizes)
        lse_bytes = 4 * math.prod(lse_shape) if lse_shape is not None else 0
        # [False]: scratch only; [True]: the LSE (not returned) first, then the scratch
        self.layouts = (_layout(sizes), _layout([lse_bytes] + sizes))


def _build_plan(key, rec, sources, kind, c, like, shapes, lse_shape, fresh):
    """Store the plan of a recorded call if it can be replayed exactly (``fresh``: pointers of memory
    this call allocated, which replays must get equally aligned)."""
    if any(p % 16 for p in fresh) or any(p % 16 for p, _ in rec.scratch):
        return  # unusual allocator alignment: try again next time
    replay = _launch_mod().Replay.build(rec.launches, sources, rec.scratch)
    if replay is None:  # this signature's path cannot be replayed: never record it again
        _remember(key, _NO_PLAN)
        return
    tdevice = like.device if kind == "torch" else None
    plan = _Plan(replay, kind, c.device[1], tdevice, shapes, like.dtype, lse_shape, [n for _, n in rec.scratch])
    _remember(key, plan)


def _fast_env():
    """(torch module or None, cupy module, get current device, raw torch stream getter)."""
    env = _mods.get("env")
    # Rebuilt when torch was imported after the first cached call (a CuPy-only start): a torch
    # replay must not see the torch-less environment.
    if env is None or (env[0] is None and env is _mods.get("env_built") and "torch" in sys.modules):
        cupy = _interop._cupy()
        torch = sys.modules.get("torch")
        raw = None
        if torch is not None:
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            if raw is None:  # pragma: no cover - older torch
                def raw(d, _t=torch):
                    return _t.cuda.current_stream(d).cuda_stream
        env = _mods["env"] = _mods["env_built"] = (torch, cupy, cupy.cuda.runtime.getDevice, raw)
    return env


_stream_handles: dict = {}


def _torch_stream(raw, device_id):
    p = raw(device_id)
    h = _stream_handles.get(p)
    if h is None:
        if len(_stream_handles) > 1024:
            _stream_handles.clear()
        h = _stream_handles[p] = _interop._StreamHandle(p)
    return h


def _fwd_replay(plan, q, k, v, alibi, out, lse_out, dropout_p, seed, return_lse):
    """A cached forward: the result, or None when this call must take the full path after all."""
    if seed is None:
        seed = secrets.randbits(63) if dropout_p > 0 else 0
    elif not 0 <= seed < _SEED_LIMIT:
        return None
    torch, cupy, get_device, raw = _fast_env()
    dev = plan.device_id
    lse_hidden = lse_out is None and not return_lse     # the LSE is written but not returned: scratch
    offs, total = plan.layouts[lse_hidden]
    if get_device() != dev:
        with cupy.cuda.Device(dev):
            return _fwd_replay_on(plan, q, k, v, alibi, out, lse_out, seed, return_lse, lse_hidden, offs, total,
                                  torch, cupy, raw, dev)
    return _fwd_replay_on(plan, q, k, v, alibi, out, lse_out, seed, return_lse, lse_hidden, offs, total,
                          torch, cupy, raw, dev)


def _fwd_replay_on(plan, q, k, v, alibi, out, lse_out, seed, return_lse, lse_hidden, offs, total, torch, cupy,
                   raw, dev):
    fresh = 0
    if plan.kind == "torch":
        tdev = plan.tdevice
        if out is None:
            out = torch.empty(plan.shapes[0], dtype=plan.dtype, device=tdev)
            fresh = out.data_ptr()
        lse = lse_out
        if lse is None and not lse_hidden:
            lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=tdev)
            fresh |= lse.data_ptr()
        scratch = torch.empty((total,), dtype=torch.uint8, device=tdev) if total else None
        base = scratch.data_ptr() if total else 0
        ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                base + offs[0] if lse is None else lse.data_ptr(), 0 if alibi is None else alibi.data_ptr(),
                0, 0, 0, 0]
        stream = _torch_stream(raw, dev)
    else:
        if out is None:
            out = cupy.empty(plan.shapes[0], plan.dtype)
            fresh = out.data.ptr
        lse = lse_out
        if lse is None and not lse_hidden:
            lse = cupy.empty(plan.lse_shape, np.float32)
            fresh |= lse.data.ptr
        scratch = cupy.empty((total,), np.uint8) if total else None
        base = scratch.data.ptr if total else 0
        ptrs = [q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr,
                base + offs[0] if lse is None else lse.data.ptr, 0 if alibi is None else alibi.data.ptr,
                0, 0, 0, 0]
        stream = cupy.cuda.get_current_stream(dev)
    if (fresh | base) & 15:
        return None
    for off in offs[1:] if lse_hidden else offs:
        ptrs.append(base + off)
    plan.replay.launch_all(ptrs, seed, stream)
    del scratch  # freed after the launches were enqueued, as in the full path (stream-ordered reuse)
    if return_lse:
        return out, lse
    return out


def _bwd_replay(plan, dout, q, k, v, out, lse, alibi, dq, dk, dv, seed):
    """A cached backward: (dq, dk, dv), or None when this call must take the full path after all."""
    if seed is None:
        seed = 0
    elif not 0 <= seed < _SEED_LIMIT:
        return None
    torch, cupy, get_device, raw = _fast_env()
    dev = plan.device_id
    if get_device() != dev:
        with cupy.cuda.Device(dev):
            return _bwd_replay_on(plan, dout, q, k, v, out, lse, alibi, dq, dk, dv, seed, torch, cupy, raw, dev)
    return _bwd_replay_on(plan, dout, q, k, v, out, lse, alibi, dq, dk, dv, seed, torch, cupy, raw, dev)


def _bwd_replay_on(plan, dout, q, k, v, out, lse, alibi, dq, dk, dv, seed, torch, cupy, raw, dev):
    offs, total = plan.layouts[False]
    grads = [dq, dk, dv]
    fresh = 0
    if plan.kind == "torch":
        tdev = plan.tdevice
        for i in range(3):
            if grads[i] is None:
                g = grads[i] = torch.empty(plan.shapes[i], dtype=plan.dtype, device=tdev)
                fresh |= g.data_ptr()
        scratch = torch.empty((total,), dtype=torch.uint8, device=tdev) if total else None
        base = scratch.data_ptr() if total else 0
        ptrs = [x.data_ptr() for x in (q, k, v, out, lse)]
        ptrs += [0 if alibi is None else alibi.data_ptr(), dout.data_ptr()]
        ptrs += [g.data_ptr() for g in grads]
        stream = _torch_stream(raw, dev)
    else:
        for i in range(3):
            if grads[i] is None:
                g = grads[i] = cupy.empty(plan.shapes[i], plan.dtype)
                fresh |= g.data.ptr
        scratch = cupy.empty((total,), np.uint8) if total else None
        base = scratch.data.ptr if total else 0
        ptrs = [x.data.ptr for x in (q, k, v, out, lse)]
        ptrs += [0 if alibi is None else alibi.data.ptr, dout.data.ptr]
        ptrs += [g.data.ptr for g in grads]
        stream = cupy.cuda.get_current_stream(dev)
    if (fresh | base) & 15:
        return None
    for off in offs:
        ptrs.append(base + off)
    plan.replay.launch_all(ptrs, seed, stream)
    del scratch
    return tuple(grads)


# ---- attention ---------------------------------------------------------------------------------

def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
              softcap=0.0, dropout_p=0.0, seed=None, deterministic=False, return_lse=False, out=None,
              num_splits=0):
    """Exact attention ``softmax(q kᵀ · scale) v``, FlashAttention-style, on the inputs' own device.

    Parameters
    ----------
    q : array, shape (batch, seqlen_q, nheads, headdim)
        CuPy, PyTorch or JAX array on a CUDA device (runs on the GPU, the caller's current stream),
        or a NumPy / CPU PyTorch array (computed by the float64 reference on the CPU).
        float16 or bfloat16 (fast paths) or float32. Any strides with the last dimension contiguous.
    k, v : array, shape (batch, seqlen_k, nheads_k, headdim)
        ``nheads % nheads_k == 0`` (MQA/GQA: query head ``h`` uses key/value head
        ``h // (nheads // nheads_k)``).
    causal : bool
        Causal mask aligned to the bottom-right corner: query ``i`` sees key ``j`` iff
        ``j <= i + seqlen_k - seqlen_q``. For seqlen_q = 2, seqlen_k = 5 (1 = kept)::

            1 1 1 1 0
            1 1 1 1 1

        and for seqlen_q = 5, seqlen_k = 2 the first three rows see no key (output 0, lse -inf)::

            0 0
            0 0
            0 0
            1 0
            1 1
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(headdim)``.
    window_size : (int, int)
        Sliding window (left, right), -1 = unbounded: query ``i`` sees keys
        ``i + sk - sq - left <= j <= i + sk - sq + right``.
    alibi_slopes : array of float32, shape (nheads,) or (batch, nheads), optional
        Adds ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores.
    softcap : float
        If > 0, scores become ``softcap * tanh(scores / softcap)`` (before ALiBi).
    dropout_p : float
        Dropout probability in [0, 1); kept weights are scaled by ``1 / (1 - dropout_p)``.
    seed : int, optional
        Seed of the dropout mask (a pure function of seed, batch, head, i, j). None draws one.
    deterministic : bool
        Forward is always deterministic; accepted for symmetry with the backward.
    return_lse : bool
        Also return the log-sum-exp of each row, float32, shape (batch, nheads, seqlen_q).
    out : array, optional
        Where to write the output: q's shape and dtype, same framework and device.
    num_splits : int
        Split-KV factor (0 = choose automatically).

    Returns
    -------
    out : array, shape (batch, seqlen_q, nheads, headdim)
        In q's array type, dtype and device. With ``return_lse=True``, ``(out, lse)``.

    Notes
    -----
    Host overhead: from the third call with the same signature (CUDA torch tensors or CuPy arrays of
    the same shapes, strides, dtypes, device, 16-byte alignment and options), the launches recorded on
    the second call are replayed with the new pointers, skipping dispatch (same results, same errors).
    ``CUFLASH_NO_FASTPATH=1`` in the environment turns this off.
    """
    if out is None and _torch_autograd_wanted(q, k, v):
        from . import torch as _torch

        _check_bool("return_lse", return_lse)
        return _torch.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed,
                                deterministic=deterministic, return_lse=return_lse)
    return _attention_impl(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                           alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed,
                           deterministic=deterministic, return_lse=return_lse, out=out, num_splits=num_splits)


def _torch_autograd_wanted(*xs) -> bool:
    """Torch tensors that need a gradient, or any torch tensor while torch.compile traces."""
    if type(xs[0]).__module__.split(".", 1)[0] != "torch":
        return False
    import sys

    torch = sys.modules["torch"]
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in xs)


def _try_replay(key, replay):
    """Fast-path lookup shared by forward and backward: ``(result, key)``.

    ``result`` is not None when a recorded plan replayed. ``key`` comes back only when this call should
    take the full path and record a plan (a signature's second sighting); otherwise None.
    """
    if key is None:
        return None, None
    plan = _plans.get(key)
    if plan is None:
        return None, (None if _first_sighting(key) else key)
    if plan is _NO_PLAN:
        return None, None
    return replay(plan), None


def _attention_impl(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p, seed,
                    deterministic, return_lse, out, num_splits, lse_out=None):
    """``attention`` without the autograd routing; ``lse_out`` (internal) receives the LSE in place."""
    key = None
    if _FASTPATH:
        key = _fwd_key(q, k, v, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p, seed,
                       deterministic, return_lse, out, num_splits, lse_out)
        res, key = _try_replay(key, lambda plan: _fwd_replay(plan, q, k, v, alibi_slopes, out, lse_out, dropout_p,
                                                             seed, return_lse))
        if res is not None:
            return res
    c, infos = _validate(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                         alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed)
    _check_bool("deterministic", deterministic)
    _check_bool("return_lse", return_lse)
    if isinstance(num_splits, (bool, np.bool_)) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"cuflash: num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    _check_out("out", out, c, (c.batch, c.seqlen_q, c.nheads, c.headdim), c.dtype, q)

    if not infos["q"].is_cuda:
        return _attention_cpu(c, q, k, v, alibi_slopes, out, return_lse)
    return _attention_cuda(c, q, k, v, alibi_slopes, out, return_lse, int(num_splits), lse_out, key)


def _dropout_mask(c: _Checked):
    if c.dropout_p == 0:
        return None
    return reference.dropout_mask(c.seed, c.batch, c.nheads, c.seqlen_q, c.seqlen_k, c.dropout_p)


def _attention_cpu(c, q, k, v, alibi_slopes, out, return_lse):
    kind = c.kind
    qn, kn, vn = (_interop.to_numpy(x, kind) for x in (q, k, v))
    slopes = None if alibi_slopes is None else np.asarray(_interop.to_numpy(alibi_slopes, kind), np.float64)
    o, lse = reference.attention(qn, kn, vn, causal=False, softmax_scale=c.scale, window_size=c.window,
                                 alibi_slopes=slopes, softcap=c.softcap, dropout_p=c.dropout_p,
                                 dropout_mask=_dropout_mask(c), return_lse=True)
    res = _interop.from_numpy(o, kind, q, c.dtype)
    if out is not None:
        _copy_into(out, res, kind)
        res = out
    if return_lse:
        return res, _interop.from_numpy(lse, kind, q, "float32")
    return res


def _copy_into(out, res, kind):
    if kind == "torch":
        out.copy_(res)
    else:
        out[...] = res


class _Device:
    """Context of one CUDA call: device, stream, allocator, CuPy views."""

    def __init__(self, c: _Checked, like):
        import cupy

        self.cupy = cupy
        self.kind = c.kind
        self.device_id = c.device[1]
        self.dev = cupy.cuda.Device(self.device_id)
        self.stream = _interop.current_stream(c.kind, self.device_id)
        self.alloc = _interop.Allocator(c.kind, like, self.device_id)

    def __enter__(self):
        self.dev.__enter__()
        self.stream.__enter__()
        return self

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.dev.__exit__(*exc)

    def view(self, x):
        return None if x is None else _interop.as_cupy(x, self.kind)

    def out(self, shape, dtype, given=None):
        """(native, view) of an output: the caller's ``out=`` if given, else a fresh allocation."""
        if given is not None:
            return given, self.view(given)
        return self.alloc.empty(shape, dtype)

    def back(self, native):
        return _interop.to_caller(native, self.kind, self.stream)


def _run(c: _Checked, ctx: _Device, qv, kv, vv, alibi_v, **kw):
    from . import _compile, _launch

    return _launch.Run(device_id=ctx.device_id, arch=_compile.device_arch(ctx.device_id), stream=ctx.stream,
                       dtype=c.dtype, q=qv, k=kv, v=vv, alibi=alibi_v, causal=c.causal,
                       softmax_scale=c.scale, window=c.window, softcap=c.softcap, dropout_p=c.dropout_p,
                       seed=c.seed, empty=ctx.alloc.scratch, **kw)


def _attention_cuda(c, q, k, v, alibi_slopes, out, return_lse, num_splits, lse_out=None, fast_key=None):
    """``fast_key``: the call's plan-cache key (None: not cacheable); its launches are recorded."""
    from . import _launch

    with _Device(c, q) as ctx:
        o_shape, lse_shape = (c.batch, c.seqlen_q, c.nheads, c.headdim), (c.batch, c.nheads, c.seqlen_q)
        o_native, o = ctx.out(o_shape, c.dtype, out)
        if lse_out is not None:
            lse_native, lse = lse_out, ctx.view(lse_out)
        else:
            lse_native, lse = ctx.alloc.empty(lse_shape, "float32")
        if o.size == 0 or lse.size == 0:
            if lse.size:
                lse.fill(-np.inf)  # no key at all: every row is fully masked
            if o.size:
                o.fill(0)
        else:
            qv, kv, vv, av = ctx.view(q), ctx.view(k), ctx.view(v), ctx.view(alibi_slopes)
            run = _run(c, ctx, qv, kv, vv, av, out=o, lse=lse, num_splits=num_splits)
            rec = _Recorder(run) if fast_key is not None else None
            _launch.forward(run)
            if rec is not None:
                from ._launch import ptr

                sources = {"q": ptr(qv), "k": ptr(kv), "v": ptr(vv), "alibi": ptr(av), "out": ptr(o),
                           "lse": ptr(lse)}
                fresh = ([ptr(o)] if out is None else []) + ([ptr(lse)] if lse_out is None else [])
                _build_plan(fast_key, rec, sources, c.kind, c, q, (o_shape,), lse_shape, fresh)
        res = ctx.back(o_native) if out is None else out
        if return_lse:
            return res, ctx.back(lse_native)
        return res


# ---- backward ---------------------------------------------------------------------------------

def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                       alibi_slopes=None, softcap=0.0, dropout_p=0.0, seed=None, deterministic=False,
                       dq=None, dk=None, dv=None):
    """Gradients of :func:`attention`: ``(dq, dk, dv)`` for the upstream gradient ``dout``.

    Parameters
    ----------
    dout, out : array, shape (batch, seqlen_q, nheads, headdim)
        Upstream gradient and the forward's output (q's dtype).
    q, k, v : arrays as in :func:`attention`.
    lse : array of float32, shape (batch, nheads, seqlen_q)
        The forward's log-sum-exp (``attention(..., return_lse=True)``).
    dq, dk, dv : arrays, optional
        Where to write the gradients (shapes and dtypes of q, k, v).
    Other options must be those of the forward call (with dropout: the same ``seed``).

    Returns
    -------
    (dq, dk, dv) in the inputs' array type.
    """
    key = None
    if _FASTPATH:
        key = _bwd_key(dout, q, k, v, out, lse, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p,
                       seed, deterministic, dq, dk, dv)
        res, key = _try_replay(key, lambda plan: _bwd_replay(plan, dout, q, k, v, out, lse, alibi_slopes, dq, dk, dv,
                                                             seed))
        if res is not None:
            return res
    if dropout_p and seed is None:
        raise ValueError("cuflash: attention_backward with dropout_p > 0 needs the forward's seed (got None)")
    c, infos = _validate(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                         alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed,
                         extra_arrays={"dout": dout, "out": out, "lse": lse})
    _check_bool("deterministic", deterministic)
    qshape = (c.batch, c.seqlen_q, c.nheads, c.headdim)
    for name in ("dout", "out"):
        inf = infos[name]
        if inf.shape != qshape:
            raise ValueError(f"cuflash: {name} must have q's shape {qshape}, got {inf.shape}")
        if inf.dtype != c.dtype:
            raise TypeError(f"cuflash: {name} must have q's dtype {c.dtype}, got {inf.dtype}")
        _check_last_dim(name, inf)
    linf = infos["lse"]
    if linf.shape != (c.batch, c.nheads, c.seqlen_q):
        raise ValueError(f"cuflash: lse must have shape (batch, nheads, seqlen_q) = "
                         f"{(c.batch, c.nheads, c.seqlen_q)}, got {linf.shape}")
    if linf.dtype != "float32" and not (not linf.is_cuda and linf.dtype == "float64"):
        raise TypeError(f"cuflash: lse must be float32, got {linf.dtype}")
    if linf.strides is not None and 0 not in linf.shape and \
            linf.strides != (c.nheads * c.seqlen_q, c.seqlen_q, 1):
        raise ValueError(f"cuflash: lse must be contiguous (as attention(..., return_lse=True) returns it), "
                         f"got strides {linf.strides}")
    kshape = (c.batch, c.seqlen_k, c.nheads_k, c.headdim)
    _check_out("dq", dq, c, qshape, c.dtype, q)
    _check_out("dk", dk, c, kshape, c.dtype, q)
    _check_out("dv", dv, c, kshape, c.dtype, q)

    if not infos["q"].is_cuda:
        return _backward_cpu(c, dout, q, k, v, out, lse, alibi_slopes, dq, dk, dv)
    return _backward_cuda(c, dout, q, k, v, out, lse, alibi_slopes, bool(deterministic), dq, dk, dv, key)


def _backward_cpu(c, dout, q, k, v, out, lse, alibi_slopes, dq, dk, dv):
    kind = c.kind
    arrs = [_interop.to_numpy(x, kind) for x in (dout, q, k, v, out, lse)]
    slopes = None if alibi_slopes is None else np.asarray(_interop.to_numpy(alibi_slopes, kind), np.float64)
    grads = reference.attention_backward(*arrs, causal=False, softmax_scale=c.scale, window_size=c.window,
                                         alibi_slopes=slopes, softcap=c.softcap, dropout_p=c.dropout_p,
                                         dropout_mask=_dropout_mask(c))
    res = []
    for g, given in zip(grads, (dq, dk, dv)):
        r = _interop.from_numpy(g, kind, q, c.dtype)
        if given is not None:
            _copy_into(given, r, kind)
            r = given
        res.append(r)
    return tuple(res)


def _backward_cuda(c, dout, q, k, v, out, lse, alibi_slopes, deterministic, dq, dk, dv, fast_key=None):
    """``fast_key``: the call's plan-cache key (None: not cacheable); its launches are recorded."""
    from . import _launch

    with _Device(c, q) as ctx:
        qshape = (c.batch, c.seqlen_q, c.nheads, c.headdim)
        kshape = (c.batch, c.seqlen_k, c.nheads_k, c.headdim)
        dq_n, dq_v = ctx.out(qshape, c.dtype, dq)
        dk_n, dk_v = ctx.out(kshape, c.dtype, dk)
        dv_n, dv_v = ctx.out(kshape, c.dtype, dv)
        if dq_v.size + dk_v.size == 0:
            pass
        elif c.seqlen_q == 0 or c.seqlen_k == 0 or c.nheads == 0:
            for g in (dq_v, dk_v, dv_v):
                if g.size:
                    g.fill(0)
        else:
            views = {"q": ctx.view(q), "k": ctx.view(k), "v": ctx.view(v), "alibi": ctx.view(alibi_slopes),
                     "out": ctx.view(out), "lse": ctx.view(lse), "dout": ctx.view(dout)}
            run = _run(c, ctx, views["q"], views["k"], views["v"], views["alibi"], out=views["out"],
                       lse=views["lse"], dout=views["dout"], dq=dq_v, dk=dk_v, dv=dv_v, deterministic=deterministic)
            rec = _Recorder(run) if fast_key is not None else None
            _launch.backward(run)
            if rec is not None:
                from ._launch import ptr

                sources = {name: ptr(a) for name, a in views.items()}
                sources.update(dq=ptr(dq_v), dk=ptr(dk_v), dv=ptr(dv_v))
                fresh = [ptr(g) for g, given in ((dq_v, dq), (dk_v, dk), (dv_v, dv)) if given is None]
                _build_plan(fast_key, rec, sources, c.kind, c, q, (qshape, kshape, kshape), None, fresh)
        return tuple(ctx.back(n) if given is None else given for n, given in ((dq_n, dq), (dk_n, dk), (dv_n, dv)))


# ---- flash_attn drop-in ------------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for ``flash_attn.flash_attn_func`` (same positional order and keywords).

    Differentiable for PyTorch tensors that require grad. With ``return_attn_probs=True`` returns
    ``(out, softmax_lse, S_dmask)`` like flash-attn, for debugging small shapes:

    * ``S_dmask``: shape ``(batch, nheads, seqlen_q, seqlen_k)``, the attention probabilities
      ``P = exp(s - softmax_lse)`` (the undropped softmax; 0 where masked) with the sign bit set where
      dropout dropped the entry (negative, or ``-0.0`` where P is 0): ``~signbit(S_dmask)`` is the
      forward's keep mask, ``abs(S_dmask)`` the probabilities. In q's array type, dtype and device.
    * It is recomputed on the host, in float64 NumPy, from q, k, v and the returned ``softmax_lse``, with
      the forward's own dropout mask (the seed is drawn here and handed to the forward). Cost: copies of
      q, k, v to the host and O(batch * nheads * seqlen_q * seqlen_k) host memory and time (plus the
      scores' O(... * headdim)); never use it at training sizes. Not differentiable.
    """
    if q.__class__.__module__.split(".")[0] == "torch":
        from . import torch as _torch

        return _torch.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                      deterministic=deterministic, return_attn_probs=return_attn_probs)
    seed = secrets.randbits(63) if return_attn_probs else None  # S_dmask needs the forward's seed
    res = attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                    alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed,
                    deterministic=deterministic, return_lse=return_attn_probs)
    if return_attn_probs:
        o, lse = res
        return o, lse, _attn_probs(q, k, v, lse, causal=causal, softmax_scale=softmax_scale,
                                   window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
                                   dropout_p=dropout_p, seed=seed)
    return res


def _attn_probs(q, k, v, lse, *, causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p, seed):
    """``S_dmask`` of ``flash_attn_func(..., return_attn_probs=True)`` (see there), on the host in float64.

    ``lse`` is the forward's; ``seed`` the one the forward used. Returns q's array type, dtype and device.
    """
    c, infos = _validate(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                         alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed)
    kind, cuda = c.kind, infos["q"].is_cuda

    def host(x):
        if not cuda:
            return np.asarray(_interop.to_numpy(x, kind))
        if kind == "torch":
            return _interop.to_numpy(x.detach().cpu(), "torch")
        if kind == "jax":
            return np.asarray(x)
        a = _interop.as_cupy(x, kind)  # CuPy's current stream: after the forward that wrote lse
        return a.astype("float32").get() if a.dtype == _interop.BFLOAT16 else a.get()

    qn, kn, vn, lse_n = (host(x) for x in (q, k, v, lse))
    slopes = None if alibi_slopes is None else np.asarray(host(alibi_slopes), np.float64)
    prep = reference._prepare(qn, kn, vn, False, c.scale, c.window, slopes, c.softcap, 0.0, None)
    s, _, _ = reference._scores(prep, 0, prep.Sq, 0, prep.Sk)  # (B, Hk, G, Sq, Sk); -inf where masked
    lse64 = np.asarray(lse_n, np.float64).reshape(prep.B, prep.Hk, prep.G, prep.Sq, 1)
    empty = np.isneginf(lse64)                                  # rows with no key: P = 0
    probs = np.where(empty, 0.0, np.exp(s - np.where(empty, 0.0, lse64)))
    probs = probs.reshape(c.batch, c.nheads, c.seqlen_q, c.seqlen_k)
    if c.dropout_p > 0:
        keep = np.asarray(reference.dropout_mask(c.seed, c.batch, c.nheads, c.seqlen_q, c.seqlen_k, c.dropout_p))
        probs = np.where(keep, probs, -probs)                   # sign bit = dropped (also on zeros: -0.0)
    if not cuda:
        return _interop.from_numpy(probs, kind, q, c.dtype)
    a = np.ascontiguousarray(probs.astype(_interop.BFLOAT16 if c.dtype == "bfloat16" else np.dtype(c.dtype)))
    if kind == "torch":
        import torch

        t = torch.from_numpy(a.astype(np.float32) if c.dtype == "bfloat16" else a)
        return t.to(device=q.device, dtype=q.dtype)
    if kind == "jax":
        import jax

        return jax.device_put(a, next(iter(q.devices())))
    cupy = _interop._cupy()
    with cupy.cuda.Device(c.device[1]):
        return cupy.asarray(a)


# ---- merging partial results ----------------------------------------------------------------------

def merge_attention(outs, lses, *, out=None, return_lse=True):
    """Merge attention computed over disjoint key sets (split-KV, cascade, ring attention).

    Parameters
    ----------
    outs : sequence of arrays, each (batch, seqlen_q, nheads, headdim)
        Outputs of :func:`attention` over key sets K_1, ..., K_n (one framework, one device).
    lses : sequence of float32 arrays, each (batch, nheads, seqlen_q)
        Their log-sum-exps (``return_lse=True``); ``-inf`` where a part saw no key.
    out : array, optional
        Where to write the merged output (shape and dtype of ``outs[0]``).

    Returns
    -------
    out, or (out, lse) with ``return_lse=True``: attention over the union of the key sets,
    ``out = sum_i exp(lse_i - lse) * out_i`` and ``lse = log(sum_i exp(lse_i))``; rows no part saw
    get 0 and ``-inf``.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"cuflash: merge_attention needs as many lses as outs (at least one), got "
                         f"{len(outs)} outs and {len(lses)} lses")
    named = {f"outs[{i}]": o for i, o in enumerate(outs)}
    named.update({f"lses[{i}]": l for i, l in enumerate(lses)})
    infos = _arrays(named)
    o0 = infos["outs[0]"]
    if len(o0.shape) != 4:
        raise ValueError(f"cuflash: outs[0] must be 4-D (batch, seqlen_q, nheads, headdim), got shape {o0.shape}")
    b, sq, h, d = o0.shape
    for i in range(len(outs)):
        oi, li = infos[f"outs[{i}]"], infos[f"lses[{i}]"]
        if oi.shape != o0.shape or oi.dtype != o0.dtype:
            raise ValueError(f"cuflash: outs[{i}] must match outs[0] ({o0.shape}, {o0.dtype}), got {oi.shape}, {oi.dtype}")
        if li.shape != (b, h, sq):
            raise ValueError(f"cuflash: lses[{i}] must have shape (batch, nheads, seqlen_q) = {(b, h, sq)}, "
                             f"got {li.shape}")
    c = _Checked()
    c.kind, c.device, c.dtype = o0.kind, o0.device, o0.dtype
    if out is not None:
        oinf = _arrays({"outs[0]": outs[0], "out": out})["out"]
        if oinf.shape != o0.shape or oinf.dtype != o0.dtype:
            raise ValueError(f"cuflash: out must have shape {o0.shape} and dtype {o0.dtype}, got {oinf.shape}, "
                             f"{oinf.dtype}")
    if not o0.is_cuda:
        kind = o0.kind
        os_ = np.stack([np.asarray(_interop.to_numpy(o, kind), np.float64) for o in outs])
        ls = np.stack([np.asarray(_interop.to_numpy(l, kind), np.float64) for l in lses])
        m = ls.max(0)
        safe = np.where(np.isfinite(m), m, 0.0)
        w = np.exp(ls - safe)                                  # (n, b, h, sq)
        tot = w.sum(0)
        lse = np.where(tot > 0, safe + np.log(np.where(tot > 0, tot, 1)), -np.inf)
        wn = np.where(tot > 0, w / np.where(tot > 0, tot, 1), 0).transpose(0, 1, 3, 2)[..., None]
        res = _interop.from_numpy((wn * os_).sum(0), kind, outs[0], c.dtype)
        if out is not None:
            _copy_into(out, res, kind)
            res = out
        return (res, _interop.from_numpy(lse, kind, outs[0], "float32")) if return_lse else res
    from . import _launch_sm80

    with _Device(c, outs[0]) as ctx:
        o_native, o = ctx.out(o0.shape, c.dtype, out)
        lse_native, lse = ctx.alloc.empty((b, h, sq), "float32")
        ctx.empty = ctx.alloc.scratch
        _launch_sm80.merge_partials(ctx, [ctx.view(x) for x in outs], [ctx.view(x) for x in lses], o, lse)
        res = ctx.back(o_native) if out is None else out
        return (res, ctx.back(lse_native)) if return_lse else res
