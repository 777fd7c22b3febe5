"""Float64 NumPy reference ("oracle") for exact attention, forward and backward.

Every test of the CUDA kernels compares against this module, and NumPy
inputs given to the public API are computed with it. Everything is done in
float64, whatever the dtype of the inputs.

Layout follows FlashAttention (BSHD):

* ``q``: ``(batch, seqlen_q, nheads, headdim)``
* ``k``: ``(batch, seqlen_k, nheads_k, headdim)``
* ``v``: ``(batch, seqlen_k, nheads_k, headdim_v)``
* ``out``: ``(batch, seqlen_q, nheads, headdim_v)``
* ``lse``: ``(batch, nheads, seqlen_q)`` (natural log)

``nheads`` must be a multiple of ``nheads_k`` (GQA / MQA): query head ``h``
reads kv head ``h // (nheads // nheads_k)``.

Two implementations are given for each direction:

* :func:`attention` / :func:`attention_backward` are blockwise and follow
  the kernels' algorithm (online softmax over key blocks, recomputation of P
  from the LSE in the backward). Their memory use is
  ``O(block_q * block_k + seqlen * headdim)`` per (batch, head), never
  ``O(seqlen_q * seqlen_k)``.
* :func:`attention_naive` / :func:`attention_backward_naive` materialise the
  full score matrix; they exist to check the blockwise versions.

Internally q is viewed as ``(batch, nheads_k, group, seqlen_q, headdim)``
with ``group = nheads // nheads_k`` and k, v as
``(batch, nheads_k, 1, seqlen_k, headdim)``, so that one ``matmul``
broadcasts over the query heads of a kv group without repeating k and v.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "attention",
    "attention_naive",
    "attention_backward",
    "attention_backward_naive",
    "normalize_window",
    "keep_mask",
    "mask_bounds",
    "key_block_range",
]

#: Default block size of the blockwise algorithms, for queries and keys.
DEFAULT_BLOCK_SIZE = 128


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def normalize_window(window_size=(-1, -1), causal=False):
    """Return the effective ``(left, right)`` window as Python ints.

    Any negative value means "unbounded" and is returned as ``-1``.
    ``causal=True`` is the same as ``right = 0`` (``left`` is kept).

    Parameters
    ----------
    window_size : tuple of two ints
        ``(left, right)``.
    causal : bool

    Returns
    -------
    (left, right) : tuple of int
    """
    try:
        left, right = window_size
        left, right = int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(
            f"window_size must be a pair of ints (left, right), got {window_size!r}"
        ) from None
    left = -1 if left < 0 else left
    right = -1 if right < 0 else right
    if causal:
        right = 0
    return left, right


def keep_mask(i, j, seqlen_q, seqlen_k, window_size=(-1, -1), causal=False):
    """Vectorised mask: True where key ``j`` is kept for query ``i``.

    Masks are aligned to the bottom-right corner of the score matrix: query
    ``i`` is "at" key position ``i + seqlen_k - seqlen_q``. Key ``j`` is kept
    iff ``(left < 0 or j >= i + seqlen_k - seqlen_q - left)`` and
    ``(right < 0 or j <= i + seqlen_k - seqlen_q + right)``.

    Parameters
    ----------
    i, j : array_like of int
        Query and key indices, broadcast against each other
        (e.g. ``i[:, None]`` and ``j[None, :]``).
    seqlen_q, seqlen_k : int
    window_size : tuple of two ints
    causal : bool

    Returns
    -------
    numpy.ndarray of bool, shape ``broadcast(i, j)``
    """
    left, right = normalize_window(window_size, causal)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    diag = i + (seqlen_k - seqlen_q)  # key index on the (shifted) diagonal
    keep = np.ones(np.broadcast_shapes(i.shape, j.shape), dtype=bool)
    if left >= 0:
        keep &= j >= diag - left
    if right >= 0:
        keep &= j <= diag + right
    return keep


def mask_bounds(seqlen_q, seqlen_k, window_size=(-1, -1), causal=False):
    """Kept key range of every query row.

    Parameters
    ----------
    seqlen_q, seqlen_k : int
    window_size : tuple of two ints
    causal : bool

    Returns
    -------
    lo, hi : numpy.ndarray of int64, shape ``(seqlen_q,)``
        Query ``i`` keeps exactly the keys ``lo[i] <= j < hi[i]``; both are
        clipped to ``[0, seqlen_k]`` and ``hi >= lo`` (an empty row has
        ``lo == hi``). Both are non-decreasing in ``i``.
    """
    left, right = normalize_window(window_size, causal)
    diag = np.arange(seqlen_q, dtype=np.int64) + (seqlen_k - seqlen_q)
    lo = diag - left if left >= 0 else np.zeros(seqlen_q, dtype=np.int64)
    hi = diag + right + 1 if right >= 0 else np.full(seqlen_q, seqlen_k, np.int64)
    lo = np.clip(lo, 0, seqlen_k)
    hi = np.clip(hi, 0, seqlen_k)
    hi = np.maximum(hi, lo)
    return lo, hi


def key_block_range(q_start, q_end, seqlen_q, seqlen_k, block_k,
                    window_size=(-1, -1), causal=False):
    """Key blocks that a query block ``[q_start, q_end)`` must visit.

    This is the block-skipping logic of the kernels: key blocks entirely
    masked for every row of the query block are never visited.

    Parameters
    ----------
    q_start, q_end : int
        Query rows ``q_start <= i < q_end`` (``q_end <= seqlen_q``).
    seqlen_q, seqlen_k, block_k : int
    window_size : tuple of two ints
    causal : bool

    Returns
    -------
    n_block_min, n_block_max : int
        Visit key blocks ``n_block_min <= n < n_block_max``, block ``n``
        covering keys ``[n * block_k, min((n + 1) * block_k, seqlen_k))``.
        Empty (``n_block_min == n_block_max``) when no row keeps any key.
    """
    if q_end <= q_start or seqlen_k == 0:
        return 0, 0
    left, right = normalize_window(window_size, causal)
    shift = seqlen_k - seqlen_q
    # lo and hi are non-decreasing in i, so the union of the rows' ranges
    # lies within [lo(first row), hi(last row)).
    lo = max(0, q_start + shift - left) if left >= 0 else 0
    hi = min(seqlen_k, q_end - 1 + shift + right + 1) if right >= 0 else seqlen_k
    if hi <= lo:
        return 0, 0
    return lo // block_k, -(-hi // block_k)


# --------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------


class _Prepared(NamedTuple):
    q: np.ndarray        # (B, Hk, G, Sq, D)  float64
    k: np.ndarray        # (B, Hk, 1, Sk, D)
    v: np.ndarray        # (B, Hk, 1, Sk, Dv)
    B: int
    Sq: int
    Sk: int
    H: int
    Hk: int
    G: int
    D: int
    Dv: int
    scale: float
    left: int
    right: int
    slopes: np.ndarray | None    # (B, Hk, G, 1, 1) float64, or None
    softcap: float
    dropout_mask: np.ndarray | None  # read-only view (B, Hk, G, Sq, Sk) bool
    dropout_scale: float          # 1 / (1 - p)


def _to_f64(x, name):
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a floating point array: {e}") from None


def _prepare(q, k, v, causal, softmax_scale, window_size, alibi_slopes,
             softcap, dropout_p, dropout_mask):
    q = _to_f64(q, "q")
    k = _to_f64(k, "k")
    v = _to_f64(v, "v")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, seqlen, nheads, headdim), "
                f"got shape {x.shape}")
    B, Sq, H, D = q.shape
    Bk, Sk, Hk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k and v must agree on (batch, seqlen_k, nheads_k): "
            f"k {k.shape}, v {v.shape}")
    if Dk != D:
        raise ValueError(f"q and k headdims differ: q {q.shape}, k {k.shape}")
    if Hk == 0:
        if H != 0:
            raise ValueError(f"nheads_k is 0 but nheads is {H}")
        G = 1
    elif H % Hk != 0:
        raise ValueError(
            f"nheads ({H}) must be a multiple of nheads_k ({Hk})")
    else:
        G = H // Hk
    Dv = v.shape[3]

    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    else:
        scale = float(softmax_scale)
    left, right = normalize_window(window_size, causal)
    softcap = float(softcap)
    if not softcap >= 0.0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    slopes = None
    if alibi_slopes is not None:
        slopes = _to_f64(alibi_slopes, "alibi_slopes")
        if slopes.shape == (H,):
            slopes = np.broadcast_to(slopes, (B, H))
        elif slopes.shape != (B, H):
            raise ValueError(
                f"alibi_slopes must have shape (nheads,) = ({H},) or "
                f"(batch, nheads) = ({B}, {H}), got {slopes.shape}")
        slopes = slopes.reshape(B, Hk, G, 1, 1)

    dmask = None
    if isinstance(dropout_mask, DropoutMask):
        if dropout_mask.shape != (B, H, Sq, Sk):
            raise ValueError(f"dropout_mask of shape {dropout_mask.shape} does not match "
                             f"(batch, nheads, seqlen_q, seqlen_k) = {(B, H, Sq, Sk)}")
        dmask = dropout_mask.grouped(Hk, G)  # computed block by block, never materialised whole
    elif dropout_mask is not None:
        m = np.asarray(dropout_mask).astype(bool, copy=False)
        try:
            m = np.broadcast_to(m, (B, H, Sq, Sk))
        except ValueError:
            raise ValueError(
                f"dropout_mask of shape {m.shape} does not broadcast to "
                f"(batch, nheads, seqlen_q, seqlen_k) = {(B, H, Sq, Sk)}"
            ) from None
        dmask = m.reshape(B, Hk, G, Sq, Sk)  # a view: H is split into (Hk, G)
    elif dropout_p > 0.0:
        # The oracle has no RNG of its own: silently ignoring dropout_p would
        # make it disagree with a kernel that does drop.
        raise ValueError(
            "dropout_p > 0 needs an explicit dropout_mask in the reference")

    # (B, S, H, D) -> (B, H, S, D) -> (B, Hk, G, S, D); views, no copies.
    qh = q.transpose(0, 2, 1, 3).reshape(B, Hk, G, Sq, D)
    kh = k.transpose(0, 2, 1, 3)[:, :, None]
    vh = v.transpose(0, 2, 1, 3)[:, :, None]
    return _Prepared(qh, kh, vh, B, Sq, Sk, H, Hk, G, D, Dv, scale, left,
                     right, slopes, softcap, dmask, 1.0 / (1.0 - dropout_p))


def _block_sizes(block_size):
    if block_size is None:
        return DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE
    if np.ndim(block_size) == 0:
        bq = bk = int(block_size)
    else:
        bq, bk = (int(b) for b in block_size)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return bq, bk


def _scores(p, i0, i1, j0, j1):
    """Scores of query rows ``[i0, i1)`` against keys ``[j0, j1)``.

    Returns
    -------
    s : (B, Hk, G, i1-i0, j1-j0) float64
        Final scores (scale, softcap, ALiBi), ``-inf`` where masked.
    keep : (i1-i0, j1-j0) bool
    dcap : same shape as ``s`` or None
        ``d s_capped / d s_scaled = 1 - tanh(s_scaled / softcap)**2`` when
        softcap > 0 (needed by the backward), else None.
    """
    qb = p.q[:, :, :, i0:i1]
    kb = p.k[:, :, :, j0:j1]
    s = np.matmul(qb, kb.swapaxes(-1, -2))
    s *= p.scale
    dcap = None
    if p.softcap > 0.0:
        t = np.tanh(s / p.softcap)
        s = p.softcap * t
        dcap = 1.0 - t * t
    ii = np.arange(i0, i1)[:, None]
    jj = np.arange(j0, j1)[None, :]
    if p.slopes is not None:
        # ALiBi is added after the softcap: bias = -slope * |i + sk - sq - j|.
        dist = np.abs(ii + (p.Sk - p.Sq) - jj).astype(np.float64)
        s = s - p.slopes * dist
    keep = keep_mask(ii, jj, p.Sq, p.Sk, (p.left, p.right))
    s = np.where(keep, s, -np.inf)
    return s, keep, dcap


def _dropout(p, probs, i0, i1, j0, j1):
    """Apply the dropout mask and the 1/(1-p) rescaling to ``probs``."""
    if p.dropout_mask is None:
        return probs
    return probs * p.dropout_mask[:, :, :, i0:i1, j0:j1] * p.dropout_scale


def _finish_out(p, out, lse, return_lse):
    # (B, Hk, G, Sq, Dv) -> (B, Sq, H, Dv)
    out = np.ascontiguousarray(
        out.reshape(p.B, p.H, p.Sq, p.Dv).transpose(0, 2, 1, 3))
    if not return_lse:
        return out
    return out, np.ascontiguousarray(lse.reshape(p.B, p.H, p.Sq))


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------


def attention_naive(q, k, v, *, causal=False, softmax_scale=None,
                    window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                    dropout_p=0.0, dropout_mask=None, return_lse=False):
    """Attention forward materialising the full score matrix (for tests).

    Same parameters and results as :func:`attention` (without
    ``block_size``); uses ``O(batch * nheads * seqlen_q * seqlen_k)`` memory.
    """
    p = _prepare(q, k, v, causal, softmax_scale, window_size, alibi_slopes,
                 softcap, dropout_p, dropout_mask)
    s, _, _ = _scores(p, 0, p.Sq, 0, p.Sk)
    m = s.max(axis=-1, initial=-np.inf)
    # Safe max: a row with no kept key has m = -inf, and s - m would be
    # (-inf) - (-inf) = NaN. Subtracting 0 instead gives exp(-inf) = 0.
    m_safe = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(s - m_safe[..., None])
    l = e.sum(axis=-1)
    pos = l > 0
    probs = e / np.where(pos, l, 1.0)[..., None]
    out = np.matmul(_dropout(p, probs, 0, p.Sq, 0, p.Sk), p.v)
    lse = np.where(pos, m_safe + np.log(np.where(pos, l, 1.0)), -np.inf)
    return _finish_out(p, out, lse, return_lse)


def attention(q, k, v, *, causal=False, softmax_scale=None,
              window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
              dropout_p=0.0, dropout_mask=None, return_lse=False,
              block_size=None):
    r"""Exact attention forward, blockwise, in float64.

    Computes, for every batch ``b`` and query head ``h`` (reading kv head
    ``h // (nheads // nheads_k)``)::

        s[i, j] = (q_i . k_j) * softmax_scale
        s[i, j] = softcap * tanh(s[i, j] / softcap)            if softcap > 0
        s[i, j] -= slope[b, h] * |i + seqlen_k - seqlen_q - j|  if ALiBi
        s[i, j] = -inf                          where key j is masked for i
        P = softmax(s, axis=j)      (a row with no kept key is all zeros)
        out = (P * dropout_mask / (1 - dropout_p)) @ v
        lse[i] = log(sum_j exp(s[i, j]))        (-inf for an empty row)

    Masks are aligned to the bottom-right corner: query ``i`` sits on key
    ``i + seqlen_k - seqlen_q``. Key ``j`` is kept iff
    ``(left < 0 or j >= i + seqlen_k - seqlen_q - left)`` and
    ``(right < 0 or j <= i + seqlen_k - seqlen_q + right)``;
    ``causal=True`` means ``right = 0``. For ``seqlen_q=2, seqlen_k=5``,
    causal (``x`` kept, ``.`` masked)::

                  j: 0 1 2 3 4
            i = 0:   x x x x .
            i = 1:   x x x x x

    The algorithm is the kernels' one: query rows are processed in blocks
    of ``block_q``; for each, the key blocks that are not fully masked are
    visited in order with an online softmax (running max ``m``, running sum
    ``l``, accumulator ``acc``), so memory is ``O(block_q * block_k)`` per
    (batch, head) plus the inputs and outputs, never
    ``O(seqlen_q * seqlen_k)``.

    Parameters
    ----------
    q : array_like, shape (batch, seqlen_q, nheads, headdim)
    k : array_like, shape (batch, seqlen_k, nheads_k, headdim)
    v : array_like, shape (batch, seqlen_k, nheads_k, headdim_v)
        Any float dtype (float16, float32, float64, ml_dtypes.bfloat16),
        any strides; converted to float64. ``nheads % nheads_k == 0``.
    causal : bool, optional
        Same as ``window_size[1] = 0``.
    softmax_scale : float, optional
        Defaults to ``1 / sqrt(headdim)``.
    window_size : (int, int), optional
        ``(left, right)``; ``-1`` means unbounded.
    alibi_slopes : array_like, shape (nheads,) or (batch, nheads), optional
    softcap : float, optional
        ``0`` disables the softcap.
    dropout_p : float, optional
        Dropout probability in ``[0, 1)``; needs ``dropout_mask`` if > 0.
    dropout_mask : array_like of bool, optional
        Broadcastable to ``(batch, nheads, seqlen_q, seqlen_k)``; True means
        keep. If None, no dropout. The LSE is always that of the undropped
        softmax (it is what the backward needs to recompute P).
    return_lse : bool, optional
        Also return the log-sum-exp.
    block_size : int or (int, int), optional
        ``block_q == block_k == block_size``, or ``(block_q, block_k)``.
        Defaults to 128.

    Returns
    -------
    out : numpy.ndarray of float64, shape (batch, seqlen_q, nheads, headdim_v)
    lse : numpy.ndarray of float64, shape (batch, nheads, seqlen_q)
        Only if ``return_lse``. Natural log; ``-inf`` for rows with no key.
    """
    p = _prepare(q, k, v, causal, softmax_scale, window_size, alibi_slopes,
                 softcap, dropout_p, dropout_mask)
    bq, bk = _block_sizes(block_size)
    B, Hk, G = p.B, p.Hk, p.G
    out = np.zeros((B, Hk, G, p.Sq, p.Dv))
    lse = np.full((B, Hk, G, p.Sq), -np.inf)

    for i0 in range(0, p.Sq, bq):
        i1 = min(i0 + bq, p.Sq)
        m = np.full((B, Hk, G, i1 - i0), -np.inf)   # running max
        l = np.zeros((B, Hk, G, i1 - i0))           # running sum of exp(s - m)
        acc = np.zeros((B, Hk, G, i1 - i0, p.Dv))   # running (dropped) P @ v
        nb0, nb1 = key_block_range(i0, i1, p.Sq, p.Sk, bk,
                                   (p.left, p.right))
        for nb in range(nb0, nb1):
            j0, j1 = nb * bk, min((nb + 1) * bk, p.Sk)
            s, _, _ = _scores(p, i0, i1, j0, j1)
            m_new = np.maximum(m, s.max(axis=-1))
            # Safe max: rows that have seen no kept key yet keep m = -inf.
            # Using 0 as their exponent base gives exp(-inf - 0) = 0 for both
            # the rescale factor and the probabilities, instead of
            # exp(-inf - (-inf)) = NaN.
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
            # Rescale what was accumulated relative to the old max. When
            # m = -inf (nothing seen yet) this is 0, and l, acc are 0 anyway.
            alpha = np.exp(m - m_safe)
            e = np.exp(s - m_safe[..., None])       # 0 where masked
            l = alpha * l + e.sum(axis=-1)
            # Dropout acts on the unnormalised probabilities only in the
            # accumulator; l (hence the final normalisation and the LSE)
            # stays that of the undropped softmax.
            e = _dropout(p, e, i0, i1, j0, j1)
            acc = alpha[..., None] * acc + np.matmul(e, p.v[:, :, :, j0:j1])
            m = m_new
        pos = l > 0      # l == 0 exactly when the row kept no key at all
        l_safe = np.where(pos, l, 1.0)
        out[:, :, :, i0:i1] = np.where(pos[..., None], acc / l_safe[..., None], 0.0)
        lse[:, :, :, i0:i1] = np.where(pos, m + np.log(l_safe), -np.inf)
    return _finish_out(p, out, lse, return_lse)


# --------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------


def _prepare_backward(dout, out, lse, p):
    dout = _to_f64(dout, "dout")
    out = _to_f64(out, "out")
    lse = _to_f64(lse, "lse")
    exp_o = (p.B, p.Sq, p.H, p.Dv)
    if dout.shape != exp_o or out.shape != exp_o:
        raise ValueError(
            f"dout and out must have shape (batch, seqlen_q, nheads, "
            f"headdim_v) = {exp_o}, got {dout.shape} and {out.shape}")
    if lse.shape != (p.B, p.H, p.Sq):
        raise ValueError(
            f"lse must have shape (batch, nheads, seqlen_q) = "
            f"{(p.B, p.H, p.Sq)}, got {lse.shape}")
    do = dout.transpose(0, 2, 1, 3).reshape(p.B, p.Hk, p.G, p.Sq, p.Dv)
    # D_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij. With dropout, O already
    # contains the dropout, and sum_j P_ij (Z_ij dPv_ij / (1-p)) equals
    # rowsum(dO * O) all the same, so no mask is needed here.
    Drow = np.einsum("bshd,bshd->bhs", dout, out).reshape(p.B, p.Hk, p.G, p.Sq)
    lse = lse.reshape(p.B, p.Hk, p.G, p.Sq)
    # Rows with lse = -inf kept no key: their P is 0. Subtracting 0 instead
    # of -inf avoids (-inf) - (-inf) = NaN; their s are all -inf anyway.
    empty = np.isneginf(lse)
    lse_safe = np.where(empty, 0.0, lse)
    return do, Drow, lse_safe, empty


def _backward_block(p, do, Drow, lse_safe, empty, i0, i1, j0, j1):
    """dS_raw (w.r.t. q.k^T, before the scale) and dropped P of one block."""
    s, _, dcap = _scores(p, i0, i1, j0, j1)
    # Recompute P from the LSE: exp(-inf) = 0 where masked.
    probs = np.exp(s - lse_safe[:, :, :, i0:i1, None])
    # Defensive: for consistent inputs an lse = -inf row has all s = -inf,
    # so probs is already 0 there; this also keeps it 0 if it is not.
    probs = np.where(empty[:, :, :, i0:i1, None], 0.0, probs)
    pd = _dropout(p, probs, i0, i1, j0, j1)
    dob = do[:, :, :, i0:i1]
    dv = np.matmul(pd.swapaxes(-1, -2), dob).sum(axis=2)      # over the group
    dp = np.matmul(dob, p.v[:, :, :, j0:j1].swapaxes(-1, -2))
    dp = _dropout(p, dp, i0, i1, j0, j1)
    ds = probs * (dp - Drow[:, :, :, i0:i1, None])
    if dcap is not None:
        # d(softcap * tanh(x / softcap)) / dx = 1 - tanh(x / softcap)^2.
        ds = ds * dcap
    return ds, dv


def _finish_grads(p, dq, dk, dv):
    dq = dq.reshape(p.B, p.H, p.Sq, p.D).transpose(0, 2, 1, 3)
    dk = dk.transpose(0, 2, 1, 3)
    dv = dv.transpose(0, 2, 1, 3)
    return (np.ascontiguousarray(dq), np.ascontiguousarray(dk),
            np.ascontiguousarray(dv))


def attention_backward_naive(dout, q, k, v, out, lse, *, causal=False,
                             softmax_scale=None, window_size=(-1, -1),
                             alibi_slopes=None, softcap=0.0, dropout_p=0.0,
                             dropout_mask=None):
    """Attention backward with full score matrices (for tests).

    Same parameters and results as :func:`attention_backward` (without
    ``block_size``).
    """
    p = _prepare(q, k, v, causal, softmax_scale, window_size, alibi_slopes,
                 softcap, dropout_p, dropout_mask)
    do, Drow, lse_safe, empty = _prepare_backward(dout, out, lse, p)
    ds, dv = _backward_block(p, do, Drow, lse_safe, empty, 0, p.Sq, 0, p.Sk)
    dq = np.matmul(ds, p.k) * p.scale
    dk = np.matmul(ds.swapaxes(-1, -2), p.q).sum(axis=2) * p.scale
    return _finish_grads(p, dq, dk, dv)


def attention_backward(dout, q, k, v, out, lse, *, causal=False,
                       softmax_scale=None, window_size=(-1, -1),
                       alibi_slopes=None, softcap=0.0, dropout_p=0.0,
                       dropout_mask=None, block_size=None):
    """Exact attention backward, blockwise, in float64.

    P is recomputed from ``lse`` (never stored by the forward)::

        P    = exp(s - lse)                 (0 where masked or lse = -inf)
        D_i  = sum_d dout[i, d] * out[i, d]
        dV   = (P * Z / (1 - p))^T @ dout   (Z = dropout_mask, 1 if None)
        dP   = (dout @ V^T) * Z / (1 - p)
        dS   = P * (dP - D)
        dS  *= 1 - tanh(s_scaled / softcap)^2          if softcap > 0
        dQ   = dS @ K * softmax_scale
        dK   = dS^T @ Q * softmax_scale

    With GQA/MQA, dK and dV are summed over the query heads of each kv
    group. Query rows are processed in blocks, dK and dV accumulated, so
    memory is ``O(block_q * block_k)`` per (batch, head) plus the inputs and
    the gradients.

    Parameters
    ----------
    dout : array_like, shape (batch, seqlen_q, nheads, headdim_v)
    q, k, v : array_like
        As for :func:`attention`.
    out : array_like, shape (batch, seqlen_q, nheads, headdim_v)
        The forward's output (including dropout, if any).
    lse : array_like, shape (batch, nheads, seqlen_q)
        The forward's log-sum-exp (of the undropped softmax).
    causal, softmax_scale, window_size, alibi_slopes, softcap, dropout_p, \
dropout_mask, block_size
        As for :func:`attention`; they must be those of the forward.

    Returns
    -------
    dq : numpy.ndarray of float64, shape (batch, seqlen_q, nheads, headdim)
    dk : numpy.ndarray of float64, shape (batch, seqlen_k, nheads_k, headdim)
    dv : numpy.ndarray of float64, shape (batch, seqlen_k, nheads_k, headdim_v)
    """
    p = _prepare(q, k, v, causal, softmax_scale, window_size, alibi_slopes,
                 softcap, dropout_p, dropout_mask)
    bq, bk = _block_sizes(block_size)
    do, Drow, lse_safe, empty = _prepare_backward(dout, out, lse, p)
    dq = np.zeros((p.B, p.Hk, p.G, p.Sq, p.D))
    dk = np.zeros((p.B, p.Hk, p.Sk, p.D))
    dv = np.zeros((p.B, p.Hk, p.Sk, p.Dv))
    for i0 in range(0, p.Sq, bq):
        i1 = min(i0 + bq, p.Sq)
        qb = p.q[:, :, :, i0:i1]
        nb0, nb1 = key_block_range(i0, i1, p.Sq, p.Sk, bk, (p.left, p.right))
        for nb in range(nb0, nb1):
            j0, j1 = nb * bk, min((nb + 1) * bk, p.Sk)
            ds, dvb = _backward_block(p, do, Drow, lse_safe, empty,
                                      i0, i1, j0, j1)
            dv[:, :, j0:j1] += dvb
            dq[:, :, :, i0:i1] += np.matmul(ds, p.k[:, :, :, j0:j1]) * p.scale
            dk[:, :, j0:j1] += (np.matmul(ds.swapaxes(-1, -2), qb).sum(axis=2)
                                * p.scale)
    return _finish_grads(p, dq, dk, dv)


# ---- dropout: the kernels' counter-based generator, bit for bit --------------------------------------

_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)


def philox4x32_10(counter, key):
    """Philox-4x32-10 on arrays: ``counter`` 4 uint32 arrays, ``key`` 2 uint32 arrays -> 4 uint32 arrays.

    The same generator as ``kernels_cu/philox.cuh`` (checked against the Random123 known answers).
    """
    c0, c1, c2, c3 = (np.asarray(x, np.uint32) for x in counter)
    k0, k1 = (np.asarray(x, np.uint32) for x in key)
    with np.errstate(over="ignore"):
        for r in range(10):
            if r:
                k0 = (k0 + _PHILOX_W0).astype(np.uint32)
                k1 = (k1 + _PHILOX_W1).astype(np.uint32)
            p0 = _PHILOX_M0 * c0.astype(np.uint64)
            p1 = _PHILOX_M1 * c2.astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Keep iff the 16-bit draw >= this threshold: ``min(round(p * 65536), 65535)`` (Python's round: to
    nearest, ties to even), so the keep probability ``1 - threshold / 65536`` is within 2**-17 of ``1 - p``
    for ``p < 1 - 2**-17`` (beyond, 2**-16 of the entries are kept). The kernels get this value from the
    host (``Params::dropout_threshold``)."""
    return min(int(round(float(p) * 65536.0)), 65535)


def _dropout_block(seed, offset, nheads, p, b_idx, h_idx, i0, i1, j0, j1):
    """Keep mask (len(b_idx), len(h_idx), i1-i0, j1-j0) for absolute rows i0:i1, keys j0:j1."""
    b = np.asarray(b_idx, np.int64)[:, None, None, None]
    h = np.asarray(h_idx, np.int64)[None, :, None, None]
    i = np.arange(i0, i1, dtype=np.int64)[None, None, :, None]
    seed, offset = int(seed), int(offset)
    # one call per aligned group of 8 keys of a row: the groups g0 .. g1 - 1 cover keys j0 .. j1 - 1
    g0 = j0 >> 3
    g1 = max(g0, (j1 + 7) >> 3)
    g = np.arange(g0, g1, dtype=np.int64)[None, None, None, :]
    counter = (g, i, b * nheads + h, np.int64(offset & 0xFFFFFFFF))
    key = (seed & 0xFFFFFFFF, ((seed >> 32) ^ (offset >> 32)) & 0xFFFFFFFF)
    words = np.stack(philox4x32_10(np.broadcast_arrays(*counter), key), axis=-1)  # (..., groups, 4)
    draws = np.stack([words & np.uint32(0xFFFF), words >> np.uint32(16)], axis=-1)  # (..., groups, 4, 2)
    # key 8 g + 2 k + e: draw e of word k of group g
    draws = draws.reshape(draws.shape[:-3] + (8 * (g1 - g0),))[..., j0 - 8 * g0: j1 - 8 * g0]
    return draws >= np.uint32(dropout_threshold(p))


class DropoutMask:
    """The kernels' dropout keep-mask (True = kept) as a lazy (batch, nheads, seqlen_q, seqlen_k) array.

    Slicing computes only the requested block; ``np.asarray(mask)`` materialises all of it.
    """

    def __init__(self, seed, batch, nheads, seqlen_q, seqlen_k, p, offset=0):
        self.seed, self.offset, self.p = int(seed), int(offset), float(p)
        self.shape = (int(batch), int(nheads), int(seqlen_q), int(seqlen_k))
        self._group = None  # (Hk, G) when viewed grouped

    def grouped(self, hk, g):
        m = DropoutMask(self.seed, *self.shape, self.p, self.offset)
        m._group = (hk, g)
        return m

    def _block(self, bs, hs, i0, i1, j0, j1):
        return _dropout_block(self.seed, self.offset, self.shape[1], self.p, bs, hs, i0, i1, j0, j1)

    def __getitem__(self, idx):
        B, H, Sq, Sk = self.shape
        if self._group is None:
            b, h, i, j = (idx + (slice(None),) * 4)[:4]
            bs, hs = range(B)[b], range(H)[h]
            i0, i1, _ = i.indices(Sq)
            j0, j1, _ = j.indices(Sk)
            return self._block(list(bs), list(hs), i0, i1, j0, j1)
        hk, g = self._group
        b, kh, gi, i, j = idx
        assert b == kh == gi == slice(None), "grouped dropout masks are sliced along seqlens only"
        i0, i1, _ = i.indices(Sq)
        j0, j1, _ = j.indices(Sk)
        m = self._block(list(range(B)), list(range(H)), i0, i1, j0, j1)
        return m.reshape(B, hk, g, i1 - i0, j1 - j0)

    def __array__(self, dtype=None, copy=None):
        m = self[:, :, :, :] if self._group is None else None
        if m is None:
            B, H, Sq, Sk = self.shape
            m = self._block(list(range(B)), list(range(H)), 0, Sq, 0, Sk).reshape(
                B, self._group[0], self._group[1], Sq, Sk)
        return m if dtype is None else m.astype(dtype)


def dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, p, offset=0):
    """The kernels' dropout mask for (seed, offset): bool (batch, nheads, seqlen_q, seqlen_k), True = kept.

    One Philox-4x32-10 call per 8 keys of a row: counter ``(j // 8, i, b * nheads + h, offset mod 2**32)``,
    key ``(seed mod 2**32, (seed >> 32) ^ (offset >> 32))``. Element (b, h, i, j) takes the 16-bit draw
    ``(word[(j % 8) // 2] >> (16 * (j % 2))) & 0xFFFF`` (low half for even j, high half for odd j) and is
    kept iff ``draw >= dropout_threshold(p) = min(round(p * 65536), 65535)``: keep probability
    ``1 - threshold / 65536``, within 2**-17 of ``1 - p`` (for ``p < 1 - 2**-17``). Kept entries are scaled by
    ``1 / (1 - p)`` (as FlashAttention), so the expectation of a dropped-and-scaled weight is off by at most
    ``2**-17 / (1 - p)`` relative. The result is lazy: slice it, or ``np.asarray`` it for the whole matrix.
    """
    return DropoutMask(seed, batch, nheads, seqlen_q, seqlen_k, p, offset)
