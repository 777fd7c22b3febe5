"""GPU tests of the Hopper forward (``cuflash._launch_sm90``, ``kernels_cu/fwd_sm90.cu``).

Direct: a ``Run`` is built and ``forward_sm90`` called on it (the kernel itself, whatever the
dispatcher would choose); API: ``cuflash.attention`` on an H100 must pick this path (recorded by
wrapping ``forward_sm90``) and give the same answers. Every result is compared with the float64
reference under FlashAttention's rule (tests/helpers.py), LSE with rtol = atol = 1e-4 and -inf exactly
on rows with no key; outputs are NaN-poisoned before each call. Only on a compute-capability-9.0 GPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cuflash import reference

from .helpers import NP_DTYPES, assert_fa_close, lowp_attention, randn

cupy = pytest.importorskip("cupy")


def _sm90_ok() -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0 and cupy.cuda.Device(0).compute_capability == "90"
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _sm90_ok(), reason="needs a compute-capability-9.0 GPU")]

from cuflash import _launch_sm90  # noqa: E402

from .test_gpu_sm80 import _to64, make_case, make_run, verify  # noqa: E402

DTYPES = ("float16", "bfloat16")


def check(dtype, b, sq, sk, h, hk, d, *, expect_supported=False, tile=None, **opts):
    """Run the sm90 forward directly on fresh random inputs and compare with the reference.

    Small shapes are ones the dispatcher sends to the sm80 path (it splits the key range when the grid
    cannot fill the GPU): the kernel is called directly all the same. ``expect_supported``: also
    assert that the dispatcher would pick this path; ``tile``: a variant instead of the table's."""
    run, ref, ref_lse, base = make_case(dtype, b, sq, sk, h, hk, d, **opts)
    if expect_supported:
        assert _launch_sm90.supports(run), "the sm90 path must accept these inputs"
    _launch_sm90.forward_sm90(run, tile)
    verify(run, ref, ref_lse, base)


SEQLENS = [(1, 1), (113, 203), (239, 1), (128, 128), (129, 1000), (1023, 1023), (200, 4096)]
HEADDIMS = [32, 59, 64, 80, 96, 128, 160, 192, 224, 256]


@pytest.mark.parametrize("d", HEADDIMS)
@pytest.mark.parametrize("sq,sk", SEQLENS)
def test_headdims_seqlens(sq, sk, d):
    check("bfloat16", 2, sq, sk, 2, 2, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes_causal(dtype, d, causal):
    check(dtype, 2, 777, 1333, 3, 3, d, causal=causal)
    check(dtype, 1, 1333, 777, 2, 2, d, causal=causal)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_long_causal_many_tiles(d):
    """Many key tiles per block: the rings wrap around many times (mbarrier parities)."""
    check("bfloat16", 1, 4096, 4096, 2, 1, d, causal=True)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_dispatcher_takes_prefill(d):
    check("bfloat16", 4, 1024, 1024, 2048 // d, 2048 // d, d, causal=True, expect_supported=True)
    if d == 64:  # non-causal d64: the three-consumer tile
        check("bfloat16", 4, 1024, 1024, 32, 32, d, expect_supported=True)


@pytest.mark.parametrize("causal,sq", [(False, 700), (True, 2100), (True, 1000), (True, 300)])
def test_wide_tile_choice(causal, sq):
    """d64 takes three consumer warpgroups, short causal sequences too (the table's rule)."""
    run, ref, ref_lse, base = make_case("bfloat16", 2, sq, sq, 4, 2, 64, causal=causal)
    tile = _launch_sm90.choose(run)
    assert tile.consumers == 3
    _launch_sm90.forward_sm90(run)  # (the dispatcher would split these small grids on the sm80 path)
    verify(run, ref, ref_lse, base)


@pytest.mark.parametrize("sq", [1000, 1050])
@pytest.mark.parametrize("d,causal,wide", [(64, True, True), (64, False, True), (64, True, False), (128, True, False),
                                           (128, False, False), (256, True, False)])
def test_partial_first_block_stays_in_its_rows(sq, d, causal, wide):
    """seqlen_q not a multiple of the query block: the blocks are aligned to the end of the sequence
    (rounded up to 64 rows), so each head's first block starts before row 0 and its warpgroups there
    compute nothing (1000 rows, 192-row blocks: two of three; else one). The output is a view with guard
    rows before and after each sequence: they must stay NaN, and the rows right."""
    g = 200
    run, ref, ref_lse, base = make_case("bfloat16", 3, sq, sq, 2, 2, d, causal=causal)
    tile = _launch_sm90.SM90_WIDE_TILES[d] if wide else _launch_sm90.tile_for(d)
    buf = cupy.full((3, sq + 2 * g, 2, d), np.nan, run.out.dtype)
    run.out = buf[:, g:g + sq]
    _launch_sm90.forward_sm90(run, tile)
    verify(run, ref, ref_lse, base)
    assert bool(cupy.isnan(buf[:, :g].astype(cupy.float32)).all()), "rows before the sequence written"
    assert bool(cupy.isnan(buf[:, g + sq:].astype(cupy.float32)).all()), "rows after the sequence written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,sk,window", [(300, 500, (17, 5)), (500, 300, (64, 0)), (256, 256, (0, 0)),
                                          (700, 700, (100, -1)), (300, 300, (-1, 33))])
def test_window(dtype, d, sq, sk, window):
    check(dtype, 2, sq, sk, 2, 2, d, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("alibi", ["heads", "batch_heads"])
def test_alibi(dtype, d, alibi):
    check(dtype, 2, 300, 411, 3, 3, d, alibi=alibi, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_softcap(dtype, d):
    check(dtype, 2, 257, 300, 2, 2, d, softcap=20.0, input_scale=3.0)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
def test_softmax_scale(scale):
    check("bfloat16", 2, 200, 333, 2, 2, 128, softmax_scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hk", [(8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("sq", [130, 517])
def test_gqa_mqa(dtype, h, hk, sq):
    check(dtype, 2, sq, 600, h, hk, 128, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 160])
def test_strided_bhsd(dtype, d):
    check(dtype, 2, 300, 400, 4, 2, d, layout="bhsd")


# Kernel variants beside the table's choice (benchmarks/NOTES.md measures them): each must be exact too.
VARIANTS = {
    "persist": lambda t: replace(t, persist=True),        # d192 / d256: output staged in the Q tile
    "one-block-per-tile": lambda t: replace(t, persist=False),
    "serial": lambda t: replace(t, sched=0),
    "batched": lambda t: replace(t, sched=2),
    "overlap": lambda t: replace(t, sched=1),
    "overlap-late": lambda t: replace(t, sched=3),      # O's rescale deferred to the next turn
    "batched-late": lambda t: replace(t, sched=4),
    "overlap-pinned": lambda t: replace(t, sched=5),    # 3 with P V's wait held behind the softmax
    "no-pingpong": lambda t: replace(t, pingpong=False),
    "three-consumers": lambda t: replace(t, consumers=3, persist=True, sched=2),
    "three-consumers-1blk": lambda t: replace(t, consumers=3, persist=False, sched=2),
    "three-consumers-overlap": lambda t: replace(t, consumers=3, persist=True, sched=1),
    "three-consumers-pinned": lambda t: replace(t, consumers=3, persist=True, sched=5),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("d", [64, 128, 192, 256])
def test_variants(variant, d):
    """More work tiles than SMs (the persistent blocks fetch tiles from the atomic counter), blocks with
    no key at all (causal, seqlen_q > seqlen_k), windows and GQA, on every schedule variant."""
    if d == 192 and variant not in ("persist", "overlap"):
        pytest.skip("d192: the persistent and overlap variants only")
    if variant.startswith("three-consumers") and d > 64:
        pytest.skip("three consumer warpgroups (160 registers each) are built for head dim 64")
    tile = VARIANTS[variant](_launch_sm90.tile_for(d))
    check("bfloat16", 3, 600, 600, 12, 4, d, causal=True, tile=tile)
    check("float16", 1, 1333, 517, 2, 2, d, causal=True, tile=tile)
    check("bfloat16", 1, 500, 900, 4, 2, d, window=(100, 20), tile=tile)


@pytest.mark.parametrize("persist", [True, False])
def test_many_tiles_deterministic(persist):
    """Thousands of tiles over 132 SMs: the dynamic schedule differs run to run, the bits must not."""
    rng = np.random.default_rng()
    dtype = "bfloat16"
    q, k, v = (cupy.asarray(randn(rng, (8, 1024, 16, 64), dtype).astype(NP_DTYPES[dtype])) for _ in range(3))
    tile = replace(_launch_sm90.tile_for(64), persist=persist)
    first = None
    for _ in range(4):
        out = cupy.full(q.shape, np.nan, q.dtype)
        lse = cupy.full((8, 16, 1024), np.nan, cupy.float32)
        run = make_run(q, k, v, out, lse, dtype, causal=True)
        _launch_sm90.forward_sm90(run, tile)
        got = (cupy.asnumpy(out).view(np.uint16), cupy.asnumpy(lse))
        assert not np.isnan(got[1]).any()
        if first is None:
            first = got
        else:
            assert (got[0] == first[0]).all() and (got[1] == first[1]).all()


def test_deterministic_and_no_race():
    """Same inputs, same bits, over several runs (a race would move the result)."""
    rng = np.random.default_rng()
    dtype = "bfloat16"
    q, k, v = (cupy.asarray(randn(rng, (2, 2000, 4, 128), dtype).astype(NP_DTYPES[dtype])) for _ in range(3))
    outs = []
    for _ in range(5):
        out = cupy.full(q.shape, np.nan, q.dtype)
        lse = cupy.full((2, 4, 2000), np.nan, cupy.float32)
        run = make_run(q, k, v, out, lse, dtype, causal=True)
        _launch_sm90.forward_sm90(run)
        outs.append((cupy.asnumpy(out).view(np.uint16), cupy.asnumpy(lse)))
    for o, lse in outs[1:]:
        assert (o == outs[0][0]).all() and (lse == outs[0][1]).all()


def test_variants_cover_every_dispatch_choice():
    names = {n for _, n in _launch_sm90.variants("sm_90a")}
    for d in range(1, 257):
        for dtype in DTYPES:
            assert _launch_sm90.kernel_name(dtype, _launch_sm90.tile_for(d)) in names
    for t in _launch_sm90.SM90_WIDE_TILES.values():
        assert _launch_sm90.kernel_name("bfloat16", t) in names


@pytest.fixture
def sm90_calls(monkeypatch):
    calls = []
    original = _launch_sm90.forward_sm90

    def wrapped(run, tile=None):
        calls.append(run.headdim)
        return original(run, tile)

    monkeypatch.setattr(_launch_sm90, "forward_sm90", wrapped)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_api_picks_sm90(sm90_calls, dtype):
    """On an H100, fp16 / bf16 prefill goes to this path (with dropout too); decoding goes to the decode path."""
    import cuflash
    from cuflash import _api

    _api.clear_plan_cache()
    rng = np.random.default_rng()
    q = randn(rng, (4, 1000, 16, 128), dtype)
    k = randn(rng, (4, 1100, 4, 128), dtype)
    v = randn(rng, (4, 1100, 4, 128), dtype)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, causal=True)
    base = lowp_attention(q, k, v, dtype, causal=True)
    tq, tk, tv = (cupy.asarray(x.astype(NP_DTYPES[dtype])) for x in (q, k, v))
    for _ in range(4):  # full path, recorded call, then replays (the plan cache re-encodes the maps)
        out = cupy.full(q.shape, np.nan, NP_DTYPES[dtype])
        res, lse = cuflash.attention(tq, tk, tv, out=out, causal=True, return_lse=True)
        assert_fa_close(_to64(res), ref, base, dtype)
        np.testing.assert_allclose(cupy.asnumpy(lse), ref_lse, rtol=1e-4, atol=1e-4)
    assert len(sm90_calls) >= 2, "the sm90 path did not run (full-path calls record here; replays do not)"
    n = len(sm90_calls)
    dec = cupy.asarray(randn(rng, (4, 1, 16, 128), dtype).astype(NP_DTYPES[dtype]))
    cuflash.attention(dec, tk, tv)
    assert len(sm90_calls) == n, "decoding (decode path) must not take this one"
    cuflash.attention(tq, tk, tv, dropout_p=0.1, seed=1)
    assert len(sm90_calls) == n + 1, "dropout has DROPOUT variants on this path"


def test_replay_new_pointers(sm90_calls):
    """Replays with other buffers of the same signature re-encode the tensor maps (fresh pointers)."""
    import cuflash
    from cuflash import _api

    _api.clear_plan_cache()
    rng = np.random.default_rng()
    dtype = "bfloat16"
    for _ in range(5):
        q, k, v = (randn(rng, (4, 1000, 16, 64), dtype) for _ in range(3))
        ref = reference.attention(q, k, v)
        base = lowp_attention(q, k, v, dtype)
        res = cuflash.attention(*(cupy.asarray(x.astype(NP_DTYPES[dtype])) for x in (q, k, v)))
        assert_fa_close(_to64(res), ref, base, dtype)
    assert sm90_calls
