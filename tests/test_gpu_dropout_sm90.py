"""GPU tests of dropout on the Hopper forward (``fwd_sm90.cu``, DROPOUT variants; H100 / sm_90 only).

The same checks as tests/test_gpu_dropout_sm80.py's forward tests, with the dispatcher's log required to
say ``forward path=sm90``: the mask read through the output (q = 0, one-hot V) equals
``reference.dropout_mask`` bit for bit for every head-dim bucket and both consumer layouts (two and three
warpgroups), and outputs match the float64 reference run with the same mask under causal, window,
softcap, ALiBi and GQA. The backward of these runs is covered by tests/test_gpu_dropout_backward.py
(the forward it differentiates takes this path on an H100 where the shape fills the GPU).
``num_splits=1``: these shapes are small, and left to its heuristic the dispatcher would give them to the
sm80 path's split-KV forward (the Hopper path takes shapes that fill the GPU without splitting).
"""

from __future__ import annotations

import numpy as np
import pytest

from cuflash import reference

cupy = pytest.importorskip("cupy")

from .test_gpu_dropout_sm80 import DTYPES, forward_case, sm80_mask  # noqa: E402


def _sm90_ok() -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() >= 1 and int(cupy.cuda.Device(0).compute_capability) == 90
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _sm90_ok(), reason="needs a compute-capability-9.0 GPU")]

MASK_CASES = [
    # seed, (b, h, hk, sq, sk), p; d = sk rounded up to 8 picks the bucket
    (7, (2, 2, 2, 64, 64), 0.9),               # d64: three consumer warpgroups (192-row blocks)
    (2**40 + 3, (1, 4, 4, 300, 120), 0.3),     # d128: the overlap schedule, BN 128
    (6, (2, 2, 2, 257, 185), 0.25),            # d192: BN 96
    (12345, (2, 3, 3, 300, 256), 0.1),         # d256: the BN 64 dropout tile
    (99, (2, 6, 2, 300, 72), 0.17),            # GQA 6 / 2
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,shape,p", MASK_CASES, ids=[f"{s[3]}x{s[4]}-h{s[1]}-{s[2]}" for _, s, _ in MASK_CASES])
def test_sm90_mask_equals_reference(caplog, dtype, seed, shape, p):
    b, h, hk, sq, sk = shape
    got = sm80_mask(caplog, seed, b, h, sq, sk, p, dtype, hk=hk, fwd_path="sm90", num_splits=1)
    want = np.asarray(reference.dropout_mask(seed, b, h, sq, sk, p))
    assert (got == want).all(), f"{(got != want).sum()} of {got.size} mask bits differ"


def test_sm90_kept_fraction_and_seeds(caplog):
    m1 = sm80_mask(caplog, 1, 2, 4, 512, 256, 0.2, "bfloat16", fwd_path="sm90", num_splits=1)
    assert abs(m1.mean() - 0.8) < 0.005
    assert (sm80_mask(caplog, 1, 2, 4, 512, 256, 0.2, "bfloat16", fwd_path="sm90", num_splits=1) == m1).all()
    assert (sm80_mask(caplog, 2, 2, 4, 512, 256, 0.2, "bfloat16", fwd_path="sm90", num_splits=1) != m1).mean() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_sm90_forward_matches_reference(caplog, dtype, d):
    forward_case(caplog, dtype, 2, 313, 203, 6, 2, d, seed=3000 + d, fwd_path="sm90", num_splits=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(20, 3), softcap=10.0), dict(alibi=True)],
                         ids=["causal", "window-softcap", "alibi"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_forward_options(caplog, dtype, opts, d):
    forward_case(caplog, dtype, 2, 257, 390, 4, 4, d, seed=2**63 + 5 * d, fwd_path="sm90", num_splits=1, **opts)
