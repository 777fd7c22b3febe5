"""GPU tests of the Hopper backward (``cuflash._launch_bwd_sm90``, ``kernels_cu/bwd_sm90.cu``); H100 / H200 only.

Every gradient case goes through ``cuflash.attention_backward`` with the backward dispatcher pinned to this
path (``_launch.backward`` monkeypatched: the run must be one ``supports()`` accepts, and ``backward_sm90``
runs it), compared with the float64 reference by tests/test_gpu_backward.py's rule (max error <= 3 x the
error of the same backward in the input precision + atol), with outputs NaN-poisoned before the call, exact
zeros for rows without keys (dq) and keys no query sees (dk, dv). One test checks that the real dispatcher
picks this path (``run.path == "sm90"`` and its debug log line).

Quick: small shapes, a few dozen cases, four kernels to compile (the GPU machine compiles them in seconds).
Run: ``python -m pytest -q tests/test_gpu_backward_sm90.py`` (``-x`` to stop at the first failure; the first
tests are the simplest shapes, so a broken kernel shows up in ``test_sm90_bwd_basic`` first).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import to_numpy64
from .test_gpu_backward import _inputs, _reference, check_grad, grad_scale

cupy = pytest.importorskip("cupy")


def _hopper() -> bool:
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return str(cupy.cuda.Device(0).compute_capability) == "90"
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _hopper(), reason="no CUDA GPU of compute capability 9.0")]

from cuflash import _launch, _launch_bwd_sm90  # noqa: E402

from .test_gpu_backward_sm80 import _dev, _nan, ordered_planes_case  # noqa: E402


class _Pin:
    """Records the runs that went through the sm90 backward; ``splits`` forces the deterministic split count."""

    def __init__(self):
        self.runs = []
        self.splits = None

    def __call__(self, run):
        assert _launch_bwd_sm90.supports(run), "the sm90 backward must accept this run"
        run.path = "sm90"
        self.runs.append(run)
        _launch_bwd_sm90.backward_sm90(run, splits=self.splits)


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.delenv("CUFLASH_BWD_SM90_MODE", raising=False)
    pin = _Pin()
    monkeypatch.setattr(_launch, "backward", pin)
    return pin


def _grads(q, k, v, do, slopes, dtype, opts, *, layout="contig", deterministic=False):
    qd, kd, vd, dod = (_dev(x, dtype, layout) for x in (q, k, v, do))
    sl = None if slopes is None else cupy.asarray(slopes)
    out = _nan(q.shape, dtype, layout)
    out, lse = cuflash.attention(qd, kd, vd, alibi_slopes=sl, return_lse=True, out=out, **opts)
    given = dict(dq=_nan(q.shape, dtype, layout), dk=_nan(k.shape, dtype, layout), dv=_nan(v.shape, dtype, layout))
    grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, alibi_slopes=sl, deterministic=deterministic,
                                       **opts, **given)
    assert all(g is given[n] for g, n in zip(grads, ("dq", "dk", "dv")))
    return grads


def run_case(pin, dtype, b, sq, sk, h, hk, d, *, seed=0, causal=False, window=(-1, -1), alibi=None, softcap=0.0,
             softmax_scale=None, deterministic=False, layout="contig"):
    q, k, v, do, slopes = _inputs(seed, dtype, b, sq, sk, h, hk, d, alibi)
    opts = dict(causal=causal, softmax_scale=softmax_scale, window_size=window, softcap=softcap)
    ref, base, lse_ref = _reference(q, k, v, do, slopes, dtype, opts)
    n_before = len(pin.runs)
    grads = _grads(q, k, v, do, slopes, dtype, opts, layout=layout, deterministic=deterministic)
    assert len(pin.runs) == n_before + 1 and pin.runs[-1].path == "sm90"
    got = [to_numpy64(g) for g in grads]
    for name, g, r, bs in zip(("dq", "dk", "dv"), got, ref, base):
        check_grad(name, g, r, bs, dtype, grad_scale(ref))
    empty_rows = np.isneginf(lse_ref)  # (b, h, sq)
    if empty_rows.any():
        assert (got[0].transpose(0, 2, 1, 3)[empty_rows] == 0).all(), "dq of rows without keys must be exactly 0"
    w = reference.normalize_window(window, causal)
    keep = reference.keep_mask(np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk, w)
    unseen = ~keep.any(axis=0)
    if unseen.any():
        assert (got[1][:, unseen] == 0).all(), "dk of keys that no query sees must be exactly 0"
        assert (got[2][:, unseen] == 0).all(), "dv of keys that no query sees must be exactly 0"
    return got


# ---- the simplest shapes first (a broken kernel fails here) ------------------------------------------------

HEADDIMS = [64, 128, 256]  # the buckets (d256: 64-key blocks, dK / dV split by head-dim halves)

@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm90_bwd_basic(sm90, dtype, headdim):
    # one key block, one / two query blocks, no masking at all
    run_case(sm90, dtype, 1, 128, 128, 1, 1, headdim, seed=1)


SEQLENS = [(1, 1), (77, 300), (300, 77), (128, 128), (257, 520)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm90_bwd_matches_reference(sm90, dtype, headdim, seqlens, causal):
    sq, sk = seqlens
    run_case(sm90, dtype, 2, sq, sk, 2, 2, headdim, seed=headdim + sq + sk, causal=causal)


@pytest.mark.parametrize("headdim", [40, 56, 104, 120, 232, 248])
def test_sm90_bwd_padded_headdims(sm90, headdim):
    # head dims below the bucket: TMA zero-fills the columns, the epilogue clips them
    run_case(sm90, "bfloat16", 2, 113, 203, 2, 2, headdim, seed=headdim, causal=True)


# ---- options -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("window", [(17, 5), (17, -1), (-1, 5), (0, 0)], ids=["17-5", "left17", "right5", "diag"])
def test_sm90_bwd_window(sm90, headdim, window):
    run_case(sm90, "float16", 1, 239, 300, 2, 2, headdim, seed=11, window=window)


def test_sm90_bwd_window_with_causal(sm90):
    run_case(sm90, "bfloat16", 1, 300, 113, 2, 2, 64, seed=12, window=(17, -1), causal=True)


def test_sm90_bwd_long_window(sm90):
    run_case(sm90, "bfloat16", 1, 700, 900, 2, 1, 128, seed=25, window=(100, 37))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("alibi", ["h", "bh"])
@pytest.mark.parametrize("headdim", HEADDIMS)
def test_sm90_bwd_alibi(sm90, headdim, alibi, causal):
    run_case(sm90, "bfloat16", 2, 113, 203, 2, 2, headdim, seed=13, alibi=alibi, causal=causal)


@pytest.mark.parametrize("headdim", [128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm90_bwd_softcap(sm90, dtype, causal, headdim):
    run_case(sm90, dtype, 2, 113, 203, 2, 2, headdim, seed=14, softcap=30.0, softmax_scale=1.0, causal=causal)


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_sm90_bwd_softcap_alibi_window(sm90, headdim):
    run_case(sm90, "bfloat16", 2, 257, 64, 2, 2, headdim, seed=15, softcap=30.0, alibi="h", window=(17, 5))


@pytest.mark.parametrize("scale", [0.3, -0.2])
def test_sm90_bwd_custom_scale(sm90, scale):
    run_case(sm90, "float16", 2, 113, 203, 2, 2, 64, seed=16, softmax_scale=scale)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(6, 2), (6, 1)], ids=["gqa6-2", "mqa6-1"])
@pytest.mark.parametrize("headdim", [128, 256])
def test_sm90_bwd_gqa_mqa(sm90, headdim, heads, causal, deterministic):
    h, hk = heads
    run_case(sm90, "bfloat16", 2, 113, 300, h, hk, headdim, seed=17, causal=causal, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_sm90_bwd_strided_inputs_and_outputs(sm90, deterministic):
    # q, k, v, dout, out and the dq, dk, dv given are transposes of (b, h, s, d) arrays
    run_case(sm90, "float16", 2, 113, 203, 6, 2, 64, seed=19, causal=True, layout="bhsd",
             deterministic=deterministic)


@pytest.mark.parametrize("case", [
    dict(seqlens=(1, 239), window=(17, 5)),       # most keys unseen: dk = dv = 0 there
    dict(seqlens=(239, 1), causal=True),          # most rows without keys: dq = 0 there
    dict(seqlens=(257, 64), window=(0, 0)),       # diagonal only; rows above it are empty
], ids=["keys-unseen", "rows-empty", "diagonal"])
@pytest.mark.parametrize("headdim", HEADDIMS)
def test_sm90_bwd_nan_poisoned_outputs(sm90, case, headdim):
    sq, sk = case["seqlens"]
    run_case(sm90, "float16", 2, sq, sk, 2, 2, headdim, seed=20, causal=case.get("causal", False),
             window=case.get("window", (-1, -1)))


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_sm90_bwd_longer_sequences(sm90, headdim):
    # many key blocks and query blocks per block (reds from many blocks), causal and GQA
    run_case(sm90, "bfloat16", 1, 1000, 1537, 4, 2, headdim, seed=21, causal=True)


# ---- determinism ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [None, 1, 3], ids=["auto", "s1", "s3"])
@pytest.mark.parametrize("case", [
    dict(dtype="bfloat16", seqlens=(257, 640), heads=(6, 2), d=128, causal=True),
    dict(dtype="float16", seqlens=(300, 520), heads=(2, 2), d=64, causal=False),
    dict(dtype="bfloat16", seqlens=(300, 520), heads=(4, 2), d=256, causal=True),
], ids=["bf16-gqa-causal-d128", "fp16-d64", "bf16-gqa-causal-d256"])
def test_sm90_deterministic_bitwise(sm90, case, splits):
    dtype = case["dtype"]
    sq, sk = case["seqlens"]
    h, hk = case["heads"]
    sm90.splits = splits
    q, k, v, do, _ = _inputs(22, dtype, 2, sq, sk, h, hk, case["d"])
    opts = dict(causal=case["causal"], softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    qd, kd, vd, dod = (_dev(x, dtype, "contig") for x in (q, k, v, do))
    out, lse = cuflash.attention(qd, kd, vd, return_lse=True, **opts)
    bits = None
    for _ in range(3):
        grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, deterministic=True, **opts)
        cur = [cupy.asnumpy(g).view(np.uint16) for g in grads]
        if bits is None:
            bits = cur
        else:
            for name, a, b in zip(("dq", "dk", "dv"), bits, cur):
                assert np.array_equal(a, b), f"{name} differs between deterministic runs"
    assert sm90.runs[-1].path == "sm90"
    if splits is not None:
        bn = _launch_bwd_sm90.tile_for(case["d"]).block_n
        assert sm90.runs[-1].scratch["bwd_sm90_dq_accum"].shape[0] == min(splits, -(-sk // bn))
    ref, base, _ = _reference(q, k, v, do, None, dtype, opts)
    for name, g, r, bs in zip(("dq", "dk", "dv"), grads, ref, base):
        check_grad(name, to_numpy64(g), r, bs, dtype, grad_scale(ref))


@pytest.mark.parametrize("planes", ["1", "2"])
@pytest.mark.parametrize("case", [
    dict(dtype="bfloat16", seqlens=(1024, 1024), heads=(4, 4), d=64, causal=False),
    dict(dtype="bfloat16", seqlens=(700, 2000), heads=(4, 2), d=128, causal=False),
    dict(dtype="float16", seqlens=(2000, 700), heads=(2, 1), d=128, causal=False),
    dict(dtype="float16", seqlens=(2000, 700), heads=(2, 1), d=64, causal=True),
    dict(dtype="bfloat16", seqlens=(1500, 1500), heads=(3, 3), d=128, causal=True),
    dict(dtype="bfloat16", seqlens=(640, 3000), heads=(2, 2), d=64, causal=True),
    dict(dtype="bfloat16", seqlens=(700, 1200), heads=(4, 2), d=256, causal=False),
    dict(dtype="float16", seqlens=(1000, 1000), heads=(2, 2), d=256, causal=True),
    dict(dtype="bfloat16", seqlens=(1100, 400), heads=(2, 1), d=256, causal=True),
], ids=["d64-square", "d128-gqa-sq<sk", "d128-sq>sk", "d64-causal-sq>sk", "d128-causal", "d64-causal-sq<sk",
        "d256-gqa-sq<sk", "d256-causal", "d256-causal-sq>sk"])
def test_sm90_ordered_planes(sm90, monkeypatch, case, planes):
    """The ordered deterministic mode with one and two dq_accum planes (bwd_sm90.cu's header)."""
    ordered_planes_case(sm90, monkeypatch, case, planes, _launch_bwd_sm90, "bwd_sm90", seed=31)

def test_sm90_default_and_deterministic_agree(sm90):
    q, k, v, do, _ = _inputs(23, "bfloat16", 2, 239, 513, 4, 2, 128)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    a = _grads(q, k, v, do, None, "bfloat16", opts, deterministic=False)
    b = _grads(q, k, v, do, None, "bfloat16", opts, deterministic=True)
    x, y = to_numpy64(a[0]), to_numpy64(b[0])
    assert np.max(np.abs(x - y)) <= 2e-2 * max(1.0, np.max(np.abs(y)))  # dQ: fp32 sums in another order
    # dK and dV: the same per-key-block code, but the ordered deterministic mode walks the query blocks
    # from a pivot (MODE_ORDERED): fp32 sums in another order, equal up to rounding
    for i in (1, 2):
        x, y = to_numpy64(a[i]), to_numpy64(b[i])
        assert np.max(np.abs(x - y)) <= 2e-2 * max(1.0, np.max(np.abs(y)))


# ---- routes into the path ---------------------------------------------------------------------------------------

def test_dispatcher_picks_sm90(monkeypatch, caplog):
    """The real dispatcher (no pinning) takes this path for fp16 / bf16 d64 / d128 / d256 on the H100."""
    monkeypatch.delenv("CUFLASH_DISABLE_SM90", raising=False)
    monkeypatch.delenv("CUFLASH_DISABLE_SM90_BWD", raising=False)
    monkeypatch.delenv("CUFLASH_BWD_SM90_MODE", raising=False)
    seen = []
    real = _launch_bwd_sm90.backward_sm90

    def spy(run, *a, **kw):
        seen.append(run.path)
        return real(run, *a, **kw)

    monkeypatch.setattr(_launch_bwd_sm90, "backward_sm90", spy)
    for d in (64, 128, 256):
        q, k, v, do, _ = _inputs(26, "bfloat16", 1, 200, 333, 2, 2, d)
        qd, kd, vd, dod = (_dev(x, "bfloat16", "contig") for x in (q, k, v, do))
        out, lse = cuflash.attention(qd, kd, vd, return_lse=True, causal=True)
        with caplog.at_level(logging.DEBUG, logger="cuflash"):
            grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, causal=True)
        opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
        ref, base, _ = _reference(q, k, v, do, None, "bfloat16", opts)
        for name, g, r, bs in zip(("dq", "dk", "dv"), grads, ref, base):
            check_grad(name, to_numpy64(g), r, bs, "bfloat16", grad_scale(ref))
    assert seen == ["sm90", "sm90", "sm90"]
    assert any("backward path=sm90" in r.getMessage() for r in caplog.records)


def test_sm90_not_taken_for_other_runs():
    from cuflash import _compile

    dev = cupy.cuda.Device().id
    arch = _compile.device_arch(dev)
    assert arch == "sm_90a"

    def run(d=64, dtype="float16", **kw):
        npd = {"float16": np.float16, "float32": np.float32}[dtype]
        x = cupy.zeros((1, 16, 2, d), npd)
        base = dict(device_id=dev, arch=arch, stream=cupy.cuda.get_current_stream(), dtype=dtype, q=x, k=x, v=x,
                    out=x, lse=cupy.zeros((1, 2, 16), np.float32), dout=x, dq=x, dk=x, dv=x)
        return _launch.Run(**{**base, **kw})

    assert _launch_bwd_sm90.supports(run()) and _launch_bwd_sm90.supports(run(128))
    assert _launch_bwd_sm90.supports(run(dropout_p=0.1)) and _launch_bwd_sm90.supports(run(128, dropout_p=0.1))
    # dropout with softcap / ALiBi at d64: the sm80 path (that variant has no transform code)
    assert not _launch_bwd_sm90.supports(run(dropout_p=0.1, softcap=5.0))
    assert _launch_bwd_sm90.supports(run(128, dropout_p=0.1, softcap=5.0))
    for d in (32, 96, 192):                                              # other buckets: the sm80 path
        assert not _launch_bwd_sm90.supports(run(d)), d
    assert _launch_bwd_sm90.supports(run(256)) and _launch_bwd_sm90.supports(run(232))
    assert not _launch_bwd_sm90.supports(run(256, dropout_p=0.1))        # d256 dropout: the sm80 path
    assert not _launch_bwd_sm90.supports(run(dtype="float32"))
    shifted = cupy.zeros(1 * 16 * 2 * 64 + 1, np.float16)[1:].reshape(1, 16, 2, 64)  # base not 16-byte aligned
    assert not _launch_bwd_sm90.supports(run(q=shifted))


def test_sm90_debug_modes_run(sm90, monkeypatch):
    """The debugging MODE variants launch and finish (their results are wrong by design)."""
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    for m, d in ((1, 128), (2, 128), (3, 128), (4, 128), (1, 256), (2, 256), (3, 256)):
        # a shape per mode: the API's plan cache keys on shapes, not on the environment
        q, k, v, do, _ = _inputs(27, "bfloat16", 1, 300 + m + d, 300, 2, 2, d)
        monkeypatch.setenv("CUFLASH_BWD_SM90_MODE", str(m))
        grads = _grads(q, k, v, do, None, "bfloat16", opts)
        if m == 4:  # the experimental overlapped schedule: correct results
            ref, base, _ = _reference(q, k, v, do, None, "bfloat16", opts)
            for name, g, r, bs in zip(("dq", "dk", "dv"), grads, ref, base):
                check_grad(name, to_numpy64(g), r, bs, "bfloat16", grad_scale(ref))
        cupy.cuda.get_current_stream().synchronize()
        assert sm90.runs[-1].path == "sm90"
