"""CPU tests of the public API: validation, NumPy and CPU-torch paths, empty inputs, import hygiene."""

import subprocess
import sys

import numpy as np
import pytest

import cuflash
from cuflash import reference

rng = np.random.default_rng(0)


def qkv(b=2, sq=5, sk=7, h=4, hk=2, d=8, dtype=np.float32):
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


# ---- import hygiene --------------------------------------------------------------------------

def test_import_does_not_import_frameworks():
    code = ("import sys, cuflash, cuflash.reference; "
            "bad = [m for m in ('torch', 'jax', 'cupy', 'cupy_backends') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"import cuflash imported {r.stdout.strip()} {r.stderr}"


def test_cpu_path_without_cupy():
    # Make 'import cupy' fail: the NumPy path must still work end to end.
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupy_backends'] = None\n"
            "import numpy as np, cuflash\n"
            "q = np.random.default_rng(0).standard_normal((1, 3, 2, 4)).astype(np.float32)\n"
            "o = cuflash.attention(q, q, q, causal=True)\n"
            "assert o.shape == q.shape and o.dtype == np.float32 and np.isfinite(o).all()\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_public_names():
    for name in cuflash.__all__:
        assert hasattr(cuflash, name)
    assert isinstance(cuflash.__version__, str)


# ---- NumPy path ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_matches_reference(dtype):
    q, k, v = qkv(dtype=dtype)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (2, 4, 5)
    ref, ref_lse = reference.attention_naive(q, k, v, causal=True, return_lse=True)
    tol = {np.float16: 2e-3, np.float32: 1e-6, np.float64: 1e-6}[dtype]
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)


def test_numpy_bf16_and_options():
    import ml_dtypes

    q, k, v = qkv()
    qb, kb, vb = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    slopes = rng.random(4).astype(np.float32)
    out = cuflash.attention(qb, kb, vb, window_size=(2, 1), alibi_slopes=slopes, softcap=5.0, softmax_scale=0.3)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    ref = reference.attention_naive(qb, kb, vb, window_size=(2, 1), alibi_slopes=slopes, softcap=5.0,
                                    softmax_scale=0.3)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=2e-2, rtol=2e-2)


def test_numpy_out_argument_and_noncontiguous():
    q, k, v = qkv()
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # BHSD memory, BSHD view
    out = np.full_like(q, np.nan)
    res = cuflash.attention(qt, k, v, out=out)
    assert res is out and np.isfinite(out).all()
    np.testing.assert_allclose(out, reference.attention_naive(q, k, v), atol=1e-6)


def test_numpy_backward_matches_reference():
    q, k, v = qkv(dtype=np.float64)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    rq, rk, rv = reference.attention_backward_naive(dout, q, k, v, out, lse.astype(np.float64), causal=True)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_flash_attn_func_numpy():
    q, k, v = qkv(hk=4)
    o = cuflash.flash_attn_func(q, k, v, 0.0, None, True)
    np.testing.assert_allclose(o, reference.attention_naive(q, k, v, causal=True), atol=1e-6)
    o2, lse, probs = cuflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 4, 5)


# ---- empty inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("shape_q,shape_k", [((0, 5, 4, 8), (0, 7, 2, 8)), ((2, 0, 4, 8), (2, 7, 2, 8)),
                                              ((2, 5, 4, 8), (2, 0, 2, 8))])
def test_empty_inputs(shape_q, shape_k):
    q = np.zeros(shape_q, np.float32)
    k = np.zeros(shape_k, np.float32)
    out, lse = cuflash.attention(q, k, k, return_lse=True)
    assert out.shape == shape_q and lse.shape == (shape_q[0], shape_q[2], shape_q[1])
    assert (out == 0).all() and (lse == -np.inf).all()


# ---- validation: each bad input names the argument, before anything runs ----------------------

def bad(match, exc=ValueError, **kw):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    for name in ("q", "k", "v"):
        if name in kw:
            args[name] = kw.pop(name)
    with pytest.raises(exc, match=match):
        cuflash.attention(args["q"], args["k"], args["v"], **kw)


def test_bad_shapes():
    q, k, v = qkv()
    bad(r"q must be 4-D", q=q[0])
    bad(r"k and v must have the same shape", v=v[:, :3])
    bad(r"k must have q's batch size 2, got 1", k=k[:1], v=v[:1])
    bad(r"headdim", k=k[..., :4], v=v[..., :4])
    bad(r"nheads of q \(4\) must be a multiple of nheads of k and v \(3\)",
        k=rng.standard_normal((2, 7, 3, 8)).astype(np.float32), v=rng.standard_normal((2, 7, 3, 8)).astype(np.float32))
    big = rng.standard_normal((1, 2, 1, 257)).astype(np.float32)
    bad(r"headdim must be in 1..256, got 257", q=big, k=big, v=big)


def test_bad_dtypes_and_types():
    q, k, v = qkv()
    bad(r"q must be float16, bfloat16 or float32, got int32", TypeError, q=q.astype(np.int32))
    bad(r"q, k, v must have one dtype", TypeError, k=k.astype(np.float16))
    bad(r"k must be a CuPy, NumPy, PyTorch or JAX array.*got list", TypeError, k=k.tolist())


def test_bad_options():
    bad(r"causal must be a bool", TypeError, causal=1)
    bad(r"window_size must be a pair", TypeError, window_size=3)
    bad(r"window_size left must be >= -1", window_size=(-2, 0))
    bad(r"window_size right must be an int", TypeError, window_size=(1, 0.5))
    bad(r"softcap must be >= 0", softcap=-1.0)
    bad(r"softcap must be finite", softcap=float("inf"))
    bad(r"softmax_scale must be finite", softmax_scale=float("nan"))
    bad(r"dropout_p must be < 1", dropout_p=1.0)
    bad(r"dropout_p must be >= 0", dropout_p=-0.1)
    bad(r"dropout_p must be in \[0, 1\), got nan", dropout_p=float("nan"))
    bad(r"seed must be an int", TypeError, dropout_p=0.1, seed="x")
    bad(r"seed must be in \[0, 2\*\*64\)", dropout_p=0.1, seed=-1)
    bad(r"return_lse must be a bool", TypeError, return_lse="yes")
    bad(r"num_splits must be an int >= 0", num_splits=-1)


def test_bad_alibi_and_out():
    bad(r"alibi_slopes must have shape \(nheads,\) = \(4,\) or \(batch, nheads\) = \(2, 4\), got \(3,\)",
        alibi_slopes=np.ones(3, np.float32))
    bad(r"alibi_slopes must be float32, got float64", TypeError, alibi_slopes=np.ones(4))
    bad(r"out must have shape \(2, 5, 4, 8\), got \(2, 5, 4, 7\)", out=np.empty((2, 5, 4, 7), np.float32))
    bad(r"out must have dtype float32, got float16", TypeError, out=np.empty((2, 5, 4, 8), np.float16))


def test_backward_validation():
    q, k, v = qkv()
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have shape"):
        cuflash.attention_backward(out, q, k, v, out, lse[:, :2])
    with pytest.raises(ValueError, match=r"dout must have q's shape"):
        cuflash.attention_backward(out[:, :2], q, k, v, out, lse)
    with pytest.raises(ValueError, match=r"needs the forward's seed"):
        cuflash.attention_backward(out, q, k, v, out, lse, dropout_p=0.1)


def test_validation_runs_before_anything_is_written():
    q, k, v = qkv()
    out = np.full_like(q, 7.0)
    with pytest.raises(ValueError):
        cuflash.attention(q, k, v, out=out, window_size=(-3, 0))
    assert (out == 7.0).all()


# ---- CPU torch tensors: computed by the reference, returned as torch tensors -----------------------

def test_cpu_torch_tensors():
    torch = pytest.importorskip("torch")
    q, k, v = qkv()
    for dt in (torch.float32, torch.bfloat16):
        tq, tk, tv = (torch.from_numpy(x).to(dt) for x in (q, k, v))
        out, lse = cuflash.attention(tq, tk, tv, causal=True, return_lse=True)
        assert isinstance(out, torch.Tensor) and out.dtype == dt and out.shape == tq.shape
        assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
        ref = reference.attention_naive(tq.float().numpy(), tk.float().numpy(), tv.float().numpy(), causal=True)
        tol = 1e-6 if dt == torch.float32 else 2e-2
        np.testing.assert_allclose(out.float().numpy(), ref, atol=tol, rtol=tol)


def test_mixed_frameworks_rejected():
    torch = pytest.importorskip("torch")
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"k is a torch array but q is a numpy array"):
        cuflash.attention(q, torch.from_numpy(k), v)
