"""GPU tests of the backward (``cuflash.attention_backward`` on CuPy arrays) against the float64 reference.

Every case runs the kernels' forward (``cuflash.attention(..., return_lse=True)``) and backward on CuPy
arrays of the input dtype, and compares dq, dk, dv with ``cuflash.reference.attention_backward`` run in
float64 on the same (dtype-valued) inputs and on the float64 reference forward's out and lse.

Error rule (FlashAttention's, with its allowance for gradients)::

    max|got - ref| <= 3 * max|base - ref| + ATOL[dtype] * max(1, max|dq_ref|, max|dk_ref|, max|dv_ref|)

``base`` is the same backward done the plain way in the input's precision (``lowp_backward`` below:
fp32 matmuls and softmax, with P, dP, dS and the gradients rounded to the dtype, as an autograd
attention in fp16/bf16 would), so the bound scales with what the dtype can resolve. The factor is 3
(FlashAttention uses 2 for the output and up to 3 for gradients). ``ATOL`` is tests/helpers.py's
(fp16 2e-4, bf16 2e-3, fp32 1e-5), scaled by the case's gradient magnitude (the largest of the three
reference gradients, at least 1): for fp32 the baseline error is only fp32 rounding, and this term covers
the kernels' fp32 accumulation order (relative 1e-5); it also covers gradients that are exactly 0 in the
reference (with a single key, P = 1 and dS = dP - D = 0 exactly) where the kernels hold fp32 rounding
noise of dP - D. NaN never passes.

Marked ``gpu``: tests/conftest.py skips them where there is no CUDA GPU or no CuPy.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import ATOL, NP_DTYPES, randn, rounded, to_numpy64

pytestmark = pytest.mark.gpu

GRAD_FACTOR = 3

SEQLENS = [(1, 1), (113, 203), (239, 1), (1, 239), (128, 128), (257, 64)]
HEADDIMS = [32, 59, 64, 111, 128, 256]


def _cupy():
    return pytest.importorskip("cupy")


# ---- the low-precision baseline ----------------------------------------------------------------------

def lowp_backward(dout, q, k, v, dtype, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                  alibi_slopes=None, softcap=0.0):
    """(dq, dk, dv) of plain attention computed in the input's precision.

    fp32 scores and softmax; P rounded to dtype (a softmax output in dtype); dV = Pᵀ dO, dP = dO Vᵀ,
    dS = P (dP - rowsum(P dP)) [* (1 - tanh²) with softcap], dQ = dS K scale, dK = dSᵀ Q scale with
    fp32 accumulation and every product rounded to dtype. For fp32 nothing is rounded beyond fp32.
    """
    f32 = np.float32
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    scale = f32(softmax_scale if softmax_scale is not None else 1.0 / np.sqrt(d))
    qf = q.astype(f32)
    kk = np.repeat(k, g, axis=2).astype(f32)
    vv = np.repeat(v, g, axis=2).astype(f32)
    dof = dout.astype(f32)
    raw = np.einsum("bihd,bjhd->bhij", qf, kk) * scale
    dcap = None
    if softcap > 0:
        t = np.tanh(raw / f32(softcap))
        s = f32(softcap) * t
        dcap = f32(1) - t * t
    else:
        s = raw
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    if alibi_slopes is not None:
        sl = np.asarray(alibi_slopes, f32)
        sl = np.broadcast_to(sl[None, :] if sl.ndim == 1 else sl, (b, h))
        s = s - sl[:, :, None, None] * np.abs(i + sk - sq - j).astype(f32)
    keep = reference.keep_mask(i, j, sq, sk, window_size, causal)
    s = np.where(keep, s, -np.inf).astype(f32)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    lsum = p.sum(-1, keepdims=True)
    p = np.where(lsum > 0, p / np.where(lsum > 0, lsum, 1), 0).astype(f32)
    pr = rounded(p, dtype).astype(f32)
    dv = np.einsum("bhij,bihd->bjhd", pr, dof).reshape(b, sk, hk, g, d).sum(3)
    dp = rounded(np.einsum("bihd,bjhd->bhij", dof, vv), dtype).astype(f32)
    ds = pr * (dp - (pr * dp).sum(-1, keepdims=True))
    if dcap is not None:
        ds = ds * dcap
    ds = rounded(ds, dtype).astype(f32)
    dq = np.einsum("bhij,bjhd->bihd", ds, kk) * scale
    dk = (np.einsum("bhij,bihd->bjhd", ds, qf) * scale).reshape(b, sk, hk, g, d).sum(3)
    return rounded(dq, dtype), rounded(dk, dtype), rounded(dv, dtype)


def grad_scale(ref) -> float:
    """The case's gradient magnitude: max(1, max |dq|, max |dk|, max |dv|) of the reference."""
    return max([1.0] + [float(np.max(np.abs(r))) for r in ref if r.size])


def check_grad(name, got, ref, base, dtype, scale):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert not np.isnan(got).any(), f"{name}: NaN in the result (unwritten, or NaN from a masked row)"
    assert np.isfinite(got).all(), f"{name}: inf in the result"
    if got.size == 0:
        return
    err = float(np.max(np.abs(got - ref)))
    base_err = float(np.max(np.abs(base - ref)))
    atol = ATOL[dtype] * scale
    bound = GRAD_FACTOR * base_err + atol
    assert err <= bound, (f"{name}: max error {err:.3e} > {GRAD_FACTOR} x {base_err:.3e} + {atol:.1e} "
                          f"(max |ref| {np.max(np.abs(ref)):.3e})")


# ---- one case ------------------------------------------------------------------------------------------

def _device(x, dtype, strided=False):
    """A float64 (b, s, h, d) NumPy array as a CuPy array of dtype; strided: a view of a BHSD array."""
    cupy = _cupy()
    npd = NP_DTYPES[dtype]
    if strided:
        return cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3)).astype(npd)).transpose(0, 2, 1, 3)
    return cupy.asarray(x.astype(npd))


def _nan(shape, dtype, strided=False):
    """A CuPy array of dtype filled with NaN (strided: a view of a (b, h, s, d) array)."""
    cupy = _cupy()
    b, s, h, d = shape
    if strided:
        return cupy.asarray(np.full((b, h, s, d), np.nan, NP_DTYPES[dtype])).transpose(0, 2, 1, 3)
    return cupy.asarray(np.full(shape, np.nan, NP_DTYPES[dtype]))


def _inputs(seed, dtype, b, sq, sk, h, hk, d, alibi=None):
    rng = np.random.default_rng(seed)
    q = randn(rng, (b, sq, h, d), dtype)
    k = randn(rng, (b, sk, hk, d), dtype)
    v = randn(rng, (b, sk, hk, d), dtype)
    do = randn(rng, (b, sq, h, d), dtype)
    slopes = None
    if alibi == "h":
        slopes = rng.uniform(0.05, 0.5, (h,)).astype(np.float32)
    elif alibi == "bh":
        slopes = rng.uniform(0.05, 0.5, (b, h)).astype(np.float32)
    return q, k, v, do, slopes


def _reference(q, k, v, do, slopes, dtype, opts):
    s64 = None if slopes is None else slopes.astype(np.float64)
    out, lse = reference.attention(q, k, v, alibi_slopes=s64, return_lse=True, **opts)
    ref = reference.attention_backward(do, q, k, v, out, lse, alibi_slopes=s64, **opts)
    base = lowp_backward(do, q, k, v, dtype, alibi_slopes=slopes, **opts)
    return ref, base, lse


def _kernels(q, k, v, do, slopes, dtype, opts, *, deterministic=False, strided=False, poison=False):
    cupy = _cupy()
    qd, kd, vd, dod = (_device(x, dtype, strided) for x in (q, k, v, do))
    sl = None if slopes is None else cupy.asarray(slopes)
    out, lse = cuflash.attention(qd, kd, vd, alibi_slopes=sl, return_lse=True, **opts)
    given = {}
    if poison:
        given = dict(dq=_nan(q.shape, dtype, strided), dk=_nan(k.shape, dtype, strided),
                     dv=_nan(v.shape, dtype, strided))
    grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, alibi_slopes=sl, deterministic=deterministic,
                                       **opts, **given)
    if poison:  # the given arrays are written and returned
        assert all(g is given[n] for g, n in zip(grads, ("dq", "dk", "dv")))
    return grads


def run_case(dtype, b, sq, sk, h, hk, d, *, seed=0, causal=False, window=(-1, -1), alibi=None, softcap=0.0,
             softmax_scale=None, deterministic=False, strided=False, poison=False):
    q, k, v, do, slopes = _inputs(seed, dtype, b, sq, sk, h, hk, d, alibi)
    opts = dict(causal=causal, softmax_scale=softmax_scale, window_size=window, softcap=softcap)
    ref, base, lse_ref = _reference(q, k, v, do, slopes, dtype, opts)
    grads = _kernels(q, k, v, do, slopes, dtype, opts, deterministic=deterministic, strided=strided,
                     poison=poison)
    got = [to_numpy64(g) for g in grads]
    for name, g, r, bs in zip(("dq", "dk", "dv"), got, ref, base):
        check_grad(name, g, r, bs, dtype, grad_scale(ref))
    # Exact zeros: rows that keep no key (lse = -inf) have dq = 0; keys that no row keeps have dk = dv = 0.
    empty_rows = np.isneginf(lse_ref)                                      # (b, h, sq)
    if empty_rows.any():
        dq_rows = got[0].transpose(0, 2, 1, 3)[empty_rows]
        assert (dq_rows == 0).all(), "dq of rows without keys must be exactly 0"
    w = reference.normalize_window(window, causal)
    keep = reference.keep_mask(np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk, w)
    unseen = ~keep.any(axis=0)                                             # (sk,)
    if unseen.any():
        assert (got[1][:, unseen] == 0).all(), "dk of keys that no query sees must be exactly 0"
        assert (got[2][:, unseen] == 0).all(), "dv of keys that no query sees must be exactly 0"
    return got


# ---- head dims x sequence lengths x causal -------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_matches_reference(dtype, headdim, seqlens, causal):
    sq, sk = seqlens
    run_case(dtype, 2, sq, sk, 2, 2, headdim, seed=headdim * 7 + sq + sk, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(1, 1), (113, 203), (239, 1), (257, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("headdim", HEADDIMS)
def test_backward_matches_reference_fp32(headdim, seqlens, causal):
    sq, sk = seqlens
    run_case("float32", 2, sq, sk, 2, 2, headdim, seed=headdim + sq, causal=causal)


# ---- options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seqlens", [(113, 203), (257, 64), (1, 239), (128, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_window(dtype, seqlens):
    sq, sk = seqlens
    run_case(dtype, 2, sq, sk, 2, 2, 64, seed=11, window=(17, 5))


@pytest.mark.parametrize("window", [(17, -1), (-1, 5), (0, 0)], ids=["left17-causal", "right5-causal", "diag"])
def test_backward_window_with_causal(window):
    run_case("float16", 1, 239, 113, 2, 2, 64, seed=12, window=window, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("alibi", ["h", "bh"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_alibi(dtype, alibi, causal):
    run_case(dtype, 2, 113, 203, 2, 2, 64, seed=13, alibi=alibi, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_backward_softcap(dtype, causal):
    # scale 1 makes the raw scores large enough that tanh saturates for some pairs (1 - tanh² << 1)
    run_case(dtype, 2, 113, 203, 2, 2, 64, seed=14, softcap=30.0, softmax_scale=1.0, causal=causal)


def test_backward_softcap_alibi_window():
    run_case("bfloat16", 2, 257, 64, 2, 2, 128, seed=15, softcap=30.0, alibi="h", window=(17, 5))


def test_backward_custom_scale():
    run_case("float16", 2, 113, 203, 2, 2, 111, seed=16, softmax_scale=0.3)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(6, 2), (6, 1)], ids=["gqa6-2", "mqa6-1"])
def test_backward_gqa_mqa(heads, causal, deterministic):
    h, hk = heads
    run_case("float16", 2, 113, 203, h, hk, 64, seed=17, causal=causal, deterministic=deterministic)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_backward_gqa_alibi_window_deterministic(dtype):
    run_case(dtype, 1, 257, 64, 6, 2, 59, seed=18, alibi="h", window=(17, 5), deterministic=True)


# ---- layouts and outputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_strided_inputs_and_outputs(dtype, deterministic):
    # q, k, v, dout (and the dq, dk, dv given) are transposes of (b, h, s, d) arrays
    run_case(dtype, 2, 113, 203, 6, 2, 111, seed=19, causal=True, strided=True, poison=True,
             deterministic=deterministic)


@pytest.mark.parametrize("case", [
    dict(seqlens=(1, 239), window=(17, 5)),       # most keys unseen: dk = dv = 0 there
    dict(seqlens=(239, 1), causal=True),          # most rows without keys: dq = 0 there
    dict(seqlens=(257, 64), window=(0, 0)),       # diagonal only; rows above it are empty
    dict(seqlens=(113, 203), causal=True),
], ids=["keys-unseen", "rows-empty", "diagonal", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_backward_nan_poisoned_outputs(case, deterministic):
    sq, sk = case["seqlens"]
    run_case("float16", 2, sq, sk, 2, 2, 64, seed=20, causal=case.get("causal", False),
             window=case.get("window", (-1, -1)), poison=True, deterministic=deterministic)


def test_backward_longer_sequences():
    # many key blocks and query tiles per block (atomic dQ from many blocks), causal and GQA
    run_case("bfloat16", 1, 1000, 1537, 4, 2, 64, seed=21, causal=True)


# ---- determinism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(dtype="bfloat16", seqlens=(257, 64), heads=(6, 2), d=128, causal=True),
    dict(dtype="float16", seqlens=(113, 203), heads=(4, 1), d=256, causal=False),
    dict(dtype="float32", seqlens=(239, 239), heads=(2, 2), d=59, causal=False),
], ids=["bf16-gqa-causal", "fp16-mqa-d256", "fp32-d59"])
def test_backward_deterministic_bitwise(case):
    cupy = _cupy()
    dtype = case["dtype"]
    sq, sk = case["seqlens"]
    h, hk = case["heads"]
    q, k, v, do, _ = _inputs(22, dtype, 2, sq, sk, h, hk, case["d"])
    opts = dict(causal=case["causal"], softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    qd, kd, vd, dod = (_device(x, dtype) for x in (q, k, v, do))
    out, lse = cuflash.attention(qd, kd, vd, return_lse=True, **opts)
    bits = None
    for _ in range(5):
        grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, deterministic=True, **opts)
        cur = [cupy.asnumpy(g).view(np.uint32 if dtype == "float32" else np.uint16) for g in grads]
        if bits is None:
            bits = cur
        else:
            for name, a, b in zip(("dq", "dk", "dv"), bits, cur):
                assert np.array_equal(a, b), f"{name} differs between deterministic runs"
    ref, base, _ = _reference(q, k, v, do, None, dtype, opts)
    for name, g, r, bs in zip(("dq", "dk", "dv"), grads, ref, base):
        check_grad(name, to_numpy64(g), r, bs, dtype, grad_scale(ref))


def test_backward_default_and_deterministic_agree():
    q, k, v, do, _ = _inputs(23, "float32", 2, 239, 113, 4, 2, 64)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    a = _kernels(q, k, v, do, None, "float32", opts, deterministic=False)
    b = _kernels(q, k, v, do, None, "float32", opts, deterministic=True)
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        x, y = to_numpy64(x), to_numpy64(y)
        assert np.max(np.abs(x - y)) <= 1e-5 * max(1.0, np.max(np.abs(y))), name
    # dk and dv come from the same kernel in both modes (only dQ differs): bitwise equal
    assert np.array_equal(to_numpy64(a[1]), to_numpy64(b[1]))
    assert np.array_equal(to_numpy64(a[2]), to_numpy64(b[2]))


# ---- 64-bit offsets -----------------------------------------------------------------------------------

def test_backward_64bit_offsets():
    """Batch strides above 2^31 elements for every input and output of the backward kernels."""
    cupy = _cupy()
    dtype, b, sq, sk, h, hk, d = "float16", 2, 64, 96, 2, 2, 64
    stride = 2**31 + 65536                      # elements between batches, > 2^31
    region = 16384                              # per tensor and batch, >= s * heads * d
    need = 2 * (stride + 4 * region) * 2        # two fp16 buffers
    if cupy.cuda.runtime.memGetInfo()[0] < need + (2 << 30):
        pytest.skip("not enough free GPU memory for the > 2^31-element strides")
    q, k, v, do, _ = _inputs(24, dtype, b, sq, sk, h, hk, d)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    ref, base, _ = _reference(q, k, v, do, None, dtype, opts)
    itemsize = 2
    inputs_buf = cupy.empty(stride + 4 * region, np.float16)
    grads_buf = cupy.empty(stride + 4 * region, np.float16)

    def view(buf, slot, s, heads):
        base_view = buf[slot * region:]
        return cupy.lib.stride_tricks.as_strided(
            base_view, shape=(b, s, heads, d),
            strides=(stride * itemsize, heads * d * itemsize, d * itemsize, itemsize))

    arrays = {}
    for slot, (name, x, s, heads) in enumerate((("q", q, sq, h), ("k", k, sk, hk), ("v", v, sk, hk),
                                                ("dout", do, sq, h))):
        a = view(inputs_buf, slot, s, heads)
        for bi in range(b):          # per batch: each copy is a small view (no large index in CuPy)
            a[bi][...] = cupy.asarray(x[bi].astype(np.float16))
        arrays[name] = a
    outs = {}
    for slot, (name, s, heads) in enumerate((("dq", sq, h), ("dk", sk, hk), ("dv", sk, hk))):
        a = view(grads_buf, slot, s, heads)
        for bi in range(b):
            a[bi][...] = np.nan
        outs[name] = a
    out, lse = cuflash.attention(arrays["q"], arrays["k"], arrays["v"], return_lse=True, **opts)
    cuflash.attention_backward(arrays["dout"], arrays["q"], arrays["k"], arrays["v"], out, lse, **opts, **outs)
    for name, r, bs in zip(("dq", "dk", "dv"), ref, base):
        got = np.stack([to_numpy64(outs[name][bi].copy()) for bi in range(b)])
        check_grad(name, got, r, bs, dtype, grad_scale(ref))
