"""PyTorch integration: autograd and ``torch.compile`` through ``torch.library.custom_op``.

``cuflash.torch.attention`` (and ``cuflash.attention`` / ``flash_attn_func`` on tensors that need a
gradient, or while ``torch.compile`` traces) calls two registered operators:

* ``cuflash::fwd(q, k, v, alibi, ...) -> (out, lse)``
* ``cuflash::bwd(dout, q, k, v, out, lse, alibi, ...) -> (dq, dk, dv)``

each with a fake (meta) implementation giving shapes and dtypes, so ``torch.compile(fullgraph=True)``
sees them as single graph nodes with no break. Autograd saves q, k, v, out, lse (and the dropout
seed) and recomputes everything else in the backward. CPU tensors run the float64-capable NumPy
reference, so ``torch.autograd.gradcheck`` works on float64 CPU inputs.

Importing this module imports torch (``import cuflash`` alone does not).
"""

from __future__ import annotations

import math
import secrets
from typing import Optional

import torch
from torch import Tensor

from . import _api

__all__ = ["attention", "flash_attn_func"]


def _opts(causal, softmax_scale, window_left, window_right, softcap, dropout_p, seed):
    return dict(causal=causal, softmax_scale=softmax_scale, window_size=(window_left, window_right),
                softcap=softcap, dropout_p=dropout_p, seed=seed)


@torch.library.custom_op("cuflash::fwd", mutates_args=(), device_types=None)
def _fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], causal: bool, softmax_scale: float,
         window_left: int, window_right: int, softcap: float, dropout_p: float, seed: int,
         deterministic: bool) -> tuple[Tensor, Tensor]:
    # deterministic only matters to the backward; it is an input here so autograd can keep it.
    out, lse = _api._attention_impl(q, k, v, alibi_slopes=alibi_slopes, return_lse=True, out=None, num_splits=0,
                                    deterministic=deterministic,
                                    **_opts(causal, softmax_scale, window_left, window_right, softcap, dropout_p, seed))
    return out, lse


@_fwd.register_fake
def _(q, k, v, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap, dropout_p, seed,
      deterministic):
    b, sq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("cuflash::bwd", mutates_args=(), device_types=None)
def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, alibi_slopes: Optional[Tensor],
         causal: bool, softmax_scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float,
         seed: int, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _api.attention_backward(dout, q, k, v, out, lse, alibi_slopes=alibi_slopes, deterministic=deterministic,
                                   **_opts(causal, softmax_scale, window_left, window_right, softcap, dropout_p, seed))


@_bwd.register_fake
def _(dout, q, k, v, out, lse, alibi_slopes, causal, softmax_scale, window_left, window_right, softcap, dropout_p,
      seed, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, alibi, causal, scale, wl, wr, softcap, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi)
    ctx.opts = (causal, scale, wl, wr, softcap, dropout_p, seed, deterministic)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi = ctx.saved_tensors
    dq, dk, dv = _bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, alibi, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
              dropout_p=0.0, seed=None, deterministic=False, return_lse=False):
    """Differentiable :func:`cuflash.attention` for torch tensors (autograd, ``torch.compile``).

    Same arguments and semantics as :func:`cuflash.attention` (no ``out=``: autograd outputs are
    fresh tensors). The dropout seed is drawn here when ``seed`` is None and kept for the backward.
    """
    d = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else (1.0 / math.sqrt(d) if d > 0 else 1.0)
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"cuflash: window_size must be a pair (left, right) of ints, -1 = unbounded; "
                        f"got {window_size!r}")
    if dropout_p and seed is None:
        seed = secrets.randbits(63)
    out, lse = torch.ops.cuflash.fwd(q, k, v, alibi_slopes, bool(causal), scale, int(window_size[0]),
                                     int(window_size[1]), float(softcap), float(dropout_p), int(seed or 0),
                                     bool(deterministic))
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Drop-in for ``flash_attn.flash_attn_func`` on torch tensors, differentiable.

    ``return_attn_probs=True`` also returns ``S_dmask`` (a tensor on q's device, no gradient): the
    probabilities with the sign bit set where dropout dropped, recomputed on the host in O(batch * nheads *
    seqlen_q * seqlen_k) for debugging small shapes; see :func:`cuflash.flash_attn_func`.
    """
    seed = secrets.randbits(63) if return_attn_probs else None  # S_dmask needs the forward's seed
    res = attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                    alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, seed=seed,
                    deterministic=deterministic, return_lse=return_attn_probs)
    if return_attn_probs:
        out, lse = res
        s_dmask = _api._attn_probs(q, k, v, lse, causal=causal, softmax_scale=softmax_scale,
                                   window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
                                   dropout_p=dropout_p, seed=seed)
        return out, lse, s_dmask
    return res
