"""GPU forward tests against the float64 reference with FlashAttention's rule (tests/helpers.py).

Inputs are fresh random draws each run; outputs passed through ``out=`` are poisoned with NaN first
so that an unwritten element fails. Runs on CuPy, PyTorch and JAX inputs.
"""

import logging

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import assert_fa_close, lowp_attention, randn, to_framework, to_numpy64

pytestmark = pytest.mark.gpu


def _fw(name):
    if name != "cupy":
        pytest.importorskip(name)
    if name == "jax":
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError:
            pytest.skip("JAX has no GPU backend here")
    return name


def run_case(fw, dtype, b, sq, sk, h, hk, d, *, poison=True, strided=False, seed=None, **opts):
    rng = np.random.default_rng(seed)
    q = randn(rng, (b, sq, h, d), dtype)
    k = randn(rng, (b, sk, hk, d), dtype)
    v = randn(rng, (b, sk, hk, d), dtype)
    slopes = opts.pop("alibi", None)
    if slopes == "heads":
        slopes = rng.random(h).astype(np.float32) * 0.5
    elif slopes == "batch_heads":
        slopes = rng.random((b, h)).astype(np.float32) * 0.5
    ref, ref_lse = reference.attention(q, k, v, alibi_slopes=slopes, return_lse=True, **opts)
    base = lowp_attention(q, k, v, dtype, alibi_slopes=slopes, **opts)

    if strided:  # BHSD memory viewed as BSHD (what torch users pass as x.transpose(1, 2))
        tq, tk, tv = (to_framework(np.ascontiguousarray(x.transpose(0, 2, 1, 3)), fw, dtype) for x in (q, k, v))
        tq, tk, tv = (x.transpose(0, 2, 1, 3) if fw == "cupy" else x.transpose(1, 2) for x in (tq, tk, tv))
    else:
        tq, tk, tv = (to_framework(x, fw, dtype) for x in (q, k, v))
    ts = None if slopes is None else to_framework(slopes.astype(np.float64), fw, "float32")
    kwargs = dict(opts, alibi_slopes=ts, return_lse=True)
    if poison and fw != "jax":
        out = to_framework(np.full(q.shape, np.nan), fw, dtype)
        res, lse = cuflash.attention(tq, tk, tv, out=out, **kwargs)
        assert res is out
    else:
        res, lse = cuflash.attention(tq, tk, tv, **kwargs)
    assert type(res).__module__.split(".")[0] == type(tq).__module__.split(".")[0]
    assert tuple(res.shape) == q.shape
    got = to_numpy64(res)
    assert_fa_close(got, ref, base, dtype)
    lse = to_numpy64(lse)
    assert lse.shape == (b, h, sq)
    fin = np.isfinite(ref_lse)
    assert (np.isneginf(lse) == ~fin).all(), "lse must be -inf exactly on rows with no key"
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-4, atol=1e-4)
    return got, ref


SEQLENS = [(1, 1), (113, 203), (239, 1), (1, 239), (128, 128), (257, 64), (1023, 1023)]
HEADDIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]


@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("sq,sk", SEQLENS[:6])
def test_headdims_and_seqlens_cupy_fp16(sq, sk, d):
    run_case(_fw("cupy"), "float16", 2, sq, sk, 2, 1, d, causal=(d % 2 == 0))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_torch_dtypes_long(dtype, d):
    run_case(_fw("torch"), dtype, 1, 1023, 1023, 4, 2, d, causal=True)


FEATURES = [
    dict(causal=True),
    dict(window_size=(17, 5)),
    dict(window_size=(0, 0)),
    dict(causal=True, window_size=(33, -1)),
    dict(alibi="heads"),
    dict(alibi="batch_heads", causal=True),
    dict(softcap=30.0),
    dict(softcap=5.0, softmax_scale=0.7),
    dict(softmax_scale=0.05),
]


@pytest.mark.parametrize("fw,dtype", [("torch", "float16"), ("torch", "bfloat16"), ("torch", "float32"),
                                      ("cupy", "float16"), ("cupy", "float32"), ("jax", "bfloat16")])
@pytest.mark.parametrize("feat", FEATURES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("sq,sk", [(113, 203), (239, 64)])
def test_features(fw, dtype, feat, sq, sk):
    run_case(_fw(fw), dtype, 2, sq, sk, 6, 2, 64, **dict(feat))


@pytest.mark.parametrize("fw", ["torch", "cupy"])
@pytest.mark.parametrize("hk", [1, 3, 6])
def test_gqa_mqa_strided(fw, hk):
    run_case(_fw(fw), "bfloat16", 2, 200, 300, 6, hk, 128, strided=True, causal=True)


def test_fully_masked_rows_no_nan():
    # seqlen_q > seqlen_k with causal: the first rows see no key (output 0, lse -inf)
    got, ref = run_case(_fw("cupy"), "float16", 1, 300, 100, 2, 2, 64, causal=True)
    assert (got[:, :200] == 0).all()


def test_empty_and_zero_keys_cuda():
    import cupy

    q = cupy.random.standard_normal((2, 5, 2, 32)).astype(cupy.float16)
    k = cupy.zeros((2, 0, 2, 32), cupy.float16)
    out, lse = cuflash.attention(q, k, k, return_lse=True)
    assert (out == 0).all() and bool(cupy.isneginf(lse).all())
    e = cuflash.attention(q[:0], q[:0], q[:0])
    assert e.shape == (0, 5, 2, 32)


def test_large_offsets_64bit():
    """batch*seqlen*heads*headdim past 2**31 elements: offsets must be 64-bit."""
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    b, s, h, d = 1, 2**16 + 17, 128, 256   # 2**31 + ... elements per tensor (4.3 GB in fp16)
    if free < 5 * b * s * h * d * 2:
        pytest.skip("not enough GPU memory for the 64-bit offset test")
    q = cupy.empty((b, s, h, d), cupy.float16)
    q[:] = 0.01
    # only the last query rows of the last head are checked: the kernel reads them at offsets > 2**31
    k = q[:, -64:].copy()
    k[..., -1, :] = cupy.random.standard_normal((1, 64, d)).astype(cupy.float16)
    v = cupy.random.standard_normal(k.shape).astype(cupy.float16)
    qbig = q.copy()
    qbig[:, -32:, -1] = cupy.random.standard_normal((1, 32, d)).astype(cupy.float16)
    out_big = cuflash.attention(qbig, k, v)  # seqlen_q = 65553 against 64 keys
    ref = reference.attention(cupy.asnumpy(qbig[:, -32:, -1:]).astype(np.float64),
                              cupy.asnumpy(k[..., -1:, :]).astype(np.float64),
                              cupy.asnumpy(v[..., -1:, :]).astype(np.float64))
    got = cupy.asnumpy(out_big[:, -32:, -1:]).astype(np.float64)
    np.testing.assert_allclose(got, ref, atol=1e-2)


# ---- interop: zero copy, streams, caller types -------------------------------------------------

def test_zero_copy_views():
    torch = pytest.importorskip("torch")
    from cuflash import _interop

    t = torch.randn(2, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert _interop.as_cupy(t, "torch").data.ptr == t.data_ptr()
    out = torch.empty_like(t)
    res = cuflash.attention(t, t, t, out=out)
    assert res.data_ptr() == out.data_ptr()
    jax = pytest.importorskip("jax")
    x = jax.device_put(jax.numpy.ones((1, 4, 1, 32), jax.numpy.bfloat16), jax.devices("gpu")[0])
    assert _interop.as_cupy(x, "jax").data.ptr == x.unsafe_buffer_pointer()


def test_torch_nondefault_stream_ordering():
    """Work queued on a side stream before the call must be seen by the kernel (same stream)."""
    torch = pytest.importorskip("torch")
    s = torch.cuda.Stream()
    src = torch.randn(1, 512, 4, 64, device="cuda", dtype=torch.float16)
    q = torch.full_like(src, float("nan"))
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)   # keep the side stream busy ~tens of ms
        q.copy_(src)                    # q only becomes valid after the sleep, on stream s
        out = cuflash.attention(q, src, src)
    s.synchronize()
    ref = reference.attention(*(x.float().cpu().numpy().astype(np.float64) for x in (src, src, src)))
    got = out.float().cpu().numpy()
    assert np.isfinite(got).all(), "kernel ran before the side stream's copy: wrong stream"
    np.testing.assert_allclose(got, ref, atol=1e-2)


def test_cupy_stream_honoured():
    import cupy

    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        q = cupy.random.standard_normal((1, 256, 2, 64)).astype(cupy.float16)
        out = cuflash.attention(q, q, q)
    s.synchronize()
    assert bool(cupy.isfinite(out).all())


def test_caller_types_returned():
    torch = pytest.importorskip("torch")
    t = torch.randn(1, 16, 2, 32, device="cuda", dtype=torch.float16)
    o, lse = cuflash.attention(t, t, t, return_lse=True)
    assert isinstance(o, torch.Tensor) and o.device == t.device and o.dtype == t.dtype
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32


def test_path_logged_fp32_portable(caplog):
    import cupy

    q = cupy.random.standard_normal((1, 64, 2, 64)).astype(cupy.float32)
    with caplog.at_level(logging.DEBUG, logger="cuflash"):
        cuflash.attention(q, q, q)
    assert any("forward path=portable" in r.getMessage() for r in caplog.records)


def test_disable_switches_reach_the_portable_path(caplog, monkeypatch):
    """CUFLASH_DISABLE_SM90=1 + CUFLASH_DISABLE_SM80=1 (how benchmarks time the third path): a bf16 call
    that would run on a tensor-core path takes the portable kernels, and is exact all the same."""
    from cuflash import _api

    monkeypatch.setenv("CUFLASH_DISABLE_SM90", "1")
    monkeypatch.setenv("CUFLASH_DISABLE_SM80", "1")
    _api.clear_plan_cache()
    try:
        with caplog.at_level(logging.DEBUG, logger="cuflash"):
            run_case("cupy", "bfloat16", 2, 300, 411, 4, 2, 128, causal=True)
        assert any("forward path=portable" in r.getMessage() for r in caplog.records)
    finally:
        _api.clear_plan_cache()  # (no plan recorded under the switches outlives them)
