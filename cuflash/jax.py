"""JAX integration: ``cuflash.jax.attention``, differentiable, usable under ``jax.jit`` and ``jax.grad``.

The kernels run inside ``jax.experimental.buffer_callback``: XLA hands over its output buffers and its
GPU stream, the callback views every buffer as a CuPy array (``__cuda_array_interface__``, no copy)
and launches on that stream, so nothing is copied and nothing synchronises. ``jax.custom_vjp`` pairs
the forward (which also returns the LSE) with the backward kernels.

Importing this module imports JAX (``import cuflash`` alone does not).
"""

from __future__ import annotations

import functools
import math
import secrets

import jax
import jax.numpy as jnp
from jax.experimental.buffer_callback import buffer_callback

from . import _api

__all__ = ["attention"]


def _cupy_stream(ctx, device_id):
    from ._interop import external_stream

    return external_stream(int(ctx.stream), device_id)


def _device_of(buf) -> int:
    import cupy

    ptr = buf.__cuda_array_interface__["data"][0]
    return cupy.cuda.runtime.pointerGetAttributes(ptr).device if ptr else cupy.cuda.runtime.getDevice()


def _views(bufs):
    """CuPy views of XLA buffers (no copy). __cuda_array_interface__ has no bfloat16 type string, so a
    2-byte void buffer is a bfloat16 one (the only such dtype cuflash takes)."""
    import cupy

    from ._interop import BFLOAT16

    out = []
    for b in bufs:
        a = None if b is None else cupy.asarray(b)
        if a is not None and a.dtype.kind == "V" and a.dtype.itemsize == 2:
            a = a.view(BFLOAT16)
        out.append(a)
    return out


def _forward_cb(opts, has_alibi):
    def cb(ctx, outs, q, k, v, *alibi):
        import cupy

        out, lse = outs
        dev = _device_of(q)
        with cupy.cuda.Device(dev), _cupy_stream(ctx, dev):
            qv, kv, vv, ov, lv = _views((q, k, v, out, lse))
            av = _views(alibi)[0] if has_alibi else None
            _api._attention_impl(qv, kv, vv, alibi_slopes=av, return_lse=False, out=ov, lse_out=lv,
                                 num_splits=0, deterministic=False, **opts)
    return cb


def _backward_cb(opts, has_alibi, deterministic):
    def cb(ctx, outs, dout, q, k, v, out, lse, *alibi):
        import cupy

        dq, dk, dv = outs
        dev = _device_of(q)
        with cupy.cuda.Device(dev), _cupy_stream(ctx, dev):
            vs = _views((dout, q, k, v, out, lse, dq, dk, dv))
            av = _views(alibi)[0] if has_alibi else None
            _api.attention_backward(*vs[:6], alibi_slopes=av, deterministic=deterministic, dq=vs[6], dk=vs[7],
                                    dv=vs[8], **opts)
    return cb


def _fwd_call(q, k, v, alibi, opts):
    b, sq, h, _ = q.shape
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq), jnp.float32))
    f = buffer_callback(_forward_cb(dict(opts), alibi is not None), shapes)
    args = (q, k, v) + ((alibi,) if alibi is not None else ())
    return f(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, alibi, opts, deterministic):
    return _fwd_call(q, k, v, alibi, opts)[0]


def _attention_fwd(q, k, v, alibi, opts, deterministic):
    out, lse = _fwd_call(q, k, v, alibi, opts)
    return out, (q, k, v, alibi, out, lse)


def _attention_bwd(opts, deterministic, res, dout):
    q, k, v, alibi, out, lse = res
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
              jax.ShapeDtypeStruct(v.shape, v.dtype))
    f = buffer_callback(_backward_cb(dict(opts), alibi is not None, deterministic), shapes)
    args = (dout.astype(q.dtype), q, k, v, out, lse) + ((alibi,) if alibi is not None else ())
    dq, dk, dv = f(*args)
    return dq, dk, dv, (None if alibi is None else jnp.zeros_like(alibi))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
              dropout_p=0.0, seed=None, deterministic=False, return_lse=False):
    """:func:`cuflash.attention` for JAX arrays on a GPU: differentiable, works under ``jax.jit``.

    Same arguments and semantics as :func:`cuflash.attention`. Under ``jit`` the options are static;
    with dropout and ``seed=None`` a seed is drawn when the function is traced, so pass ``seed``
    explicitly to vary it between steps. ALiBi slopes get no gradient.
    """
    d = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else (1.0 / math.sqrt(d) if d > 0 else 1.0)
    if dropout_p and seed is None:
        seed = secrets.randbits(63)
    opts = (("causal", bool(causal)), ("softmax_scale", scale), ("window_size", tuple(int(w) for w in window_size)),
            ("softcap", float(softcap)), ("dropout_p", float(dropout_p)), ("seed", int(seed or 0)))
    if return_lse:
        return _fwd_call(q, k, v, alibi_slopes, opts)
    return _attention(q, k, v, alibi_slopes, opts, bool(deterministic))
