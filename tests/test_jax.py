"""JAX: cuflash.jax.attention under jax.jit and jax.grad, against the float64 reference."""

import numpy as np
import pytest

from cuflash import reference

from .helpers import assert_fa_close, lowp_attention, rounded

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def jax():
    jax = pytest.importorskip("jax")
    try:
        jax.devices("gpu")
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    return jax


@pytest.mark.parametrize("causal", [False, True])
def test_jit_forward(jax, causal):
    import cuflash.jax as cj

    rng = np.random.default_rng()
    q, k, v = (rounded(rng.standard_normal(s), "bfloat16") for s in ((2, 113, 4, 64), (2, 203, 2, 64), (2, 203, 2, 64)))
    f = jax.jit(lambda a, b, c: cj.attention(a, b, c, causal=causal))
    out = f(*(jax.numpy.asarray(x, jax.numpy.bfloat16) for x in (q, k, v)))
    ref = reference.attention(q, k, v, causal=causal)
    base = lowp_attention(q, k, v, "bfloat16", causal=causal)
    assert_fa_close(np.asarray(out.astype(np.float32), np.float64), ref, base, "bfloat16")


def test_jit_grad(jax):
    import cuflash.jax as cj

    rng = np.random.default_rng()
    dt = "float32"
    q, k, v = (rounded(rng.standard_normal(s), dt) for s in ((1, 64, 2, 32), (1, 96, 1, 32), (1, 96, 1, 32)))
    g = rounded(rng.standard_normal(q.shape), dt)

    def loss(a, b, c):
        return (cj.attention(a, b, c, causal=True) * g).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jax.numpy.asarray(x, jax.numpy.float32) for x in (q, k, v)))
    o, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    refs = reference.attention_backward(g, q, k, v, o, lse, causal=True)
    for got, ref in zip(grads, refs):
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=2e-4, rtol=2e-3)
