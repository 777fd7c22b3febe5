"""GPU tests of the decoding forward (``cuflash._launch_decode``, ``kernels_cu/fwd_decode.cu``).

Two routes into the kernel, as in tests/test_gpu_sm80.py (whose ``make_case`` / ``verify`` these reuse):

* direct: a ``Run`` is built and ``forward_decode`` called on it (``supports`` asserted first, so
  every direct case is one the dispatcher sends here too, unless the test says otherwise);
* API: ``cuflash.attention(...)`` through the real dispatcher, which must pick this path (its debug
  log line and the launched kernel are checked).

Every result is compared with the float64 reference under FlashAttention's rule (error <= 2 x the
error of plain attention in the input precision + a small atol), LSE to 1e-4, -inf and a zero output
exactly on rows with no key; outputs are NaN-poisoned before each call.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cuflash import reference

from .helpers import NP_DTYPES, assert_fa_close, lowp_attention, randn

cupy = pytest.importorskip("cupy")


def _gpu_ok() -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu_ok(), reason="no CUDA GPU")]

from cuflash import _api, _launch, _launch_decode  # noqa: E402

from .test_gpu_sm80 import make_case, make_run, verify  # noqa: E402

DTYPES = ("float16", "bfloat16")


@pytest.fixture(autouse=True)
def _decode_on(monkeypatch):
    monkeypatch.delenv("CUFLASH_DISABLE_DECODE", raising=False)
    monkeypatch.delenv("CUFLASH_DECODE_TILE", raising=False)


def check(dtype, b, sq, sk, h, hk, d, *, tile=None, expect_splits=None, dispatched=True, **opts):
    """Run the decode forward directly on fresh random inputs and compare with the reference."""
    run, ref, ref_lse, base = make_case(dtype, b, sq, sk, h, hk, d, **opts)
    if dispatched:
        assert _launch_decode.supports(run), "the dispatcher must send these inputs to the decode path"
    plan = _launch_decode.plan(run, tile)
    if expect_splits is not None:
        assert expect_splits(plan["splits"]), plan
    _launch_decode.forward_decode(run, tile)
    verify(run, ref, ref_lse, base)
    return plan


# ---- seqlen_k x GQA group (seqlen_q 1) --------------------------------------------------------------

@pytest.mark.parametrize("sk", [1, 7, 64, 1000, 4097, 70000])
@pytest.mark.parametrize("group", [1, 4, 8, 16])
def test_group_seqlen_k(group, sk):
    dtype = DTYPES[(group + sk) % 2]
    b, hk = (1, 1) if sk > 10000 else (2, 2)
    check(dtype, b, 1, sk, hk * group, hk, 128)
    check(dtype, b, 1, sk, hk * group, hk, 128, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,group", [(2, 8), (4, 4), (16, 1), (3, 5), (5, 2), (8, 2), (7, 1)])
@pytest.mark.parametrize("sk", [7, 300, 4097])
def test_seqlen_q_above_1(dtype, sq, group, sk):
    check(dtype, 2, sq, sk, 2 * group, 2, 128)
    check(dtype, 2, sq, sk, 2 * group, 2, 128, causal=True)
    check(dtype, 1, sq, sk, group, 1, 64, window=(5, 2))


def test_rows_without_keys():
    # causal, seqlen_q > seqlen_k: the first queries see no key (output 0, LSE -inf), in every slice
    for splits in (0, 1, 3):
        check("bfloat16", 2, 6, 3, 8, 4, 128, causal=True, num_splits=splits)
        check("float16", 1, 4, 2, 16, 4, 64, causal=True, num_splits=splits)
    check("bfloat16", 1, 1, 100, 4, 4, 64, window=(0, 0), causal=True)  # only the diagonal key


# ---- head dims --------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [32, 59, 64, 96, 111, 128, 160, 192, 200, 256])
@pytest.mark.parametrize("sk", [1000, 4097])
def test_headdims(d, sk):
    dtype = DTYPES[d % 2]
    check(dtype, 2, 1, sk, 8, 2, d)
    check(dtype, 1, 2, sk, 16, 2, d, causal=True)


# ---- features ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("sq,sk", [(1, 239), (1, 4097), (4, 1000), (3, 70)])
def test_window(dtype, d, sq, sk):
    g = 4
    check(dtype, 1, sq, sk, 2 * g, 2, d, window=(17, 5))
    check(dtype, 1, sq, sk, 2 * g, 2, d, window=(17, 5), causal=True)
    check(dtype, 1, sq, sk, 2 * g, 2, d, window=(0, 0))
    check(dtype, 1, sq, sk, 2 * g, 2, d, window=(-1, 1))
    check(dtype, 1, sq, sk, 2 * g, 2, d, window=(300, -1))
    check(dtype, 1, sq, sk, 2 * g, 2, d, window=(sk - 2, 0), num_splits=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("alibi", ["heads", "batch_heads"])
def test_alibi(dtype, d, alibi):
    check(dtype, 2, 1, 1000, 8, 2, d, alibi=alibi)            # the slope differs per packed row
    check(dtype, 2, 4, 300, 8, 2, d, alibi=alibi, causal=True)
    check(dtype, 1, 1, 4097, 16, 1, d, alibi=alibi, window=(700, 0), num_splits=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_softcap(dtype, d):
    check(dtype, 2, 1, 1000, 8, 2, d, softcap=30.0, input_scale=3.0)
    check(dtype, 2, 3, 203, 8, 2, d, softcap=2.0, causal=True, input_scale=3.0)
    check(dtype, 1, 1, 4097, 4, 4, d, softcap=5.0, alibi="heads", window=(900, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
def test_softmax_scale(dtype, scale):
    check(dtype, 1, 1, 1000, 8, 2, 64, softmax_scale=scale)
    check(dtype, 1, 4, 130, 8, 2, 128, softmax_scale=scale, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 160])
def test_strided_bhsd(dtype, d):
    check(dtype, 2, 1, 3000, 8, 2, d, layout="bhsd")
    check(dtype, 2, 4, 300, 16, 4, d, layout="bhsd", causal=True)


# ---- split-KV ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("sq,sk", [(1, 239), (1, 4097), (2, 1000), (16, 64)])
def test_split_forced(dtype, splits, sq, sk):
    g = 8 if sq <= 2 else 1
    plan = check(dtype, 1, sq, sk, 2 * g, 2, 128, num_splits=splits, causal=(splits % 2 == 1))
    assert plan["splits"] == min(splits, plan["n_tiles"])


@pytest.mark.parametrize("d", [64, 128, 256])
def test_split_heuristic(d):
    # seqlen_q = 1 against long keys: few (batch, kv head) blocks, so the heuristic splits the keys
    check("bfloat16", 1, 1, 16384, 32, 8, d, expect_splits=lambda s: s > 1)
    check("float16", 4, 1, 8192, 32, 8, d, expect_splits=lambda s: s > 1)
    check("bfloat16", 1, 1, 70000, 16, 2, d, window=(5000, 0), alibi="heads", expect_splits=lambda s: s > 1)


# ---- split-KV merged in a cluster (sm_90+) ------------------------------------------------------------

def _clusters_here() -> bool:
    from cuflash import _compile

    return _launch_decode.cluster_arch(_compile.device_arch(0))


needs_clusters = pytest.mark.skipif(not _gpu_ok() or not _clusters_here(), reason="clusters need sm_90+")


@needs_clusters
@pytest.mark.parametrize("cluster", [2, 4, 8, 16])
@pytest.mark.parametrize("d", [64, 96, 128, 200, 256])
def test_cluster_forced(cluster, d):
    """num_splits = a cluster size: the slices merge in the kernel (no partials, no fwd_combine)."""
    limit = _launch_decode._device_limits(0)[1]
    tile = _launch_decode.tile_for(d, limit)
    if cluster not in _launch_decode.cluster_sizes(tile):
        pytest.skip(f"{tile} does not run clusters of {cluster}")
    want = lambda s: s == cluster  # noqa: E731
    for dtype in DTYPES:
        plan = check(dtype, 2, 1, 4097, 16, 2, d, num_splits=cluster, expect_splits=want)
        assert plan["cluster"] == cluster and plan["grid"][0] == cluster, plan
        check(dtype, 1, 2, 1000, 12, 2, d, num_splits=cluster, causal=True, alibi="heads", expect_splits=want)
    check("bfloat16", 1, 1, 3000, 8, 1, d, num_splits=cluster, softcap=30.0, window=(1500, 0), expect_splits=want)
    # cluster + 1 key tiles: slices of 2 tiles, the last one short and for 8 / 16 the last few empty
    # (LSE -inf: weight 0 in the merge)
    sk = (cluster + 1) * tile.block_n - 5
    plan = check("float16", 1, 2, sk, 8, 4, d, num_splits=cluster, expect_splits=want)
    assert plan["n_tiles"] == cluster + 1


@needs_clusters
def test_cluster_heuristic_and_switch(monkeypatch):
    # batch 1, 8 kv heads, 4k keys, d128: 8 blocks without splitting -> 16 slices, one cluster each
    plan = check("bfloat16", 1, 1, 4096, 32, 8, 128)
    assert plan["cluster"] == 16 and plan["splits"] == 16, plan
    plan = check("float16", 4, 1, 4096, 32, 8, 128)
    assert plan["cluster"] == 4, plan
    plan = check("bfloat16", 1, 1, 100000, 8, 1, 128)  # one kv head: more slices than a cluster holds
    assert plan["cluster"] == 1 and plan["splits"] > 16, plan
    plan = check("bfloat16", 1, 1, 4096, 32, 8, 256)  # one block per SM: clusters of at most 8
    assert plan["cluster"] in (1, 2, 4, 8), plan
    monkeypatch.setenv("CUFLASH_DECODE_CLUSTER", "0")
    plan = check("bfloat16", 1, 1, 4096, 32, 8, 128)
    assert plan["cluster"] == 1 and plan["splits"] > 1, plan


# ---- other tiles than the dispatcher's on this GPU (small-smem GPUs' tiles, 32 keys per warp, ...) ----

@pytest.mark.parametrize("tile", [
    _launch_decode.DecodeTile(128, 2, 4), _launch_decode.DecodeTile(128, 4, 3, 32),
    _launch_decode.DecodeTile(64, 8, 2), _launch_decode.DecodeTile(64, 1, 6, 32),
    _launch_decode.DecodeTile(192, 2, 3, 16, False), _launch_decode.DecodeTile(256, 1, 5, 16, False),
    _launch_decode.DecodeTile(256, 2, 4, 16, False), _launch_decode.DecodeTile(128, 4, 2, 16, False),
], ids=repr)
def test_other_tiles(tile):
    d = min(tile.headdim_bucket, 200)
    for splits in (0, 1, 5):
        check("bfloat16", 2, 1, 3001, 16, 2, d, tile=tile, num_splits=splits)
        check("float16", 1, 3, 500, 8, 2, d, tile=tile, num_splits=splits, causal=True, alibi="heads")  # 12 rows


def test_more_rows_than_one_block():
    """The kernel also takes more than 16 rows per kv head (several row blocks, each reading K/V): not
    dispatched (the sm80 path packs those), but correct."""
    check("bfloat16", 2, 1, 1000, 32, 1, 128, dispatched=False)
    check("float16", 1, 3, 500, 24, 2, 64, dispatched=False, causal=True, num_splits=3)


# ---- through the public API ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_api_dispatches_here(dtype, caplog, monkeypatch):
    import cuflash

    monkeypatch.setattr(_api, "_FASTPATH", False)
    rng = np.random.default_rng()
    q = randn(rng, (2, 1, 32, 128), dtype)
    k = randn(rng, (2, 5000, 8, 128), dtype)
    v = randn(rng, (2, 5000, 8, 128), dtype)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    base = lowp_attention(q, k, v, dtype)
    tq, tk, tv = (cupy.asarray(x.astype(NP_DTYPES[dtype])) for x in (q, k, v))
    out = cupy.full(q.shape, np.nan, NP_DTYPES[dtype])
    with caplog.at_level(logging.DEBUG, logger="cuflash"):
        res, lse = cuflash.attention(tq, tk, tv, out=out, return_lse=True)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("forward path=decode" in m for m in msgs), msgs
    assert any("launch cuflash::fwd_decode" in m for m in msgs), msgs  # fwd_decode< or fwd_decode_cluster<
    assert res is out
    assert_fa_close(cupy.asnumpy(res.astype(cupy.float32)).astype(np.float64), ref, base, dtype)
    np.testing.assert_allclose(cupy.asnumpy(lse), ref_lse, rtol=1e-4, atol=1e-4)


def test_api_path_and_switch(monkeypatch):
    """run.path is "decode" for decoding shapes; CUFLASH_DISABLE_DECODE=1 sends them elsewhere; the
    plan cache replays the decode launches (bit-identical to the full path)."""
    import cuflash

    seen = []
    original = _launch.forward

    def forward(run):
        original(run)
        seen.append(run.path)

    monkeypatch.setattr(_launch, "forward", forward)
    monkeypatch.setattr(_api, "_FASTPATH", True)
    _api.clear_plan_cache()
    rng = np.random.default_rng(3)
    q, k, v = (cupy.asarray(rng.standard_normal(s).astype(np.float16))
               for s in ((1, 1, 32, 128), (1, 4096, 8, 128), (1, 4096, 8, 128)))
    outs = [cuflash.attention(q, k, v) for _ in range(4)]  # full, recorded, replayed x 2
    assert seen == ["decode", "decode"], seen
    for o in outs[1:]:
        assert bool(cupy.array_equal(o, outs[0]))
    monkeypatch.setenv("CUFLASH_DISABLE_DECODE", "1")
    _api.clear_plan_cache()
    other = cuflash.attention(q, k, v)
    assert seen[-1] in ("sm80", "sm90"), seen
    assert float(cupy.abs(other.astype(cupy.float32) - outs[0].astype(cupy.float32)).max()) < 2e-2
    _api.clear_plan_cache()


def test_dropout_goes_elsewhere(monkeypatch):
    import cuflash

    seen = []
    original = _launch.forward

    def forward(run):
        original(run)
        seen.append(run.path)

    monkeypatch.setattr(_launch, "forward", forward)
    monkeypatch.setattr(_api, "_FASTPATH", False)
    q, k, v = (cupy.ones(s, cupy.float16) for s in ((1, 1, 8, 64), (1, 300, 2, 64), (1, 300, 2, 64)))
    cuflash.attention(q, k, v, dropout_p=0.2, seed=1)
    assert seen == ["sm80"]


# ---- determinism --------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [0, 1, 6, 8])
def test_deterministic(splits):
    """Same inputs, same bits, over several runs (a race in the ring or the merge would move them)."""
    rng = np.random.default_rng(0)
    dtype = "bfloat16"
    q = cupy.asarray(randn(rng, (2, 1, 32, 128), dtype).astype(NP_DTYPES[dtype]))
    k = cupy.asarray(randn(rng, (2, 20000, 8, 128), dtype).astype(NP_DTYPES[dtype]))
    v = cupy.asarray(randn(rng, (2, 20000, 8, 128), dtype).astype(NP_DTYPES[dtype]))
    outs = []
    for _ in range(4):
        out = cupy.full(q.shape, np.nan, q.dtype)
        lse = cupy.full((2, 32, 1), np.nan, cupy.float32)
        _launch_decode.forward_decode(make_run(q, k, v, out, lse, dtype, num_splits=splits))
        outs.append((cupy.asnumpy(out.view(cupy.uint16)), cupy.asnumpy(lse)))
    for o, l in outs[1:]:
        assert (o == outs[0][0]).all() and (l == outs[0][1]).all()


def test_variants_cover_every_dispatch_choice():
    from cuflash import _compile

    here = {n for _, n in _launch_decode.variants(_compile.device_arch(0))}
    limit = _launch_decode._device_limits(0)[1]
    for d in range(1, 257):
        for dtype in DTYPES:
            tile = _launch_decode.tile_for(d, limit)
            assert _launch_decode.kernel_name(dtype, tile) in here
            if _clusters_here():
                for c in _launch_decode.cluster_sizes(tile, _launch_decode.plan_blocks_per_sm(tile, 0)):
                    assert _launch_decode.kernel_name(dtype, tile, c) in here
