"""Dropout on the GPU: the kernels' mask equals cuflash.reference.dropout_mask bit for bit, and outputs
(and gradients, where the backward path supports dropout) match the reference run with that mask."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import assert_fa_close, lowp_attention, randn, to_framework, to_numpy64

pytestmark = pytest.mark.gpu


def gpu_mask(seed, b, h, sq, sk, p, dtype="float32"):
    """Read the kernel's keep mask: q = 0 makes P uniform (1/sk), V rows one-hot, so out[..., j] != 0 iff kept."""
    import cupy

    assert sk <= 256
    d = max(sk, 1)
    q = cupy.zeros((b, sq, h, d), dtype)
    k = cupy.zeros((b, sk, h, d), dtype)
    v = cupy.zeros((b, sk, h, d), dtype)
    v[:, cupy.arange(sk), :, cupy.arange(sk)] = 1
    out = cuflash.attention(q, k, v, dropout_p=p, seed=seed)
    o = cupy.asnumpy(out.astype(cupy.float32))[..., :sk]          # (b, sq, h, sk)
    kept = o != 0
    np.testing.assert_allclose(o[kept], 1.0 / (1 - p) / sk, rtol=1e-5)
    return kept.transpose(0, 2, 1, 3)                              # (b, h, sq, sk)


@pytest.mark.parametrize("seed,shape,p", [(0, (1, 1, 7, 9), 0.5), (12345, (2, 3, 300, 256), 0.1),
                                          (2**40 + 3, (1, 4, 129, 200), 0.3), (7, (2, 2, 64, 64), 0.9)])
def test_mask_equals_reference(seed, shape, p):
    got = gpu_mask(seed, *shape, p)
    want = np.asarray(reference.dropout_mask(seed, *shape, p))
    assert got.shape == want.shape
    assert (got == want).all(), f"{(got != want).sum()} of {got.size} mask bits differ"


def test_kept_fraction_and_seed_behaviour():
    m1 = gpu_mask(1, 2, 4, 512, 256, 0.2)
    assert abs(m1.mean() - 0.8) < 0.005
    assert (gpu_mask(1, 2, 4, 512, 256, 0.2) == m1).all()       # same seed: same mask
    assert (gpu_mask(2, 2, 4, 512, 256, 0.2) != m1).mean() > 0.1  # other seed: other mask


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(20, 3), softcap=10.0),
                                  dict(alibi=True)], ids=["causal", "window-softcap", "alibi"])
def test_forward_matches_reference_with_same_mask(dtype, opts):
    opts = dict(opts)
    rng = np.random.default_rng()
    b, sq, sk, h, hk, d = 2, 113, 203, 6, 2, 64
    q, k, v = randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hk, d), dtype), randn(rng, (b, sk, hk, d), dtype)
    slopes = rng.random(h).astype(np.float32) if opts.pop("alibi", False) else None
    seed, p = int(rng.integers(2**62)), 0.17
    mask = reference.dropout_mask(seed, b, h, sq, sk, p)
    ref = reference.attention(q, k, v, alibi_slopes=slopes, dropout_p=p, dropout_mask=mask, **opts)
    # low-precision baseline: plain attention in the dtype, then the same dropout applied in fp32
    base_nodrop = lowp_attention(q, k, v, dtype, alibi_slopes=slopes, **opts)
    ref_nodrop = reference.attention(q, k, v, alibi_slopes=slopes, **opts)
    base = ref + (base_nodrop - ref_nodrop)  # the dtype's rounding error, carried onto the dropped output
    import cupy

    tq, tk, tv = (to_framework(x, "cupy", dtype) for x in (q, k, v))
    ts = None if slopes is None else cupy.asarray(slopes)
    out = cupy.full(q.shape, np.nan, dtype=tq.dtype)
    cuflash.attention(tq, tk, tv, alibi_slopes=ts, dropout_p=p, seed=seed, out=out, **opts)
    assert_fa_close(to_numpy64(out), ref, base, dtype)
