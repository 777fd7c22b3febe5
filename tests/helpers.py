"""Shared test utilities: inputs per framework and FlashAttention's error rule.

The rule: a kernel passes when its max error against the float64 reference is at most twice the
max error of the same math done in the input's precision (scores and softmax in fp32, P and the
output rounded to the input dtype, as a plain low-precision attention would), plus a tiny atol.
"""

from __future__ import annotations

import numpy as np

from cuflash import reference
from cuflash._interop import BFLOAT16

NP_DTYPES = {"float16": np.float16, "bfloat16": BFLOAT16, "float32": np.float32}
ATOL = {"float16": 2e-4, "bfloat16": 2e-3, "float32": 1e-5}


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to dtype, returned as float64."""
    return np.asarray(np.asarray(x).astype(NP_DTYPES[dtype]), np.float64)


def randn(rng, shape, dtype, scale=1.0):
    return rounded(rng.standard_normal(shape) * scale, dtype)


def to_framework(x: np.ndarray, fw: str, dtype: str):
    """A float64 NumPy array as a CUDA array of framework fw in dtype (fresh memory)."""
    if fw == "cupy":
        import cupy

        return cupy.asarray(x.astype(NP_DTYPES[dtype]))
    if fw == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device="cuda", dtype=getattr(torch, dtype))
    if fw == "jax":
        import jax
        import jax.numpy as jnp

        return jax.device_put(jnp.asarray(x.astype(np.float32)).astype(getattr(jnp, dtype)), jax.devices("gpu")[0])
    raise ValueError(fw)


def to_numpy64(x) -> np.ndarray:
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        import cupy

        return np.asarray(cupy.asnumpy(x), np.float64) if x.dtype != BFLOAT16 else \
            np.asarray(cupy.asnumpy(x.astype(np.float32)), np.float64)
    if mod == "torch":
        return x.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(np.asarray(x).astype(np.float32), np.float64)


def lowp_attention(q, k, v, dtype, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                   alibi_slopes=None, softcap=0.0):
    """Plain attention in the input's precision: fp32 scores/softmax, P and output rounded to dtype."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(d)
    g = h // hk
    kk = np.repeat(k, g, axis=2).astype(np.float32)
    vv = np.repeat(v, g, axis=2).astype(np.float32)
    s = np.einsum("bihd,bjhd->bhij", q.astype(np.float32), kk) * np.float32(scale)
    if softcap > 0:
        s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    if alibi_slopes is not None:
        sl = np.asarray(alibi_slopes, np.float32)
        sl = sl[None, :] if sl.ndim == 1 else sl
        s = s - sl[:, :, None, None] * np.abs(i + sk - sq - j).astype(np.float32)
    keep = reference.keep_mask(i, j, sq, sk, window_size, causal)
    s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p = np.where(l > 0, p / np.where(l > 0, l, 1), 0)
    p = rounded(p, dtype).astype(np.float32)
    o = np.einsum("bhij,bjhd->bihd", p, vv)
    return rounded(o, dtype)


def assert_fa_close(got, ref, base, dtype, what="out"):
    """FlashAttention's rule: max|got-ref| <= 2 max|base-ref| + atol; NaN never passes."""
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any(), f"{what}: NaN in the result (unwritten or masked-row NaN)"
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    base_err = float(np.max(np.abs(base - ref))) if got.size else 0.0
    bound = 2 * base_err + ATOL[dtype]
    assert err <= bound, f"{what}: max error {err:.3e} > 2 x {base_err:.3e} + {ATOL[dtype]:.0e}"
    return err, base_err
