"""merge_attention: attention over disjoint key sets merged equals attention over their union."""

import numpy as np
import pytest

import cuflash
from cuflash import reference

from .helpers import to_framework, to_numpy64


def _parts(rng, dtype=np.float64):
    q = rng.standard_normal((2, 33, 4, 16))
    k = rng.standard_normal((2, 90, 2, 16))
    v = rng.standard_normal((2, 90, 2, 16))
    return q, k, v


def test_merge_numpy_equals_union():
    rng = np.random.default_rng(0)
    q, k, v = _parts(rng)
    cuts = [0, 17, 60, 90]
    outs, lses = zip(*(cuflash.attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in zip(cuts, cuts[1:])))
    out, lse = cuflash.merge_attention(outs, lses)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


def test_merge_empty_parts_and_validation():
    rng = np.random.default_rng(1)
    q, k, v = _parts(rng)
    o1, l1 = cuflash.attention(q, k, v, return_lse=True)
    o2, l2 = cuflash.attention(q, k[:, :0], v[:, :0], return_lse=True)   # a part that saw no key
    out = cuflash.merge_attention([o1, o2], [l1, l2], return_lse=False)
    np.testing.assert_allclose(out, o1, atol=1e-12)
    with pytest.raises(ValueError, match="as many lses as outs"):
        cuflash.merge_attention([o1], [])
    with pytest.raises(ValueError, match=r"lses\[0\] must have shape"):
        cuflash.merge_attention([o1], [l1[:, :1]])


@pytest.mark.gpu
@pytest.mark.parametrize("fw,dtype", [("cupy", "bfloat16"), ("torch", "float16"), ("cupy", "float32")])
def test_merge_gpu_equals_union(fw, dtype):
    if fw != "cupy":
        pytest.importorskip(fw)
    rng = np.random.default_rng()
    q, k, v = _parts(rng)
    tq, tk, tv = (to_framework(x, fw, dtype) for x in (q, k, v))
    cuts = [0, 40, 41, 90]
    outs, lses = zip(*(cuflash.attention(tq, tk[:, a:b], tv[:, a:b], return_lse=True) for a, b in zip(cuts, cuts[1:])))
    out, lse = cuflash.merge_attention(outs, lses)
    whole, whole_lse = cuflash.attention(tq, tk, tv, return_lse=True)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    np.testing.assert_allclose(to_numpy64(out), to_numpy64(whole), atol=tol)
    np.testing.assert_allclose(to_numpy64(lse), to_numpy64(whole_lse), atol=1e-4)
