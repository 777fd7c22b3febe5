"""CPU tests of ``flash_attn_func(..., return_attn_probs=True)``: ``S_dmask`` is the (batch, nheads, seqlen_q,
seqlen_k) probability matrix with the sign bit set where the forward's dropout dropped the entry.

NumPy and CPU-torch inputs (the float64 reference computes the forward). The GPU twins are in
tests/test_gpu_dropout_backward.py.
"""

import secrets

import numpy as np
import pytest

import cuflash
from cuflash import reference

CASES = {
    "causal-gqa": dict(h=4, hk=2, sq=7, sk=11, opts=dict(causal=True)),
    "window-softcap": dict(h=2, hk=2, sq=9, sk=9, opts=dict(window_size=(3, 1), softcap=5.0)),
    "alibi-mqa": dict(h=3, hk=1, sq=6, sk=13, opts=dict(alibi=True)),
    "rows-empty": dict(h=2, hk=1, sq=10, sk=4, opts=dict(causal=True)),  # rows 0..5 see no key
}


def _inputs(case, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    b, d = 2, 16
    q = rng.standard_normal((b, case["sq"], case["h"], d)).astype(dtype)
    k = rng.standard_normal((b, case["sk"], case["hk"], d)).astype(dtype)
    v = rng.standard_normal((b, case["sk"], case["hk"], d)).astype(dtype)
    opts = dict(case["opts"])
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = rng.uniform(0.1, 0.6, case["h"]).astype(np.float32)
    return q, k, v, opts


def _apply(s, v, keep, p):
    """out = (|S| * keep / (1 - p)) @ v with v repeated over each kv group: (b, sq, h, d)."""
    g = s.shape[1] // v.shape[2]
    vv = np.repeat(np.asarray(v, np.float64), g, axis=2)
    w = np.abs(np.asarray(s, np.float64)) * keep / (1.0 - p)
    return np.einsum("bhij,bjhd->bihd", w, vv)


@pytest.fixture
def fixed_seed(monkeypatch):
    """flash_attn_func draws the forward's seed with secrets.randbits: pin it to know the mask."""
    monkeypatch.setattr(secrets, "randbits", lambda n: 987654321)
    return 987654321


@pytest.mark.parametrize("name", list(CASES))
def test_probs_without_dropout(name):
    case = CASES[name]
    q, k, v, opts = _inputs(case)
    out, lse, s = cuflash.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    b, sq, h, _ = q.shape
    assert isinstance(s, np.ndarray) and s.shape == (b, h, sq, case["sk"]) and s.dtype == np.float32
    assert not np.signbit(s).any()                                    # nothing dropped
    # masked entries are 0; rows with keys sum to 1; rows without keys are all 0
    w = reference.normalize_window(opts.get("window_size", (-1, -1)), opts.get("causal", False))
    keep = reference.keep_mask(np.arange(sq)[:, None], np.arange(case["sk"])[None, :], sq, case["sk"], w)
    assert (s[..., ~keep] == 0).all()
    rows = s.sum(-1)
    has_key = keep.any(-1)
    np.testing.assert_allclose(rows[..., has_key], 1.0, atol=1e-5)
    assert (rows[..., ~has_key] == 0).all() and np.isneginf(lse[..., ~has_key]).all()
    # S @ v is the forward's output
    np.testing.assert_allclose(_apply(s, v, 1.0, 0.0), out, atol=2e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_probs_sign_is_the_forwards_dropout_mask(name, fixed_seed):
    case = CASES[name]
    p = 0.3
    q, k, v, opts = _inputs(case)
    out, lse, s = cuflash.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **opts)
    b, sq, h, _ = q.shape
    want = np.asarray(reference.dropout_mask(fixed_seed, b, h, sq, case["sk"], p))
    assert (~np.signbit(s) == want).all(), "sign bits differ from the kernels' dropout mask"
    # |S| is the undropped softmax: the same as without dropout
    _, _, s0 = cuflash.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    np.testing.assert_allclose(np.abs(s), s0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_apply(s, v, want, p), out, atol=2e-5)


def test_probs_reproduce_the_dropped_output_with_a_random_seed():
    """No pinned seed: the mask in S_dmask is still the one the forward used (seed drawn once, shared)."""
    q, k, v, opts = _inputs(CASES["causal-gqa"], seed=3)
    p = 0.5
    for _ in range(3):
        out, _, s = cuflash.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **opts)
        keep = ~np.signbit(s)
        assert 0.2 < keep.mean() < 0.8
        np.testing.assert_allclose(_apply(s, v, keep, p), out, atol=2e-5)


def test_probs_fp16_and_float64():
    q, k, v, opts = _inputs(CASES["causal-gqa"], dtype=np.float16)
    out, _, s = cuflash.flash_attn_func(q, k, v, dropout_p=0.2, return_attn_probs=True, **opts)
    assert s.dtype == np.float16
    np.testing.assert_allclose(_apply(s, v, ~np.signbit(s), 0.2), out, atol=5e-3)
    q, k, v, opts = _inputs(CASES["window-softcap"], dtype=np.float64)
    out, _, s = cuflash.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    assert s.dtype == np.float64


def test_probs_torch_cpu(fixed_seed):
    torch = pytest.importorskip("torch")
    q, k, v, opts = _inputs(CASES["causal-gqa"])
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    p = 0.25
    out, lse, s = cuflash.flash_attn_func(tq, tk, tv, dropout_p=p, return_attn_probs=True, **opts)
    assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and not s.requires_grad
    b, sq, h, _ = q.shape
    want = np.asarray(reference.dropout_mask(fixed_seed, b, h, sq, k.shape[1], p))
    sn = s.numpy()
    assert (~np.signbit(sn) == want).all()
    np.testing.assert_allclose(_apply(sn, v, want, p), out.detach().numpy(), atol=2e-5)
    out.sum().backward()                      # still differentiable; the probabilities are a side output
    assert tq.grad is not None and torch.isfinite(tq.grad).all()
