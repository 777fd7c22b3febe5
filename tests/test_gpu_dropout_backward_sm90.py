"""GPU tests of dropout in the Hopper backward (``bwd_sm90.cu``, DROPOUT variants; H100 / sm_90 only).

The keep bits come from the producer warpgroup's RNG warps through a shared-memory ring (not from the
consumers' own Philox calls as on the sm80 path), so these tests pin down that layout: every case requires
the dispatcher's log to say ``backward path=sm90`` and checks

* the mask read through the gradients (tests/test_gpu_dropout_backward.py's construction: dV spells the
  mask of the dK / dV GEMM's operand P Z, dQ the one of dS) equal to ``reference.dropout_mask`` bit for bit,
  both head-dim buckets, atomic and ordered-deterministic dQ;
* dq, dk, dv against the float64 reference with the same mask (``run_dropout_case``: its error rule and
  exact zeros) under causal, window, GQA, softcap (d128), long sequences (many key blocks and query
  blocks, Philox counters far from 0), deterministic in both modes (ordered; split copies with a left
  window);
* the same seed gives bitwise the same gradients in deterministic mode, another seed other ones;
* d64 with softcap or ALiBi and dropout takes the sm80 path (that variant has no transform code).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cuflash import reference

from .helpers import to_numpy64
from .test_gpu_backward import _inputs
from .test_gpu_dropout_backward import P, _bits, _forward_backward, mask_probe_inputs, run_dropout_case

pytest.importorskip("cupy")

from .test_gpu_dropout_sm90 import pytestmark  # noqa: E402, F401  (gpu marker, needs compute capability 9.0)


@pytest.fixture
def bwd_path(caplog, monkeypatch):
    """Call ``bwd_path()`` after a run: the backward paths the dispatcher logged since the last call."""
    for var in ("CUFLASH_DISABLE_SM90", "CUFLASH_DISABLE_SM90_BWD", "CUFLASH_BWD_SM90_MODE"):
        monkeypatch.delenv(var, raising=False)
    caplog.set_level(logging.DEBUG, logger="cuflash")

    def paths():
        msgs = [r.getMessage() for r in caplog.records]
        caplog.clear()
        return {m.split("backward path=")[1].split()[0].rstrip(",;") for m in msgs if "backward path=" in m}

    return paths


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("d,sk", [(64, 60), (128, 100)], ids=["d64", "d128"])
def test_mask_read_through_sm90_gradients(bwd_path, d, sk, deterministic):
    """q = 0: P = 1 / sk. dO_i = e_i: dV[j, i] = Z_ij / ((1 - p) sk). k_j = e_j, v_j = e_0, dO_i = e_0, scale
    1: dq_i[j] = (Z_ij / (1 - p) - D_i) / sk. bf16 resolves both far from the 0.5 threshold."""
    b, h, sq, p, seed, dtype = 2, 3, 150, 0.3, 4243 + d, "bfloat16"
    q, k, v = mask_probe_inputs(b, sq, sk, h, d)
    opts = dict(causal=False, softmax_scale=1.0, window_size=(-1, -1), softcap=0.0)
    want = np.asarray(reference.dropout_mask(seed, b, h, sq, sk, p))

    n = min(sq, d)  # dO_i = e_i for the first n rows (dV then spells their mask; dQ reads all rows)
    do_v = np.zeros((b, sq, h, d))
    do_v[:, np.arange(n), :, np.arange(n)] = 1.0
    _, _, (_, _, dv) = _forward_backward(q, k, v, do_v, None, dtype, opts, seed, p, deterministic)
    assert bwd_path() == {"sm90"}
    got_v = (to_numpy64(dv)[..., :n] * (1 - p) * sk).transpose(0, 2, 3, 1) > 0.5   # (b, h, n, sk)
    assert (got_v == want[:, :, :n]).all(), f"dV: {(got_v != want[:, :, :n]).sum()} mask bits differ"

    do_q = np.zeros((b, sq, h, d))
    do_q[..., 0] = 1.0
    out, _, (dq, _, _) = _forward_backward(q, k, v, do_q, None, dtype, opts, seed, p, deterministic)
    assert bwd_path() == {"sm90"}
    dsum = to_numpy64(out)[..., 0]
    got_q = ((to_numpy64(dq)[..., :sk] * sk + dsum[..., None]) * (1 - p)).transpose(0, 2, 1, 3) > 0.5
    assert (got_q == want).all(), f"dQ: {(got_q != want).sum()} mask bits differ"


CASES = {
    # name: (b, sq, sk, h, hk, d, options)
    "d64-gqa-causal": (2, 313, 203, 6, 2, 64, dict(causal=True)),
    "d128-gqa-causal": (2, 313, 203, 6, 2, 128, dict(causal=True)),
    "d64-window": (2, 257, 390, 4, 4, 64, dict(window=(20, 3))),
    "d128-window-softcap": (2, 257, 390, 4, 2, 128, dict(window=(40, 7), softcap=10.0)),
    "d128-alibi": (1, 200, 333, 4, 1, 128, dict(alibi="h")),
    "d56-mqa": (2, 150, 77, 4, 1, 56, {}),
    "d112-long": (1, 1000, 1537, 4, 2, 112, dict(causal=True)),
    "d64-long": (1, 1537, 1000, 2, 2, 64, {}),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_sm90_dropout_gradients_match_reference(bwd_path, case, dtype, deterministic):
    b, sq, sk, h, hk, d, opts = CASES[case]
    run_dropout_case(dtype, b, sq, sk, h, hk, d, seed=2**63 + 17 * d + sq, data_seed=d + sk, p=P,
                     deterministic=deterministic, **opts)
    assert bwd_path() == {"sm90"}


@pytest.mark.parametrize("d", [64, 128])
def test_sm90_dropout_deterministic_bitwise(bwd_path, d):
    dtype, sq, sk, h, hk = "bfloat16", 700, 900, 6, 2
    q, k, v, do, _ = _inputs(41 + d, dtype, 2, sq, sk, h, hk, d)
    opts = dict(causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0)
    runs = [_forward_backward(q, k, v, do, None, dtype, opts, seed, P, True) for seed in (5, 5, 6)]
    assert bwd_path() == {"sm90"}
    (_, _, ga), (_, _, gb), (_, _, gc) = runs
    for name, x, y, z in zip(("dq", "dk", "dv"), ga, gb, gc):
        assert np.array_equal(_bits(x), _bits(y)), f"{name}: same seed, deterministic, but bits differ"
        assert float(np.mean(_bits(x) != _bits(z))) > 0.5, f"{name}: another seed barely changed it"


def test_d64_transform_with_dropout_takes_sm80(bwd_path):
    run_dropout_case("bfloat16", 2, 120, 150, 2, 2, 64, seed=9, softcap=5.0)
    assert bwd_path() == {"sm80"}
    run_dropout_case("bfloat16", 2, 120, 150, 2, 2, 128, seed=9, softcap=5.0)
    assert bwd_path() == {"sm90"}
