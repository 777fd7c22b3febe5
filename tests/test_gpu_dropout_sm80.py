"""GPU tests of dropout on the tensor-core paths (``fwd_sm80.cu`` / ``bwd_sm80.cu``, DROPOUT variants).

fp16 / bf16 runs with dropout_p > 0 take the sm80 forward and backward; every test here checks the
dispatcher's debug log (``forward path=sm80`` / ``backward path=sm80``) so that a silent fallback to the
portable kernels cannot pass. (While DEBUG logging is on, every call takes the full path, never a
recorded plan.)

* The mask itself: q = 0 makes P uniform over the keys and one-hot V rows spell it in the output
  (out[..., j] = Z_ij / ((1 - p) seqlen_k), exactly 0 where dropped), compared bit for bit with
  ``reference.dropout_mask`` (the portable kernels' mask): every head-dim bucket, GQA unpacked and packed
  (decode), split-KV; and through the gradients (dV and dQ spell it, as in
  tests/test_gpu_dropout_backward.py's fp32 test).
* Outputs against the float64 reference with the same mask (FlashAttention's rule with the dtype's own
  no-dropout error carried over, as tests/test_gpu_dropout.py), including packed-GQA decode with splits.
* Gradients against the reference with the same mask (tests/test_gpu_dropout_backward.py's
  ``run_dropout_case``: its rule, exact zeros), atomic and deterministic dQ, GQA, causal / window /
  softcap / ALiBi; deterministic mode bitwise reproducible, another seed another result.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import NP_DTYPES, assert_fa_close, lowp_attention, randn, to_numpy64
from .test_gpu_backward import _inputs
from .test_gpu_dropout_backward import P, SEEDS, _bits, _forward_backward, mask_probe_inputs, run_dropout_case

cupy = pytest.importorskip("cupy")

from cuflash import _config, _launch_bwd_sm80, _launch_sm80  # noqa: E402

from .test_gpu_backward_sm80 import sm80  # noqa: E402, F401  (fixture: the backward pinned to this path)


def _gpu_ok() -> bool:
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return int(cupy.cuda.Device(0).compute_capability) >= 80
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu_ok(), reason="no CUDA GPU of compute capability 8.0+")]

DTYPES = ("float16", "bfloat16")
HEADDIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)


@contextlib.contextmanager
def on_sm80(caplog, forward=True, backward=False, fwd_path="sm80"):
    """Run the block with cuflash's DEBUG log captured; then the forward must have taken ``fwd_path`` (sm80:
    the Hopper forward is switched off for the block, so that H100s test this path too; sm90:
    tests/test_gpu_dropout_sm90.py) and the backward, where asked, the sm80 path."""
    caplog.clear()
    saved = os.environ.get("CUFLASH_DISABLE_SM90")
    if fwd_path == "sm80":
        os.environ["CUFLASH_DISABLE_SM90"] = "1"
    try:
        with caplog.at_level(logging.DEBUG, logger="cuflash"):
            yield
    finally:
        if saved is None:
            os.environ.pop("CUFLASH_DISABLE_SM90", None)
        else:
            os.environ["CUFLASH_DISABLE_SM90"] = saved
    msgs = [r.getMessage() for r in caplog.records]
    if forward:
        assert any(f"forward path={fwd_path}" in m for m in msgs), msgs[:20]
        assert not any("forward path=portable" in m for m in msgs), msgs[:20]
    if backward:
        assert any("backward path=sm80" in m for m in msgs), msgs[:20]
        assert not any("backward path=portable" in m for m in msgs), msgs[:20]


# ---- the mask, read through the output ----------------------------------------------------------------

def sm80_mask(caplog, seed, b, h, sq, sk, p, dtype, hk=None, num_splits=0, fwd_path="sm80"):
    """The forward's keep mask (b, h, sq, sk) on the sm80 path: q = 0 (P uniform), V one-hot over the first
    sk of d columns (d = sk rounded up to 8: 16-byte aligned rows), out[..., j] != 0 iff kept."""
    hk = hk or h
    assert sk <= 256
    d = -(-sk // 8) * 8
    npd = NP_DTYPES[dtype]
    q = cupy.zeros((b, sq, h, d), npd)
    k = cupy.zeros((b, sk, hk, d), npd)
    vh = np.zeros((b, sk, hk, d), npd)
    vh[:, np.arange(sk), :, np.arange(sk)] = 1
    v = cupy.asarray(vh)
    with on_sm80(caplog, fwd_path=fwd_path):
        out = cuflash.attention(q, k, v, dropout_p=p, seed=seed, num_splits=num_splits)
    o = to_numpy64(out)[..., :sk]                                   # (b, sq, h, sk)
    kept = o != 0
    # kept entries: exactly 1 / ((1 - p) sk) up to the output's rounding
    rtol = 2e-3 if dtype == "float16" else 1e-2
    np.testing.assert_allclose(o[kept], 1.0 / ((1 - p) * sk), rtol=rtol)
    assert (to_numpy64(out)[..., sk:] == 0).all()                   # one-hot columns past sk are never hit
    return kept.transpose(0, 2, 1, 3)


MASK_CASES = [
    # seed, (b, h, hk, sq, sk), p: every head-dim bucket (d = sk rounded up to 8)
    (0, (1, 1, 1, 7, 9), 0.5),              # d 16 -> bucket 32
    (7, (2, 2, 2, 64, 64), 0.9),            # 64
    (11, (1, 3, 3, 130, 96), 0.3),          # 96
    (2**40 + 3, (1, 4, 4, 129, 120), 0.3),  # 128
    (5, (1, 2, 2, 77, 160), 0.2),           # 160 (the 64 x 64 dropout-only tile)
    (6, (2, 2, 2, 65, 185), 0.25),          # 192 (64 x 64 tile)
    (2**63 + 12345, (1, 2, 2, 70, 200), 0.3),  # 224; seed with a high word (Philox key word 1)
    (12345, (2, 3, 3, 300, 256), 0.1),      # 256
    (99, (2, 6, 2, 300, 72), 0.17),         # GQA 6-2 unpacked (seqlen_q >= block_m = 128)
    (98, (2, 8, 2, 3, 200), 0.4),           # packed GQA: rows = (query, head) pairs
    (97, (3, 8, 1, 1, 256), 0.3),           # MQA decode, packed 8 rows
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,shape,p", MASK_CASES, ids=[f"{s[3]}x{s[4]}-h{s[1]}-{s[2]}" for _, s, _ in MASK_CASES])
def test_sm80_mask_equals_reference(caplog, dtype, seed, shape, p):
    b, h, hk, sq, sk = shape
    got = sm80_mask(caplog, seed, b, h, sq, sk, p, dtype, hk=hk)
    want = np.asarray(reference.dropout_mask(seed, b, h, sq, sk, p))
    assert got.shape == want.shape
    assert (got == want).all(), f"{(got != want).sum()} of {got.size} mask bits differ"


@pytest.mark.parametrize("splits", [2, 5])
def test_sm80_mask_with_split_kv(caplog, splits):
    """Split-KV slices (combined afterwards) draw the same mask; packed GQA decode."""
    seed, b, h, hk, sq, sk, p = 4321, 2, 8, 2, 1, 256, 0.2
    got = sm80_mask(caplog, seed, b, h, sq, sk, p, "bfloat16", hk=hk, num_splits=splits)
    want = np.asarray(reference.dropout_mask(seed, b, h, sq, sk, p))
    assert (got == want).all(), f"{(got != want).sum()} of {got.size} mask bits differ"


def test_sm80_kept_fraction_and_seed_behaviour(caplog):
    m1 = sm80_mask(caplog, 1, 2, 4, 512, 256, 0.2, "float16")
    assert abs(m1.mean() - 0.8) < 0.005
    assert (sm80_mask(caplog, 1, 2, 4, 512, 256, 0.2, "float16") == m1).all()       # same seed: same mask
    assert (sm80_mask(caplog, 2, 2, 4, 512, 256, 0.2, "float16") != m1).mean() > 0.1  # other seed: other mask


# ---- outputs against the reference with the same mask ---------------------------------------------------

def forward_case(caplog, dtype, b, sq, sk, h, hk, d, *, seed, p=P, alibi=False, num_splits=0, fwd_path="sm80",
                 **opts):
    rng = np.random.default_rng(seed % 2**32)
    q, k, v = randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hk, d), dtype), randn(rng, (b, sk, hk, d), dtype)
    slopes = rng.uniform(0.05, 0.5, (h,)).astype(np.float32) if alibi else None
    mask = reference.dropout_mask(seed, b, h, sq, sk, p)
    ref = reference.attention(q, k, v, alibi_slopes=slopes, dropout_p=p, dropout_mask=mask, **opts)
    # the dtype's rounding error of plain attention, carried onto the dropped output (tests/test_gpu_dropout.py)
    base = ref + (lowp_attention(q, k, v, dtype, alibi_slopes=slopes, **opts)
                  - reference.attention(q, k, v, alibi_slopes=slopes, **opts))
    npd = NP_DTYPES[dtype]
    tq, tk, tv = (cupy.asarray(x.astype(npd)) for x in (q, k, v))
    ts = None if slopes is None else cupy.asarray(slopes)
    out = cupy.full(q.shape, np.nan, dtype=npd)
    with on_sm80(caplog, fwd_path=fwd_path):
        cuflash.attention(tq, tk, tv, alibi_slopes=ts, dropout_p=p, seed=seed, out=out, num_splits=num_splits,
                          **opts)
    assert_fa_close(to_numpy64(out), ref, base, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEADDIM_BUCKETS)
def test_sm80_forward_matches_reference(caplog, dtype, d):
    forward_case(caplog, dtype, 2, 113, 203, 6, 2, d, seed=1000 + d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(20, 3), softcap=10.0), dict(alibi=True)],
                         ids=["causal", "window-softcap", "alibi"])
@pytest.mark.parametrize("d", [64, 256])   # early (before S = Q K^T) and late (after the softmax) draws
def test_sm80_forward_options(caplog, dtype, opts, d):
    forward_case(caplog, dtype, 2, 257, 190, 4, 4, d, seed=2**63 + d, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hk,splits", [(8, 2, 0), (8, 2, 3), (16, 1, 0), (4, 4, 4)])
def test_sm80_decode_gqa_packed(caplog, dtype, h, hk, splits):
    d = 128
    """seqlen_q = 1 against long keys: packed GQA rows (true query and head per row) and split-KV slices."""
    forward_case(caplog, dtype, 3, 1, 3000, h, hk, d, seed=77 + h + splits, p=0.2, num_splits=splits)


# ---- gradients against the reference with the same mask --------------------------------------------------

def grad_case(caplog, *args, logged_backward=True, **kw):
    with on_sm80(caplog, forward=True, backward=logged_backward):
        return run_dropout_case(*args, **kw)


OPTS = {
    "causal": dict(causal=True),
    "window-softcap": dict(window=(20, 3), softcap=10.0),
    "alibi": dict(alibi="h"),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-seed1", "deterministic-seed-hi"])
@pytest.mark.parametrize("opts", list(OPTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sm80_dropout_backward_matches_reference(caplog, dtype, opts, deterministic):
    # GQA 6-2: dK / dV sum the query heads of a group, each with its own mask; the second seed has a
    # nonzero high word (Philox key word 1)
    grad_case(caplog, dtype, 2, 113, 203, 6, 2, 64, seed=SEEDS[int(deterministic)], deterministic=deterministic,
              **OPTS[opts])


@pytest.mark.parametrize("seqlens", [(113, 203), (257, 64), (1, 239), (239, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("headdim", HEADDIM_BUCKETS)
def test_sm80_dropout_backward_headdims(caplog, headdim, seqlens):
    """Every backward tile (both dtypes over the buckets; deterministic dQ on every other one)."""
    sq, sk = seqlens
    i = HEADDIM_BUCKETS.index(headdim)
    grad_case(caplog, DTYPES[i % 2], 2, sq, sk, 2, 1, headdim, seed=headdim * 1000 + sq, data_seed=headdim + sk,
              causal=sq > sk, deterministic=(i // 2) % 2 == 1)


@pytest.mark.parametrize("headdim", sorted(_launch_bwd_sm80.TILES_SMALL_SMEM))
def test_sm80_dropout_backward_single_stage_tiles(caplog, sm80, headdim):  # noqa: F811
    """The single-stage tiles (picked on GPUs with 163 KB per block) forced through the pinned backward."""
    sm80.tile = _launch_bwd_sm80.TILES_SMALL_SMEM[headdim]
    grad_case(caplog, "bfloat16", 2, 200, 150, 4, 2, headdim, seed=headdim, causal=True, deterministic=True,
              logged_backward=False)
    assert sm80.runs and all(r.dropout_p > 0 for r in sm80.runs)


def test_sm80_forward_small_smem_tile(caplog, monkeypatch):
    """The 128 x 32 d-128 tile (GPUs with 99 KB per block), forced through the forward's tile choice."""
    small = _config.SM80_FORWARD_TILES_SMALL_SMEM[128]
    monkeypatch.setattr(_launch_sm80, "_tile", lambda run: small)
    forward_case(caplog, "float16", 2, 150, 333, 4, 2, 128, seed=31, causal=True)


# ---- the dropout-only tiles (_config.SM80_FORWARD_TILES_DROPOUT, _launch_bwd_sm80.TILES_DROPOUT) ----------

def _launched(caplog) -> list[str]:
    """The kernels launched in the last on_sm80 block (the DEBUG launch lines)."""
    return [m for m in (r.getMessage() for r in caplog.records) if m.startswith("cuflash: launch ")]


class _Run:
    """What the tile choices read of a run."""

    def __init__(self, headdim, dropout_p=P):
        self.headdim, self.dropout_p, self.device_id = headdim, dropout_p, 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,opts", [(160, {}), (152, dict(causal=True)), (160, dict(window_size=(20, 3), softcap=10.0))],
                         ids=["d160", "d152-causal", "d160-window-softcap"])
def test_sm80_forward_dropout_only_tile(caplog, dtype, d, opts):
    """d 160 with dropout runs the 64 x 64 tile (the regular 128 x 32 tile's DROPOUT variant spilled on sm_90a
    with NVRTC 13.0): it is the launched kernel, and matches the reference with the same mask."""
    tile = _config.SM80_FORWARD_TILES_DROPOUT[160]
    assert _launch_sm80._tile(_Run(d)) == tile
    forward_case(caplog, dtype, 2, 200, 203, 4, 2, d, seed=160 + d, **opts)
    name = _launch_sm80.kernel_name(dtype, tile, dropout=True)
    assert any(name in m for m in _launched(caplog)), _launched(caplog)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("opts", list(OPTS))
def test_sm80_dropout_backward_dropout_only_tile(caplog, opts, deterministic):
    """bf16 d 128 with dropout runs the backward's dropout-only warp grids (TILES_DROPOUT[128]: the regular
    tile's DROPOUT variant spilled on sm_80 with NVRTC 13.0); GQA 6-2, gradients against the reference."""
    tile = _launch_bwd_sm80.TILES_DROPOUT[128]
    assert _launch_bwd_sm80._tile(_Run(128)) == tile
    grad_case(caplog, "bfloat16", 2, 257, 203, 6, 2, 128, seed=SEEDS[int(deterministic)] + 128, data_seed=128,
              deterministic=deterministic, **OPTS[opts])
    name = _launch_bwd_sm80.kernel_names("bfloat16", tile, dropout=True)["main"]
    assert any(name in m for m in _launched(caplog)), _launched(caplog)


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_sm80_dropout_backward_high_p(caplog, p):
    grad_case(caplog, "float16", 2, 257, 64, 4, 2, 64, seed=77, p=p, window=(17, 5), deterministic=True)


def test_sm80_dropout_backward_longer_sequences(caplog):
    # many key blocks and query blocks (Philox counters far from 0), atomic dQ from many blocks
    grad_case(caplog, "bfloat16", 1, 1000, 1537, 4, 2, 128, seed=2**40 + 3, causal=True)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sm80_mask_read_through_gradients(caplog, dtype, deterministic):
    """tests/test_gpu_dropout_backward.py's read-back in fp16 / bf16 on the sm80 backward: with q = 0,
    dO_i = e_i, dV[j, i] = Z_ij / ((1 - p) sk) (exactly 0 where dropped); with k_j = e_j, v_j = e_0,
    dO_i = e_0 and scale 1, dq_i[j] = (Z_ij / (1 - p) - D_i) / sk."""
    b, h, sq, sk, d, p, seed = 2, 3, 64, 100, 128, 0.3, 4242
    q, k, v = mask_probe_inputs(b, sq, sk, h, d)
    opts = dict(causal=False, softmax_scale=1.0, window_size=(-1, -1), softcap=0.0)
    want = np.asarray(reference.dropout_mask(seed, b, h, sq, sk, p))             # (b, h, sq, sk)

    do_v = np.zeros((b, sq, h, d))
    do_v[:, np.arange(sq), :, np.arange(sq)] = 1.0
    with on_sm80(caplog, backward=True):
        _, _, (_, _, dv) = _forward_backward(q, k, v, do_v, None, dtype, opts, seed, p, deterministic)
    dvn = to_numpy64(dv)[..., :sq]                                                # (b, sk, h, sq)
    got_v = dvn.transpose(0, 2, 3, 1) != 0
    assert (got_v == want).all(), f"dV: {(got_v != want).sum()} mask bits differ"
    np.testing.assert_allclose(dvn[dvn != 0], 1.0 / ((1 - p) * sk), rtol=2e-2)

    do_q = np.zeros((b, sq, h, d))
    do_q[..., 0] = 1.0
    with on_sm80(caplog, backward=True):
        out, _, (dq, _, _) = _forward_backward(q, k, v, do_q, None, dtype, opts, seed, p, deterministic)
    dsum = to_numpy64(out)[..., 0]                                                # D_i = out_i . e_0
    z_q = (to_numpy64(dq)[..., :sk] * sk + dsum[..., None]) * (1 - p)             # (b, sq, h, sk): 1 kept, 0 not
    got_q = z_q.transpose(0, 2, 1, 3) > 0.5
    assert (got_q == want).all(), f"dQ: {(got_q != want).sum()} mask bits differ"


# ---- reproducibility ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(dtype="bfloat16", seqlens=(257, 203), heads=(6, 2), d=128, causal=True),
    dict(dtype="float16", seqlens=(113, 239), heads=(4, 1), d=64, causal=False),
    dict(dtype="float16", seqlens=(1, 1500), heads=(8, 2), d=128, causal=False),   # packed decode, splits
], ids=["bf16-gqa-causal", "fp16-mqa", "fp16-decode"])
def test_sm80_deterministic_bitwise(caplog, case):
    dtype = case["dtype"]
    sq, sk = case["seqlens"]
    h, hk = case["heads"]
    q, k, v, do, _ = _inputs(31, dtype, 2, sq, sk, h, hk, case["d"])
    opts = dict(causal=case["causal"], softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    with on_sm80(caplog, backward=True):
        runs = [_forward_backward(q, k, v, do, None, dtype, opts, seed, P, True) for seed in (5, 5, 6)]
    (out_a, lse_a, ga), (out_b, lse_b, gb), (out_c, _, gc) = runs
    assert np.array_equal(_bits(out_a), _bits(out_b)) and np.array_equal(_bits(lse_a), _bits(lse_b))
    for name, x, y in zip(("dq", "dk", "dv"), ga, gb):
        assert np.array_equal(_bits(x), _bits(y)), f"{name}: same seed, deterministic, but bits differ"
    assert not np.array_equal(_bits(out_a), _bits(out_c)), "another seed must change the output"
    for name, x, z in zip(("dq", "dk", "dv"), ga, gc):
        frac = float(np.mean(_bits(x) != _bits(z)))
        assert frac > 0.5, f"{name}: another seed changed only {frac:.1%} of the gradient"
