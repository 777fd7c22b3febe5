"""Tests of the float64 NumPy oracle, cuflash.reference (CPU only)."""

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from cuflash import reference as ref


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _rng(seed):
    return np.random.default_rng(seed)


def make_qkv(rng, B, Sq, Sk, H, Hk, D, Dv=None):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal((B, Sq, H, D))
    k = rng.standard_normal((B, Sk, Hk, D))
    v = rng.standard_normal((B, Sk, Hk, Dv))
    return q, k, v


def assert_close(actual, expected, tol, name="", floor=1e-3):
    """max |a - e| <= tol * max(max |e|, floor), -inf at the same places, no NaN.

    The floor matters where the exact result is 0 and both sides hold only
    rounding noise (e.g. dq for rows that keep a single key: P = 1 there, so
    dS = dP - D = 0 exactly).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert not np.isnan(actual).any(), f"{name}: NaN in actual"
    assert not np.isnan(expected).any(), f"{name}: NaN in expected"
    ninf_a, ninf_e = np.isneginf(actual), np.isneginf(expected)
    np.testing.assert_array_equal(ninf_a, ninf_e, err_msg=f"{name}: -inf positions")
    assert np.isfinite(actual[~ninf_a]).all(), f"{name}: +inf in actual"
    if actual.size == 0 or ninf_a.all():
        return
    a, e = actual[~ninf_a], expected[~ninf_e]
    scale = max(np.abs(e).max(), floor)
    err = np.abs(a - e).max() / scale
    assert err <= tol, f"{name}: max rel err {err:.3e} > {tol:.1e}"


def loop_attention(q, k, v, *, causal=False, softmax_scale=None,
                   window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                   dropout_p=0.0, dropout_mask=None):
    """Dead-simple independent implementation: explicit Python loops.

    Deliberately shares no code with cuflash.reference.
    """
    B, Sq, H, D = q.shape
    _, Sk, Hk, Dv = v.shape
    group = H // Hk
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    left, right = window_size
    out = np.zeros((B, Sq, H, Dv))
    lse = np.full((B, H, Sq), -np.inf)
    for b in range(B):
        for h in range(H):
            hk = h // group
            if alibi_slopes is None:
                slope = 0.0
            elif np.ndim(alibi_slopes) == 1:
                slope = float(alibi_slopes[h])
            else:
                slope = float(alibi_slopes[b][h])
            for i in range(Sq):
                scores = {}
                for j in range(Sk):
                    diag = i + Sk - Sq
                    if left >= 0 and j < diag - left:
                        continue
                    if right >= 0 and j > diag + right:
                        continue
                    if causal and j > diag:
                        continue
                    x = sum(float(q[b, i, h, d]) * float(k[b, j, hk, d])
                            for d in range(D)) * scale
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    x -= slope * abs(i + Sk - Sq - j)
                    scores[j] = x
                if not scores:
                    continue
                mx = max(scores.values())
                total = sum(math.exp(x - mx) for x in scores.values())
                lse[b, h, i] = mx + math.log(total)
                for j, x in scores.items():
                    pr = math.exp(x - mx) / total
                    if dropout_mask is not None:
                        keep = np.broadcast_to(dropout_mask, (B, H, Sq, Sk))[b, h, i, j]
                        pr = pr * keep / (1.0 - dropout_p)
                    for d in range(Dv):
                        out[b, i, h, d] += pr * v[b, j, hk, d]
    return out, lse


def numeric_grads(f, arrays, eps=1e-6):
    """Central finite differences of the scalar f(*arrays) w.r.t. each array."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            fp = f(*arrays)
            a[idx] = old - eps
            fm = f(*arrays)
            a[idx] = old
            g[idx] = (fp - fm) / (2 * eps)
        grads.append(g)
    return grads


# --------------------------------------------------------------------------
# Naive vs blockwise, forward and backward
# --------------------------------------------------------------------------

SEQLENS = [(1, 1), (113, 203), (239, 1), (128, 128), (1, 239), (257, 64)]
HEADDIMS = [1, 7, 32, 59, 128]
BLOCKS = [16, 64, None, (16, 64), (64, 16), 32]

# Each config: (nheads, nheads_k, options). "alibi" / "dropout" are markers
# that the test turns into arrays of the right shape.
CONFIGS = {
    "plain": (2, 2, {}),
    "causal": (2, 2, {"causal": True}),
    "win5_3": (2, 2, {"window_size": (5, 3)}),
    "win0_0": (2, 2, {"window_size": (0, 0)}),
    "win-1_10": (2, 2, {"window_size": (-1, 10)}),
    "causal_left7": (2, 2, {"causal": True, "window_size": (7, -1)}),
    "alibi_h": (2, 2, {"alibi": "h"}),
    "alibi_bh_causal": (2, 2, {"alibi": "bh", "causal": True}),
    "softcap30": (2, 2, {"softcap": 30.0, "softmax_scale": 2.0}),
    "gqa_causal": (6, 2, {"causal": True}),
    "mqa_combo": (6, 1, {"window_size": (5, 3), "alibi": "bh", "softcap": 30.0}),
    "dropout_gqa_softcap": (6, 2, {"dropout": True, "softcap": 30.0}),
    "scale_alibi_win": (2, 2, {"softmax_scale": 0.37, "alibi": "h",
                               "window_size": (-1, 10)}),
    "gqa_causal_win_alibi_drop": (6, 3, {"causal": True, "window_size": (20, 5),
                                         "alibi": "h", "dropout": True}),
}


def build_options(rng, B, Sq, Sk, H, opts):
    opts = dict(opts)
    alibi = opts.pop("alibi", None)
    if alibi == "h":
        opts["alibi_slopes"] = rng.uniform(0.01, 0.5, size=(H,))
    elif alibi == "bh":
        opts["alibi_slopes"] = rng.uniform(0.01, 0.5, size=(B, H))
    if opts.pop("dropout", False):
        opts["dropout_p"] = 0.25
        opts["dropout_mask"] = rng.random((B, H, Sq, Sk)) >= 0.25
    return opts


CASES = [(sl, name) for sl in SEQLENS for name in CONFIGS]


@pytest.mark.parametrize("case_idx", range(len(CASES)),
                         ids=[f"{s[0]}x{s[1]}-{n}" for s, n in CASES])
def test_naive_vs_blockwise(case_idx):
    (Sq, Sk), name = CASES[case_idx]
    H, Hk, opts = CONFIGS[name]
    D = HEADDIMS[case_idx % len(HEADDIMS)]
    block = BLOCKS[case_idx % len(BLOCKS)]
    rng = _rng(case_idx)
    B = 2
    q, k, v = make_qkv(rng, B, Sq, Sk, H, Hk, D)
    opts = build_options(rng, B, Sq, Sk, H, opts)

    out_n, lse_n = ref.attention_naive(q, k, v, return_lse=True, **opts)
    out_b, lse_b = ref.attention(q, k, v, return_lse=True, block_size=block, **opts)
    assert out_b.dtype == np.float64 and lse_b.dtype == np.float64
    assert out_b.shape == (B, Sq, H, D) and lse_b.shape == (B, H, Sq)
    assert_close(out_b, out_n, 1e-12, "out")
    assert_close(lse_b, lse_n, 1e-12, "lse")

    dout = rng.standard_normal(out_n.shape)
    g_n = ref.attention_backward_naive(dout, q, k, v, out_n, lse_n, **opts)
    g_b = ref.attention_backward(dout, q, k, v, out_b, lse_b, block_size=block, **opts)
    for name_g, gb, gn, x in zip("dq dk dv".split(), g_b, g_n, (q, k, v)):
        assert gb.shape == x.shape and gb.dtype == np.float64
        # floor 1e-2: with window (0, 0) every row keeps one key, so P = 1,
        # dS = dP - D cancels exactly and dq is pure rounding noise (~1e-14).
        assert_close(gb, gn, 1e-12, name_g, floor=1e-2)


def test_default_block_size_exercises_several_blocks():
    # seqlens > 128 so the default blocking has several query and key blocks.
    rng = _rng(1)
    q, k, v = make_qkv(rng, 1, 300, 390, 2, 1, 16)
    for opts in ({}, {"causal": True}, {"window_size": (100, 40)}):
        o_n, l_n = ref.attention_naive(q, k, v, return_lse=True, **opts)
        o_b, l_b = ref.attention(q, k, v, return_lse=True, **opts)
        assert_close(o_b, o_n, 1e-12, "out")
        assert_close(l_b, l_n, 1e-12, "lse")


# --------------------------------------------------------------------------
# Independent loop implementation
# --------------------------------------------------------------------------

LOOP_CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(2, 1)),
    dict(window_size=(0, 0), causal=True),
    dict(window_size=(-1, 2), alibi="h"),
    dict(alibi="bh", causal=True, softcap=1.5, softmax_scale=1.3),
    dict(softcap=0.8),
    dict(dropout=True, window_size=(3, -1)),
]


@pytest.mark.parametrize("opts", LOOP_CASES, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("shape", [(1, 5, 7, 1, 1, 3), (2, 9, 4, 4, 2, 2),
                                   (1, 6, 6, 3, 1, 5), (2, 4, 6, 2, 1, 3)])
def test_against_loops(opts, shape):
    B, Sq, Sk, H, Hk, D = shape
    rng = _rng(sum(shape))
    q, k, v = make_qkv(rng, B, Sq, Sk, H, Hk, D, Dv=D + 1)
    kw = build_options(rng, B, Sq, Sk, H, opts)
    out_l, lse_l = loop_attention(q, k, v, **kw)
    out_n, lse_n = ref.attention_naive(q, k, v, return_lse=True, **kw)
    out_b, lse_b = ref.attention(q, k, v, return_lse=True, block_size=2, **kw)
    assert_close(out_n, out_l, 1e-12, "naive out")
    assert_close(lse_n, lse_l, 1e-12, "naive lse")
    assert_close(out_b, out_l, 1e-12, "blockwise out")
    assert_close(lse_b, lse_l, 1e-12, "blockwise lse")


# --------------------------------------------------------------------------
# Backward vs finite differences
# --------------------------------------------------------------------------

FD_CASES = {
    "plain": (2, 2, {}),
    "causal": (2, 2, {"causal": True}),
    "window": (2, 2, {"window_size": (2, 1)}),
    "alibi": (2, 2, {"alibi": "bh"}),
    "softcap": (2, 2, {"softcap": 1.5, "softmax_scale": 1.0}),
    "gqa": (4, 2, {"causal": True}),
    "mqa": (3, 1, {"window_size": (-1, 1)}),
    "dropout": (2, 1, {"dropout": True}),
    "combo": (4, 2, {"dropout": True, "softcap": 2.0, "softmax_scale": 0.9,
                     "alibi": "h", "window_size": (3, 2)}),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_backward_finite_differences(name):
    H, Hk, opts = FD_CASES[name]
    B, Sq, Sk, D = 1, 5, 7, 3
    rng = _rng(list(FD_CASES).index(name))
    q, k, v = make_qkv(rng, B, Sq, Sk, H, Hk, D)
    kw = build_options(rng, B, Sq, Sk, H, opts)
    dout = rng.standard_normal((B, Sq, H, D))

    def loss(q_, k_, v_):
        return float(np.sum(ref.attention_naive(q_, k_, v_, **kw) * dout))

    num = numeric_grads(loss, [q, k, v])
    out, lse = ref.attention(q, k, v, return_lse=True, **kw)
    ana_b = ref.attention_backward(dout, q, k, v, out, lse, block_size=2, **kw)
    ana_n = ref.attention_backward_naive(dout, q, k, v, out, lse, **kw)
    for gname, gb, gn, g_num in zip("dq dk dv".split(), ana_b, ana_n, num):
        assert np.abs(g_num).max() > 1e-3  # the gradient is not trivially 0
        assert_close(gb, g_num, 1e-5, f"blockwise {gname}")
        assert_close(gn, g_num, 1e-5, f"naive {gname}")


# --------------------------------------------------------------------------
# Fully masked rows
# --------------------------------------------------------------------------


@pytest.mark.parametrize("Sq,Sk,opts,empty_rows", [
    # window (0, 0): query i keeps only key i - 4, so rows 0..3 are empty.
    (7, 3, {"window_size": (0, 0), "causal": True}, [0, 1, 2, 3]),
    (7, 3, {"causal": True}, [0, 1, 2, 3]),
    (9, 4, {"window_size": (1, 0)}, [0, 1, 2, 3, 4]),
    (40, 10, {"causal": True, "alibi": "h", "softcap": 5.0}, list(range(30))),
])
def test_fully_masked_rows(Sq, Sk, opts, empty_rows):
    B, H, Hk, D = 2, 4, 2, 8
    rng = _rng(Sq * Sk)
    q, k, v = make_qkv(rng, B, Sq, Sk, H, Hk, D)
    kw = build_options(rng, B, Sq, Sk, H, opts)
    dout = rng.standard_normal((B, Sq, H, D))
    kept = [i for i in range(Sq) if i not in empty_rows]
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        for block in (None, 3, 16):
            out, lse = ref.attention(q, k, v, return_lse=True, block_size=block, **kw)
            assert not np.isnan(out).any() and not np.isnan(lse).any()
            assert (out[:, empty_rows] == 0).all()
            assert np.isneginf(lse[:, :, empty_rows]).all()
            assert np.isfinite(lse[:, :, kept]).all()
            assert np.abs(out[:, kept]).max() > 0
            dq, dk, dv = ref.attention_backward(dout, q, k, v, out, lse,
                                                block_size=block, **kw)
            for g in (dq, dk, dv):
                assert np.isfinite(g).all()
            assert (dq[:, empty_rows] == 0).all()
            assert np.abs(dq[:, kept]).max() > 0
        out_n, lse_n = ref.attention_naive(q, k, v, return_lse=True, **kw)
        assert_close(out, out_n, 1e-12, "out")
        assert_close(lse, lse_n, 1e-12, "lse")
        g_n = ref.attention_backward_naive(dout, q, k, v, out_n, lse_n, **kw)
        for g, gn in zip((dq, dk, dv), g_n):
            assert_close(g, gn, 1e-12)


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def test_softmax_scale():
    rng = _rng(11)
    q, k, v = make_qkv(rng, 1, 6, 9, 2, 2, 16)
    default = ref.attention(q, k, v)
    explicit = ref.attention(q, k, v, softmax_scale=0.25)  # 1/sqrt(16)
    np.testing.assert_allclose(default, explicit, rtol=0, atol=1e-15)
    # Scaling q by c is the same as multiplying the softmax scale by c.
    a = ref.attention(q, k, v, softmax_scale=0.7)
    b = ref.attention(q * (0.7 / 0.25), k, v)
    assert_close(a, b, 1e-13)
    assert np.abs(a - default).max() > 1e-3


def test_dropout_trivial_mask_equals_no_dropout():
    rng = _rng(12)
    q, k, v = make_qkv(rng, 2, 11, 13, 4, 2, 8)
    dout = rng.standard_normal((2, 11, 4, 8))
    mask = np.ones((2, 4, 11, 13), dtype=bool)
    o0, l0 = ref.attention(q, k, v, return_lse=True, causal=True, block_size=4)
    o1, l1 = ref.attention(q, k, v, return_lse=True, causal=True, block_size=4,
                           dropout_p=0.0, dropout_mask=mask)
    np.testing.assert_array_equal(o0, o1)
    np.testing.assert_array_equal(l0, l1)
    g0 = ref.attention_backward(dout, q, k, v, o0, l0, causal=True)
    g1 = ref.attention_backward(dout, q, k, v, o1, l1, causal=True,
                                dropout_p=0.0, dropout_mask=mask)
    for a, b in zip(g0, g1):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mask_shape", [(2, 3, 6, 10), (6, 10), (1, 3, 1, 10)])
def test_dropout_random_mask_hand_computation(mask_shape):
    rng = _rng(13)
    B, Sq, Sk, H, D, pdrop = 2, 6, 10, 3, 5, 0.4
    q, k, v = make_qkv(rng, B, Sq, Sk, H, H, D)
    mask = rng.random(mask_shape) >= pdrop
    # By hand: full softmax, then drop and rescale.
    s = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    P = np.exp(s - s.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    Pd = P * np.broadcast_to(mask, (B, H, Sq, Sk)) / (1 - pdrop)
    expected = np.einsum("bhij,bjhd->bihd", Pd, v)
    lse_undropped = np.log(np.exp(s).sum(-1))
    for fn, kw in ((ref.attention, {"block_size": 4}), (ref.attention_naive, {})):
        out, lse = fn(q, k, v, dropout_p=pdrop, dropout_mask=mask,
                      return_lse=True, **kw)
        assert_close(out, expected, 1e-12, "out")
        assert_close(lse, lse_undropped, 1e-12, "lse is of the undropped softmax")
    # And dropout changes the result.
    assert np.abs(ref.attention(q, k, v) - expected).max() > 1e-2


def test_alibi_slope_shapes_agree():
    rng = _rng(14)
    B, H = 3, 4
    q, k, v = make_qkv(rng, B, 7, 12, H, 2, 6)
    slopes = rng.uniform(0.1, 1.0, size=H)
    a = ref.attention(q, k, v, alibi_slopes=slopes, causal=True)
    b = ref.attention(q, k, v, alibi_slopes=np.tile(slopes, (B, 1)), causal=True)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - ref.attention(q, k, v, causal=True)).max() > 1e-2
    # Per-batch slopes differ per batch.
    per_b = rng.uniform(0.1, 1.0, size=(B, H))
    c = ref.attention(q, k, v, alibi_slopes=per_b)
    for bi in range(B):
        cb = ref.attention(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1],
                           alibi_slopes=per_b[bi])
        assert_close(c[bi:bi + 1], cb, 1e-14)


def test_gqa_equals_repeated_kv():
    rng = _rng(15)
    q, k, v = make_qkv(rng, 2, 9, 14, 6, 2, 8)
    kr, vr = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    kw = dict(window_size=(4, 2), alibi_slopes=rng.uniform(0.1, 1, 6))
    o, l = ref.attention(q, k, v, return_lse=True, **kw)
    orr, lr = ref.attention(q, kr, vr, return_lse=True, **kw)
    assert_close(o, orr, 1e-14)
    assert_close(l, lr, 1e-14)
    dout = rng.standard_normal(o.shape)
    dq, dk, dv = ref.attention_backward(dout, q, k, v, o, l, **kw)
    dqr, dkr, dvr = ref.attention_backward(dout, q, kr, vr, orr, lr, **kw)
    assert_close(dq, dqr, 1e-13)
    # dK, dV of a kv head are the sums over its query heads.
    assert_close(dk, dkr.reshape(2, 14, 2, 3, 8).sum(3), 1e-13)
    assert_close(dv, dvr.reshape(2, 14, 2, 3, 8).sum(3), 1e-13)


def test_input_dtypes_and_strides():
    rng = _rng(16)
    q, k, v = make_qkv(rng, 2, 10, 12, 4, 2, 8)
    dtypes = [np.float16, np.float32]
    try:
        import ml_dtypes
        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    for dt in dtypes:
        qd, kd, vd = q.astype(dt), k.astype(dt), v.astype(dt)
        out = ref.attention(qd, kd, vd, causal=True)
        assert out.dtype == np.float64
        expected = ref.attention(*(np.asarray(x, np.float64) for x in (qd, kd, vd)),
                                 causal=True)
        np.testing.assert_array_equal(out, expected)
    # Non-contiguous: every other element of bigger arrays, and a transposed
    # layout (BHSD storage viewed as BSHD).
    qb, kb, vb = make_qkv(rng, 2, 20, 24, 8, 4, 16)
    qs, ks, vs = qb[:, ::2, ::2, ::2], kb[:, ::2, ::2, ::2], vb[:, ::2, ::2, ::2]
    assert not qs.flags.c_contiguous
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not qt.flags.c_contiguous
    assert_close(ref.attention(qs, ks, vs, block_size=3),
                 ref.attention_naive(*map(np.ascontiguousarray, (qs, ks, vs))), 1e-13)
    assert_close(ref.attention(qt, k, v), ref.attention(q, k, v), 1e-14)


def test_headdim_v_differs():
    rng = _rng(17)
    q, k, v = make_qkv(rng, 1, 5, 6, 2, 1, 4, Dv=9)
    out, lse = ref.attention(q, k, v, return_lse=True, block_size=2)
    assert out.shape == (1, 5, 2, 9)
    out_l, lse_l = loop_attention(q, k, v)
    assert_close(out, out_l, 1e-12)
    dq, dk, dv = ref.attention_backward(np.ones_like(out), q, k, v, out, lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


# --------------------------------------------------------------------------
# Mask helpers
# --------------------------------------------------------------------------


def test_keep_mask_picture():
    # The docstring's picture: seqlen_q=2, seqlen_k=5, causal.
    i, j = np.arange(2)[:, None], np.arange(5)[None, :]
    m = ref.keep_mask(i, j, 2, 5, causal=True)
    np.testing.assert_array_equal(m, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    m = ref.keep_mask(i, j, 2, 5, window_size=(1, 0))
    np.testing.assert_array_equal(m, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert ref.normalize_window((-5, 3), causal=True) == (-1, 0)


WINDOWS = [(-1, -1), (0, 0), (2, 1), (-1, 3), (4, -1), (0, -1), (9, 9)]


def test_mask_bounds_and_block_range():
    for Sq, Sk, win, causal, bq, bk in itertools.product(
            [1, 5, 13], [0, 1, 4, 17], WINDOWS, [False, True], [1, 4], [1, 3, 8]):
        i, j = np.arange(Sq)[:, None], np.arange(Sk)[None, :]
        m = ref.keep_mask(i, j, Sq, Sk, win, causal)
        lo, hi = ref.mask_bounds(Sq, Sk, win, causal)
        inrange = (j >= lo[:, None]) & (j < hi[:, None])
        np.testing.assert_array_equal(m, inrange)
        assert (hi >= lo).all() and (np.diff(lo) >= 0).all() and (np.diff(hi) >= 0).all()
        for i0 in range(0, Sq, bq):
            i1 = min(i0 + bq, Sq)
            n0, n1 = ref.key_block_range(i0, i1, Sq, Sk, bk, win, causal)
            for n in range(-(-Sk // bk)):
                blk = m[i0:i1, n * bk:(n + 1) * bk]
                # Visited iff some element of the tile is kept: every kept
                # element is covered, and no visited tile is fully masked.
                assert (n0 <= n < n1) == blk.any(), (Sq, Sk, win, causal, i0, n)


# --------------------------------------------------------------------------
# Empty inputs, validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("B,Sq,Sk,H,Hk", [
    (0, 4, 5, 2, 1), (2, 0, 5, 2, 1), (2, 4, 0, 2, 1), (2, 4, 5, 0, 0),
    (2, 4, 5, 0, 2), (2, 0, 0, 2, 2),
])
def test_empty(B, Sq, Sk, H, Hk):
    rng = _rng(0)
    q, k, v = make_qkv(rng, B, Sq, Sk, H, Hk, 3)
    for fn in (ref.attention, ref.attention_naive):
        out, lse = fn(q, k, v, return_lse=True, causal=True)
        assert out.shape == (B, Sq, H, 3) and lse.shape == (B, H, Sq)
        assert (out == 0).all() and np.isneginf(lse).all()
    dout = np.ones_like(out)
    for fn in (ref.attention_backward, ref.attention_backward_naive):
        dq, dk, dv = fn(dout, q, k, v, out, lse, causal=True)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert not dq.any() and not dk.any() and not dv.any()


def test_validation():
    rng = _rng(1)
    q, k, v = make_qkv(rng, 1, 4, 5, 4, 2, 3)
    with pytest.raises(ValueError, match="4 dims"):
        ref.attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of nheads_k"):
        ref.attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="headdims differ"):
        ref.attention(q[..., :2], k, v)
    with pytest.raises(ValueError, match="k and v"):
        ref.attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="alibi_slopes"):
        ref.attention(q, k, v, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="dropout_mask"):
        ref.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="does not broadcast"):
        ref.attention(q, k, v, dropout_p=0.1, dropout_mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="dropout_p"):
        ref.attention(q, k, v, dropout_p=1.0, dropout_mask=np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="window_size"):
        ref.attention(q, k, v, window_size=3)
    with pytest.raises(ValueError, match="softcap"):
        ref.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        ref.attention(q, k, v, block_size=0)
    out, lse = ref.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="lse"):
        ref.attention_backward(out, q, k, v, out, lse[:, :, :2])
    with pytest.raises(ValueError, match="dout"):
        ref.attention_backward(out[:, :2], q, k, v, out, lse)


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def test_blockwise_memory_is_not_quadratic():
    S, D = 8192, 16
    rng = _rng(2)
    q, k, v = make_qkv(rng, 1, S, S, 1, 1, D)
    full_matrix = S * S * 8  # 512 MiB
    tracemalloc.start()
    try:
        out, lse = ref.attention(q, k, v, return_lse=True)
        _, peak_fwd = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        dq, dk, dv = ref.attention_backward(out, q, k, v, out, lse)
        _, peak_bwd = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_fwd < 64 * 2**20 < full_matrix, peak_fwd
    assert peak_bwd < 64 * 2**20, peak_bwd
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert np.isfinite(dq).all() and np.isfinite(dk).all()
    # Spot check a few rows against a direct computation.
    rows = np.array([0, 4097, S - 1])
    s = q[0, rows, 0] @ k[0, :, 0].T / math.sqrt(D)
    lse_rows = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    assert_close(lse[0, 0, rows], lse_rows, 1e-12)
