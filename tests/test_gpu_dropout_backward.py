"""GPU tests of dropout in the backward (portable kernels, DROPOUT variants) and of ``return_attn_probs``.

Each case runs the kernels' forward with dropout (``cuflash.attention(..., dropout_p, seed, return_lse=True)``)
and backward (same seed) on CuPy arrays, and compares dq, dk, dv with ``reference.attention_backward`` in
float64 given the same inputs, the GPU forward's own out and lse, and the kernels' mask
``reference.dropout_mask(seed, b, h, sq, sk, p)`` (bit-identical to the kernels' Philox draws).

Error rule: tests/test_gpu_backward.py's (``check_grad``: 3 x the baseline error + ATOL x the gradient
magnitude). The baseline is that module's ``lowp_backward`` (a plain backward in the input's precision),
which has no dropout: as in tests/test_gpu_dropout.py's forward test, its rounding error against the float64
no-dropout reference is carried onto the dropout reference (``base = ref + (lowp - ref_nodrop)``), so the
bound is the dtype's own error at these shapes. fp32 cases are therefore strict (relative ~1e-5): one wrong
mask bit moves a gradient by ~P_ij ~ 1/seqlen_k and fails them.

Marked ``gpu``: tests/conftest.py skips them where there is no CUDA GPU or no CuPy.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import ATOL, to_numpy64
from .test_attn_probs import _apply, fixed_seed  # noqa: F401  (fixed_seed is a fixture)
from .test_gpu_backward import _device, _inputs, check_grad, grad_scale, lowp_backward

pytestmark = pytest.mark.gpu

P = 0.17
SEEDS = [1, 2**63 + 12345]   # the second has a nonzero high word (Philox key word 1)


def _cupy():
    return pytest.importorskip("cupy")


def _bits(x):
    """Raw bits of a CuPy gradient (bitwise comparisons)."""
    a = _cupy().asnumpy(x)
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)


def _forward_backward(q, k, v, do, slopes, dtype, opts, seed, p, deterministic, dout_dev=None):
    cupy = _cupy()
    qd, kd, vd = (_device(x, dtype) for x in (q, k, v))
    dod = _device(do, dtype) if dout_dev is None else dout_dev
    sl = None if slopes is None else cupy.asarray(slopes)
    out, lse = cuflash.attention(qd, kd, vd, alibi_slopes=sl, dropout_p=p, seed=seed, return_lse=True, **opts)
    grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, alibi_slopes=sl, dropout_p=p, seed=seed,
                                       deterministic=deterministic, **opts)
    return out, lse, grads


def run_dropout_case(dtype, b, sq, sk, h, hk, d, *, seed, data_seed=0, p=P, causal=False, window=(-1, -1),
                     alibi=None, softcap=0.0, softmax_scale=None, deterministic=False):
    q, k, v, do, slopes = _inputs(data_seed, dtype, b, sq, sk, h, hk, d, alibi)
    opts = dict(causal=causal, softmax_scale=softmax_scale, window_size=window, softcap=softcap)
    out, lse, grads = _forward_backward(q, k, v, do, slopes, dtype, opts, seed, p, deterministic)
    got = [to_numpy64(g) for g in grads]

    s64 = None if slopes is None else slopes.astype(np.float64)
    mask = reference.dropout_mask(seed, b, h, sq, sk, p)
    ref = reference.attention_backward(do, q, k, v, to_numpy64(out), to_numpy64(lse), alibi_slopes=s64,
                                       dropout_p=p, dropout_mask=mask, **opts)
    # the dtype's error of a plain low-precision backward (no dropout), carried onto the dropout reference
    out0, lse0 = reference.attention(q, k, v, alibi_slopes=s64, return_lse=True, **opts)
    ref0 = reference.attention_backward(do, q, k, v, out0, lse0, alibi_slopes=s64, **opts)
    low0 = lowp_backward(do, q, k, v, dtype, alibi_slopes=slopes, **opts)
    base = [r + (lo - r0) for r, lo, r0 in zip(ref, low0, ref0)]
    scale = grad_scale(ref)
    for name, g, r, bs in zip(("dq", "dk", "dv"), got, ref, base):
        check_grad(name, g, r, bs, dtype, scale)

    # exact zeros: rows without keys have dq = 0; keys no row sees have dk = dv = 0 (dropout or not)
    empty_rows = np.isneginf(lse0)
    if empty_rows.any():
        assert (got[0].transpose(0, 2, 1, 3)[empty_rows] == 0).all(), "dq of rows without keys must be 0"
    w = reference.normalize_window(window, causal)
    keep = reference.keep_mask(np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk, w)
    unseen = ~keep.any(axis=0)
    if unseen.any():
        assert (got[1][:, unseen] == 0).all() and (got[2][:, unseen] == 0).all(), "unseen keys: dk = dv = 0"
    return got


# ---- gradients against the reference -----------------------------------------------------------------

OPTS = {
    "causal": dict(causal=True),
    "window-softcap": dict(window=(20, 3), softcap=10.0),
    "alibi": dict(alibi="h"),
}


@pytest.mark.parametrize("seed", SEEDS, ids=["seed1", "seed-hi"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("opts", list(OPTS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dropout_backward_matches_reference(dtype, opts, deterministic, seed):
    # GQA 6-2 in every case: dK/dV sum the query heads of a group, each with its own mask
    run_dropout_case(dtype, 2, 113, 203, 6, 2, 64, seed=seed, deterministic=deterministic, **OPTS[opts])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("seqlens", [(113, 203), (257, 64), (1, 239), (239, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("headdim", [32, 59, 111, 256])   # every tile bucket (32, 64, 128, 256)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dropout_backward_headdims(dtype, headdim, seqlens, deterministic):
    sq, sk = seqlens
    run_dropout_case(dtype, 2, sq, sk, 2, 1, headdim, seed=headdim * 1000 + sq, data_seed=headdim + sk,
                     causal=sq > sk, deterministic=deterministic)


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_dropout_backward_high_p(p):
    run_dropout_case("float32", 2, 257, 64, 4, 2, 64, seed=77, p=p, window=(17, 5), deterministic=True)


def test_dropout_backward_longer_sequences():
    # many key blocks and query tiles (Philox counters far from 0), atomic dQ from many blocks
    run_dropout_case("bfloat16", 1, 1000, 1537, 4, 2, 64, seed=2**40 + 3, causal=True)


# ---- the mask itself, read through the gradients --------------------------------------------------------

def mask_probe_inputs(b, sq, sk, h, d):
    """q = 0 (P uniform), k_j = e_j (needs sk <= d), v_j = e_0: the inputs of the mask read-back."""
    q = np.zeros((b, sq, h, d))
    k = np.zeros((b, sk, h, d))
    k[:, np.arange(sk), :, np.arange(sk)] = 1.0
    v = np.zeros((b, sk, h, d))
    v[..., 0] = 1.0
    return q, k, v


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_mask_read_through_gradients(deterministic):
    """q = 0 makes P uniform (1/sk). With dO_i = e_i, dV[j, i] = Z_ij / ((1 - p) sk): dV spells the mask of
    the dK/dV kernel. With k_j = e_j, v_j = e_0, dO_i = e_0 and scale 1: dq_i[j] = dS_ij =
    (Z_ij / (1 - p) - D_i) / sk: dq spells the mask of the dQ path (atomic or row-wise kernel)."""
    b, h, sq, sk, d, p, seed = 2, 3, 64, 100, 128, 0.3, 4242
    q, k, v = mask_probe_inputs(b, sq, sk, h, d)
    opts = dict(causal=False, softmax_scale=1.0, window_size=(-1, -1), softcap=0.0)
    want = np.asarray(reference.dropout_mask(seed, b, h, sq, sk, p))            # (b, h, sq, sk)

    do_v = np.zeros((b, sq, h, d))
    do_v[:, np.arange(sq), :, np.arange(sq)] = 1.0
    _, _, (_, _, dv) = _forward_backward(q, k, v, do_v, None, "float32", opts, seed, p, deterministic)
    z_v = to_numpy64(dv)[..., :sq] * (1 - p) * sk                                # (b, sk, h, sq)
    got_v = z_v.transpose(0, 2, 3, 1) > 0.5
    assert (got_v == want).all(), f"dK/dV kernel: {(got_v != want).sum()} mask bits differ"

    do_q = np.zeros((b, sq, h, d))
    do_q[..., 0] = 1.0
    out, _, (dq, _, _) = _forward_backward(q, k, v, do_q, None, "float32", opts, seed, p, deterministic)
    dsum = to_numpy64(out)[..., 0]                                               # D_i = out_i . e_0
    z_q = (to_numpy64(dq)[..., :sk] * sk + dsum[..., None]) * (1 - p)            # (b, sq, h, sk)
    got_q = z_q.transpose(0, 2, 1, 3) > 0.5
    assert (got_q == want).all(), f"dQ path: {(got_q != want).sum()} mask bits differ"


# ---- reproducibility ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(dtype="bfloat16", seqlens=(257, 203), heads=(6, 2), d=128, causal=True),
    dict(dtype="float32", seqlens=(113, 239), heads=(4, 1), d=59, causal=False),
], ids=["bf16-gqa-causal", "fp32-mqa"])
def test_same_seed_bitwise_other_seed_differs(case):
    dtype = case["dtype"]
    sq, sk = case["seqlens"]
    h, hk = case["heads"]
    q, k, v, do, _ = _inputs(31, dtype, 2, sq, sk, h, hk, case["d"])
    opts = dict(causal=case["causal"], softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    runs = [_forward_backward(q, k, v, do, None, dtype, opts, seed, P, True) for seed in (5, 5, 6)]
    (out_a, lse_a, ga), (out_b, lse_b, gb), (out_c, _, gc) = runs
    assert np.array_equal(_bits(out_a), _bits(out_b)) and np.array_equal(_bits(lse_a), _bits(lse_b))
    for name, x, y in zip(("dq", "dk", "dv"), ga, gb):
        assert np.array_equal(_bits(x), _bits(y)), f"{name}: same seed, deterministic, but bits differ"
    for name, x, z in zip(("dq", "dk", "dv"), ga, gc):
        frac = float(np.mean(_bits(x) != _bits(z)))
        assert frac > 0.5, f"{name}: another seed changed only {frac:.1%} of the gradient"


def test_dropout_default_and_deterministic_agree():
    q, k, v, do, _ = _inputs(32, "float32", 2, 239, 113, 4, 2, 64)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    _, _, a = _forward_backward(q, k, v, do, None, "float32", opts, 99, P, False)
    _, _, b = _forward_backward(q, k, v, do, None, "float32", opts, 99, P, True)
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        x, y = to_numpy64(x), to_numpy64(y)
        assert np.max(np.abs(x - y)) <= ATOL["float32"] * max(1.0, np.max(np.abs(y))), name
    # dk and dv come from the same kernel in both modes: bitwise equal
    assert np.array_equal(_bits(a[1]), _bits(b[1])) and np.array_equal(_bits(a[2]), _bits(b[2]))


# ---- torch autograd ------------------------------------------------------------------------------------

def test_torch_autograd_with_dropout():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    dtype, b, sq, sk, h, hk, d, seed = "bfloat16", 2, 113, 203, 6, 2, 64, 1234
    q, k, v, do, _ = _inputs(33, dtype, b, sq, sk, h, hk, d)
    tq, tk, tv = (torch.tensor(x, dtype=torch.float32, device="cuda").to(torch.bfloat16).requires_grad_()
                  for x in (q, k, v))
    out, lse = cuflash.attention(tq, tk, tv, causal=True, dropout_p=P, seed=seed, return_lse=True)
    out.backward(torch.tensor(do, dtype=torch.float32, device="cuda").to(torch.bfloat16))
    got = [to_numpy64(t.grad) for t in (tq, tk, tv)]
    opts = dict(causal=True)
    ref = reference.attention_backward(do, q, k, v, to_numpy64(out), to_numpy64(lse), dropout_p=P,
                                       dropout_mask=reference.dropout_mask(seed, b, h, sq, sk, P), **opts)
    out0, lse0 = reference.attention(q, k, v, return_lse=True, **opts)
    ref0 = reference.attention_backward(do, q, k, v, out0, lse0, **opts)
    low0 = lowp_backward(do, q, k, v, dtype, **opts)
    for name, g, r, lo, r0 in zip(("dq", "dk", "dv"), got, ref, low0, ref0):
        check_grad(name, g, r, r + (lo - r0), dtype, grad_scale(ref))


# ---- flash_attn_func(..., return_attn_probs=True) on the GPU ---------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_attn_probs_cupy(dtype, fixed_seed):  # noqa: F811
    cupy = _cupy()
    b, sq, sk, h, hk, d, p = 2, 37, 53, 4, 2, 32, 0.25
    q, k, v, _, slopes = _inputs(34, dtype, b, sq, sk, h, hk, d, alibi="h")
    qd, kd, vd = (_device(x, dtype) for x in (q, k, v))
    out, lse, s = cuflash.flash_attn_func(qd, kd, vd, dropout_p=p, causal=True, alibi_slopes=cupy.asarray(slopes),
                                          return_attn_probs=True)
    assert isinstance(s, cupy.ndarray) and s.shape == (b, h, sq, sk) and s.dtype == qd.dtype
    sn = to_numpy64(s)
    want = np.asarray(reference.dropout_mask(fixed_seed, b, h, sq, sk, p))
    assert (~np.signbit(sn) == want).all(), "S_dmask's sign bits differ from the forward's mask"
    # |S| against the float64 softmax; S reproduces the GPU output
    s64 = slopes.astype(np.float64)
    o0, lse0 = reference.attention(q, k, v, causal=True, alibi_slopes=s64, return_lse=True)
    probs = np.abs(sn)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=2e-3 if dtype == "float16" else 1e-5)
    np.testing.assert_allclose(to_numpy64(lse), lse0, atol=1e-4)
    tol = 5e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(_apply(sn, v, want, p), to_numpy64(out), atol=tol)


def test_attn_probs_torch_cuda(fixed_seed):  # noqa: F811
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    b, sq, sk, h, hk, d, p = 1, 29, 41, 2, 1, 64, 0.4
    q, k, v, _, _ = _inputs(35, "float16", b, sq, sk, h, hk, d)
    tq, tk, tv = (torch.tensor(x, dtype=torch.float16, device="cuda").requires_grad_() for x in (q, k, v))
    out, lse, s = cuflash.flash_attn_func(tq, tk, tv, dropout_p=p, window_size=(7, 2), return_attn_probs=True)
    assert s.device == tq.device and s.dtype == torch.float16 and s.shape == (b, h, sq, sk)
    sn = to_numpy64(s)
    want = np.asarray(reference.dropout_mask(fixed_seed, b, h, sq, sk, p))
    assert (~np.signbit(sn) == want).all()
    np.testing.assert_allclose(_apply(sn, v, want, p), to_numpy64(out), atol=5e-3)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (tq, tk, tv))
