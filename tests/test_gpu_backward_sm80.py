"""GPU tests of the tensor-core backward (``cuflash._launch_bwd_sm80``, ``kernels_cu/bwd_sm80.cu``).

Every case goes through ``cuflash.attention_backward`` with the backward dispatcher pinned to this path
(``_launch.backward`` monkeypatched: the run must be one ``supports()`` accepts, and ``backward_sm80``
runs it), so allocation, validation and the given ``dq=``/``dk=``/``dv=`` outputs of the public function
are covered; one test builds the ``Run`` by hand as ``_api._backward_cuda`` does, and one checks that the
real dispatcher picks this path (its debug log line ``backward path=sm80``).

The comparison is tests/test_gpu_backward.py's: float64 reference gradients, FlashAttention's rule
``max|got - ref| <= 3 max|lowp - ref| + atol * scale`` against the same backward done in the input's
precision, exact zeros for rows without keys (dq) and keys no query sees (dk, dv), and outputs
NaN-poisoned before the call. Inputs use 16-byte aligned rows (head dims that are not a multiple of 8
are stored in rows padded to one), as the path requires.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import NP_DTYPES, to_numpy64
from .test_gpu_backward import _inputs, _reference, check_grad, grad_scale

cupy = pytest.importorskip("cupy")


def _gpu_ok() -> bool:
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return int(cupy.cuda.Device(0).compute_capability) >= 80
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu_ok(), reason="no CUDA GPU of compute capability 8.0+")]

from cuflash import _launch, _launch_bwd_sm80  # noqa: E402

SEQLENS = [(1, 1), (113, 203), (239, 1), (1, 239), (128, 128), (257, 64)]
BUCKETS = _launch_bwd_sm80.HEADDIM_BUCKETS


# ---- the pinned path ------------------------------------------------------------------------------------

class _Pin:
    """Records the runs that went through the sm80 backward; ``splits`` forces the deterministic split count."""

    def __init__(self):
        self.runs = []
        self.splits = None
        self.tile = None  # forces a tile (e.g. a single-stage one the H100 would not pick)

    def __call__(self, run):
        assert _launch_bwd_sm80.supports(run), "the sm80 backward must accept this run"
        run.path = "sm80"
        self.runs.append(run)
        _launch_bwd_sm80.backward_sm80(run, splits=self.splits, tile=self.tile)


@pytest.fixture
def sm80(monkeypatch):
    pin = _Pin()
    monkeypatch.setattr(_launch, "backward", pin)
    return pin


# ---- inputs in a given layout ------------------------------------------------------------------------------

def _layout_for(d: int) -> str:
    return "contig" if d % 8 == 0 else "pad"


def _dev(x, dtype, layout):
    """float64 (b, s, h, d) -> CuPy array of dtype: "contig"; "pad" (rows stored 8-aligned wide, a view of the
    first d columns); "bhsd" (a transposed view of a (b, h, s, d) array)."""
    npd = NP_DTYPES[dtype]
    b, s, h, d = x.shape
    if layout == "bhsd":
        return cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3)).astype(npd)).transpose(0, 2, 1, 3)
    if layout == "pad":
        w = -(-d // 8) * 8 + 8
        full = np.zeros((b, s, h, w), npd)
        full[..., :d] = x.astype(npd)
        return cupy.asarray(full)[..., :d]
    return cupy.asarray(x.astype(npd))


def _nan(shape, dtype, layout):
    npd = NP_DTYPES[dtype]
    b, s, h, d = shape
    if layout == "bhsd":
        return cupy.full((b, h, s, d), np.nan, npd).transpose(0, 2, 1, 3)
    if layout == "pad":
        return cupy.full((b, s, h, -(-d // 8) * 8 + 8), np.nan, npd)[..., :d]
    return cupy.full(shape, np.nan, npd)


def _kernels(q, k, v, do, slopes, dtype, opts, *, layout, deterministic=False):
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
             softmax_scale=None, deterministic=False, layout=None):
    q, k, v, do, slopes = _inputs(seed, dtype, b, sq, sk, h, hk, d, alibi)
    opts = dict(causal=causal, softmax_scale=softmax_scale, window_size=window, softcap=softcap)
    ref, base, lse_ref = _reference(q, k, v, do, slopes, dtype, opts)
    n_before = len(pin.runs)
    grads = _kernels(q, k, v, do, slopes, dtype, opts, layout=layout or _layout_for(d), deterministic=deterministic)
    assert len(pin.runs) == n_before + 1 and pin.runs[-1].path == "sm80"
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


# ---- every bucket x awkward sequence lengths x causal ------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("headdim", BUCKETS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm80_backward_matches_reference(sm80, dtype, headdim, seqlens, causal):
    sq, sk = seqlens
    run_case(sm80, dtype, 2, sq, sk, 2, 2, headdim, seed=headdim * 7 + sq + sk, causal=causal)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("headdim", sorted(_launch_bwd_sm80.TILES_SMALL_SMEM))
def test_sm80_backward_single_stage_tiles(sm80, headdim, causal, deterministic):
    # the A100's tiles for 224 / 256 (Q and dO single-buffered), forced on whatever GPU runs the test
    sm80.tile = _launch_bwd_sm80.TILES_SMALL_SMEM[headdim]
    run_case(sm80, "bfloat16", 2, 257, 333, 4, 2, headdim, seed=27, causal=causal, deterministic=deterministic)
    assert sm80.runs[-1].scratch["bwd_sm80_dq_accum"] is not None


@pytest.mark.parametrize("headdim", [1, 24, 59, 111, 200, 250])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm80_backward_padded_headdims(sm80, dtype, headdim):
    # head dims inside a bucket: zero padding in shared memory, partial 16-byte chunks at headdim
    run_case(sm80, dtype, 2, 113, 203, 2, 2, headdim, seed=headdim, causal=True)


# ---- options ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seqlens", [(113, 203), (257, 64), (1, 239), (128, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm80_backward_window(sm80, dtype, seqlens):
    sq, sk = seqlens
    run_case(sm80, dtype, 2, sq, sk, 2, 2, 64, seed=11, window=(17, 5))


@pytest.mark.parametrize("window", [(17, -1), (-1, 5), (0, 0)], ids=["left17-causal", "right5-causal", "diag"])
def test_sm80_backward_window_with_causal(sm80, window):
    run_case(sm80, "float16", 1, 239, 113, 2, 2, 64, seed=12, window=window, causal=True)


def test_sm80_backward_long_window(sm80):
    # many key blocks and query blocks, the window edges inside blocks of every kind
    run_case(sm80, "bfloat16", 1, 700, 900, 2, 1, 128, seed=25, window=(100, 37))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("alibi", ["h", "bh"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm80_backward_alibi(sm80, dtype, alibi, causal):
    run_case(sm80, dtype, 2, 113, 203, 2, 2, 64, seed=13, alibi=alibi, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm80_backward_softcap(sm80, dtype, causal):
    # scale 1 makes the raw scores large enough that tanh saturates for some pairs (1 - tanh² << 1)
    run_case(sm80, dtype, 2, 113, 203, 2, 2, 64, seed=14, softcap=30.0, softmax_scale=1.0, causal=causal)


@pytest.mark.parametrize("headdim", [96, 256])
def test_sm80_backward_softcap_alibi_window(sm80, headdim):
    run_case(sm80, "bfloat16", 2, 257, 64, 2, 2, headdim, seed=15, softcap=30.0, alibi="h", window=(17, 5))


@pytest.mark.parametrize("scale", [0.3, -0.2])
def test_sm80_backward_custom_scale(sm80, scale):
    run_case(sm80, "float16", 2, 113, 203, 2, 2, 111, seed=16, softmax_scale=scale)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(6, 2), (6, 1)], ids=["gqa6-2", "mqa6-1"])
def test_sm80_backward_gqa_mqa(sm80, heads, causal, deterministic):
    h, hk = heads
    run_case(sm80, "float16", 2, 113, 203, h, hk, 64, seed=17, causal=causal, deterministic=deterministic)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm80_backward_gqa_alibi_window_deterministic(sm80, dtype):
    run_case(sm80, dtype, 1, 257, 64, 6, 2, 59, seed=18, alibi="h", window=(17, 5), deterministic=True)


# ---- layouts, outputs, lengths -----------------------------------------------------------------------------

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm80_backward_strided_inputs_and_outputs(sm80, dtype, deterministic):
    # q, k, v, dout, out and the dq, dk, dv given are transposes of (b, h, s, d) arrays
    run_case(sm80, dtype, 2, 113, 203, 6, 2, 96, seed=19, causal=True, layout="bhsd", deterministic=deterministic)


@pytest.mark.parametrize("case", [
    dict(seqlens=(1, 239), window=(17, 5)),       # most keys unseen: dk = dv = 0 there
    dict(seqlens=(239, 1), causal=True),          # most rows without keys: dq = 0 there
    dict(seqlens=(257, 64), window=(0, 0)),       # diagonal only; rows above it are empty
    dict(seqlens=(113, 203), causal=True),
], ids=["keys-unseen", "rows-empty", "diagonal", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_sm80_backward_nan_poisoned_outputs(sm80, case, deterministic):
    sq, sk = case["seqlens"]
    run_case(sm80, "float16", 2, sq, sk, 2, 2, 64, seed=20, causal=case.get("causal", False),
             window=case.get("window", (-1, -1)), deterministic=deterministic)


@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_sm80_backward_longer_sequences(sm80, headdim):
    # many key blocks and query blocks per block (reds from many blocks), causal and GQA
    run_case(sm80, "bfloat16", 1, 1000, 1537, 4, 2, headdim, seed=21, causal=True)


# ---- determinism --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [None, 1, 2, 5], ids=["auto", "s1", "s2", "s5"])
@pytest.mark.parametrize("case", [
    dict(dtype="bfloat16", seqlens=(257, 640), heads=(6, 2), d=128, causal=True),
    dict(dtype="float16", seqlens=(300, 203), heads=(4, 1), d=256, causal=False),
    dict(dtype="float16", seqlens=(239, 700), heads=(2, 2), d=64, causal=False),
], ids=["bf16-gqa-causal-d128", "fp16-mqa-d256", "fp16-d64"])
def test_sm80_deterministic_bitwise(sm80, case, splits):
    dtype = case["dtype"]
    sq, sk = case["seqlens"]
    h, hk = case["heads"]
    sm80.splits = splits
    q, k, v, do, _ = _inputs(22, dtype, 2, sq, sk, h, hk, case["d"])
    opts = dict(causal=case["causal"], softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    qd, kd, vd, dod = (_dev(x, dtype, "contig") for x in (q, k, v, do))
    out, lse = cuflash.attention(qd, kd, vd, return_lse=True, **opts)
    bits = None
    for _ in range(5):
        grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, deterministic=True, **opts)
        cur = [cupy.asnumpy(g).view(np.uint16) for g in grads]
        if bits is None:
            bits = cur
        else:
            for name, a, b in zip(("dq", "dk", "dv"), bits, cur):
                assert np.array_equal(a, b), f"{name} differs between deterministic runs"
    if splits is not None:
        assert sm80.runs[-1].scratch["bwd_sm80_dq_accum"].shape[0] == min(splits, -(-sk // _launch_bwd_sm80.tile_for(
            case["d"]).block_n))
    ref, base, _ = _reference(q, k, v, do, None, dtype, opts)
    for name, g, r, bs in zip(("dq", "dk", "dv"), grads, ref, base):
        check_grad(name, to_numpy64(g), r, bs, dtype, grad_scale(ref))


def test_sm80_default_and_deterministic_agree(sm80):
    q, k, v, do, _ = _inputs(23, "bfloat16", 2, 239, 513, 4, 2, 128)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    a = _kernels(q, k, v, do, None, "bfloat16", opts, layout="contig", deterministic=False)
    b = _kernels(q, k, v, do, None, "bfloat16", opts, layout="contig", deterministic=True)
    x, y = to_numpy64(a[0]), to_numpy64(b[0])
    assert np.max(np.abs(x - y)) <= 2e-2 * max(1.0, np.max(np.abs(y)))  # dQ: fp32 sums in another order
    if sm80.runs[-1].arch == "sm_90a":  # the ordered mode walks from a pivot: fp32 sums in another order
        for i in (1, 2):
            x, y = to_numpy64(a[i]), to_numpy64(b[i])
            assert np.max(np.abs(x - y)) <= 2e-2 * max(1.0, np.max(np.abs(y)))
    else:  # dK and dV come from the same per-key-block code in both modes: bitwise equal
        assert np.array_equal(to_numpy64(a[1]), to_numpy64(b[1]))
        assert np.array_equal(to_numpy64(a[2]), to_numpy64(b[2]))


@pytest.mark.parametrize("planes", ["1", "2"])
@pytest.mark.parametrize("case", [
    dict(dtype="bfloat16", seqlens=(1024, 1024), heads=(2, 2), d=256, causal=False),
    dict(dtype="float16", seqlens=(700, 2000), heads=(4, 2), d=256, causal=True),
    dict(dtype="bfloat16", seqlens=(2000, 700), heads=(2, 1), d=160, causal=False),
    dict(dtype="bfloat16", seqlens=(1500, 1500), heads=(3, 3), d=96, causal=True),
], ids=["d256-square", "d256-gqa-causal-sq<sk", "d160-mqa-sq>sk", "d96-causal"])
def test_sm80_ordered_planes(sm80, monkeypatch, case, planes):
    """The ordered deterministic mode of bwd_sm80.cu (sm_90a) with one and two dq_accum planes."""
    ordered_planes_case(sm80, monkeypatch, case, planes, _launch_bwd_sm80, "bwd_sm80", seed=32)


def ordered_planes_case(pin, monkeypatch, case, planes, launcher, prefix, seed):
    """The ordered deterministic mode (bwd_common.cuh) with CUFLASH_BWD_ORDERED_PLANES = ``planes`` through
    the path ``pin`` records (``launcher``, scratch names ``prefix``_*): bitwise equal over repeated runs,
    equal to the reference, and the host's plane and counter counts."""
    from cuflash import _api

    monkeypatch.setenv("CUFLASH_BWD_ORDERED_PLANES", planes)
    _api.clear_plan_cache()  # the plan cache keys on shapes, not on the environment
    dtype = case["dtype"]
    sq, sk = case["seqlens"]
    h, hk = case["heads"]
    q, k, v, do, _ = _inputs(seed, dtype, 2, sq, sk, h, hk, case["d"])
    opts = dict(causal=case["causal"], softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    qd, kd, vd, dod = (_dev(x, dtype, "contig") for x in (q, k, v, do))
    out, lse = cuflash.attention(qd, kd, vd, return_lse=True, **opts)
    runs = []
    for _ in range(3):
        grads = cuflash.attention_backward(dod, qd, kd, vd, out, lse, deterministic=True, **opts)
        runs.append([cupy.asnumpy(g).view(np.uint16) for g in grads])
    for cur in runs[1:]:
        for name, x, y in zip(("dq", "dk", "dv"), runs[0], cur):
            assert np.array_equal(x, y), f"{name} differs between deterministic runs"
    run = pin.runs[-1]
    if run.arch != "sm_90a":
        pytest.skip("the ordered mode runs on sm_90a only")
    tile = launcher.plan(run)["tile"]
    lower = launcher.ordered_has_lower(sq, sk, 0 if case["causal"] else -1, tile.block_m, tile.block_n)
    assert lower or case["causal"]  # (causal: a lower part only where seqlen_q != seqlen_k)
    planes_used = run.scratch[f"{prefix}_dq_accum"].shape[0]
    assert planes_used == (2 if lower and planes == "2" else 1)
    assert run.scratch[f"{prefix}_counters"].size == planes_used * 2 * h * -(-sq // tile.block_m)
    ref, base, _ = _reference(q, k, v, do, None, dtype, opts)
    for name, g, r, bs in zip(("dq", "dk", "dv"), grads, ref, base):
        check_grad(name, to_numpy64(g), r, bs, dtype, grad_scale(ref))

# ---- routes into the path ----------------------------------------------------------------------------------

def test_sm80_direct_run_matches_api(sm80):
    """A Run built by hand (as _api._backward_cuda builds it) through backward_sm80 directly."""
    from cuflash import _compile

    dtype, b, sq, sk, h, hk, d = "bfloat16", 2, 200, 333, 4, 2, 128
    q, k, v, do, _ = _inputs(24, dtype, b, sq, sk, h, hk, d)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    api = _kernels(q, k, v, do, None, dtype, opts, layout="contig")
    qd, kd, vd, dod = (_dev(x, dtype, "contig") for x in (q, k, v, do))
    out, lse = cuflash.attention(qd, kd, vd, return_lse=True, **opts)
    dq, dk, dv = (_nan(x.shape, dtype, "contig") for x in (q, k, v))
    dev = cupy.cuda.Device().id
    run = _launch.Run(device_id=dev, arch=_compile.device_arch(dev), stream=cupy.cuda.get_current_stream(),
                      dtype=dtype, q=qd, k=kd, v=vd, out=out, lse=lse, dout=dod, dq=dq, dk=dk, dv=dv,
                      softmax_scale=1.0 / np.sqrt(d), window=(-1, 0), empty=lambda s, t: cupy.empty(s, t))
    assert _launch_bwd_sm80.supports(run)
    _launch_bwd_sm80.backward_sm80(run)
    cupy.cuda.get_current_stream().synchronize()
    for x, y in zip((dq, dk, dv), api):
        # the same kernels on the same inputs; dQ's fp32 reductions may add in another order
        x64, y64 = to_numpy64(x), to_numpy64(y)
        assert np.max(np.abs(x64 - y64)) <= 2e-2 * max(1.0, np.max(np.abs(y64)))


def test_sm80_not_taken_for_unsupported_runs():
    from cuflash import _compile

    dev = cupy.cuda.Device().id
    x = cupy.zeros((1, 16, 2, 64), np.float16)
    base = dict(device_id=dev, arch=_compile.device_arch(dev), stream=cupy.cuda.get_current_stream(), dtype="float16",
                q=x, k=x, v=x, out=x, lse=cupy.zeros((1, 2, 16), np.float32), dout=x, dq=x, dk=x, dv=x)
    assert _launch_bwd_sm80.supports(_launch.Run(**base))
    assert _launch_bwd_sm80.supports(_launch.Run(**{**base, "dropout_p": 0.1}))  # DROPOUT variants
    y = cupy.zeros((1, 16, 2, 64), np.float32)
    assert not _launch_bwd_sm80.supports(_launch.Run(**{**base, "dtype": "float32", "q": y, "k": y, "v": y}))
    odd = cupy.zeros((1, 16, 2, 59), np.float16)  # rows of 59 elements: not 16-byte aligned
    assert not _launch_bwd_sm80.supports(_launch.Run(**{**base, "q": odd, "k": odd, "v": odd, "out": odd,
                                                       "dout": odd, "dq": odd, "dk": odd, "dv": odd}))
    shifted = cupy.zeros(1 * 16 * 2 * 64 + 1, np.float16)[1:].reshape(1, 16, 2, 64)  # base not 16-byte aligned
    assert not _launch_bwd_sm80.supports(_launch.Run(**{**base, "dk": shifted}))


def test_dispatcher_picks_sm80(caplog):
    """The real dispatcher (no pinning) takes this path for fp16 / bf16 and says so in its debug log (head dim
    192: on compute capability 9.0, d64 / d128 / d256 take the Hopper backward, tests/test_gpu_backward_sm90.py)."""
    q, k, v, do, _ = _inputs(26, "bfloat16", 1, 64, 80, 2, 2, 192)
    qd, kd, vd, dod = (_dev(x, "bfloat16", "contig") for x in (q, k, v, do))
    out, lse = cuflash.attention(qd, kd, vd, return_lse=True)
    with caplog.at_level(logging.DEBUG, logger="cuflash"):
        cuflash.attention_backward(dod, qd, kd, vd, out, lse)
    assert any("backward path=sm80" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


# ---- 64-bit offsets ----------------------------------------------------------------------------------------

def test_sm80_backward_64bit_offsets(sm80):
    """Batch strides above 2^31 elements for every input and output of the kernels."""
    dtype, b, sq, sk, h, hk, d = "float16", 2, 64, 96, 2, 2, 64
    stride = 2**31 + 65536
    region = 16384
    need = 2 * (stride + 6 * region) * 2
    if cupy.cuda.runtime.memGetInfo()[0] < need + (2 << 30):
        pytest.skip("not enough free GPU memory for the > 2^31-element strides")
    q, k, v, do, _ = _inputs(24, dtype, b, sq, sk, h, hk, d)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    ref, base, _ = _reference(q, k, v, do, None, dtype, opts)
    inputs_buf = cupy.empty(stride + 6 * region, np.float16)
    grads_buf = cupy.empty(stride + 6 * region, np.float16)

    def view(buf, slot, s, heads):
        return cupy.lib.stride_tricks.as_strided(buf[slot * region:], shape=(b, s, heads, d),
                                                 strides=(stride * 2, heads * d * 2, d * 2, 2))

    arrays = {}
    for slot, (name, x, s, heads) in enumerate((("q", q, sq, h), ("k", k, sk, hk), ("v", v, sk, hk),
                                                ("dout", do, sq, h))):
        a = view(inputs_buf, slot, s, heads)
        for bi in range(b):
            a[bi][...] = cupy.asarray(x[bi].astype(np.float16))
        arrays[name] = a
    out = view(inputs_buf, 4, sq, h)
    outs = {}
    for slot, (name, s, heads) in enumerate((("dq", sq, h), ("dk", sk, hk), ("dv", sk, hk))):
        a = view(grads_buf, slot, s, heads)
        for bi in range(b):
            a[bi][...] = np.nan
        outs[name] = a
    out, lse = cuflash.attention(arrays["q"], arrays["k"], arrays["v"], return_lse=True, out=out, **opts)
    cuflash.attention_backward(arrays["dout"], arrays["q"], arrays["k"], arrays["v"], out, lse, **opts, **outs)
    assert sm80.runs and sm80.runs[-1].path == "sm80"
    for name, r, bs in zip(("dq", "dk", "dv"), ref, base):
        got = np.stack([to_numpy64(outs[name][bi].copy()) for bi in range(b)])
        check_grad(name, got, r, bs, "float16", grad_scale(ref))
