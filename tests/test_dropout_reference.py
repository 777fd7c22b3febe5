"""The reference's dropout mask: Philox known answers, statistics, laziness, and use in forward/backward."""

import numpy as np
import pytest

from cuflash import reference


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert tuple(int(x) for x in reference.philox4x32_10(ctr, key)) == want


def test_threshold_rule():
    """16-bit threshold: round(p * 65536) (to nearest, ties to even), at most 65535."""
    t = reference.dropout_threshold
    assert t(0.0) == 0 and t(0.5) == 32768 and t(0.1) == 6554 and t(0.9) == 58982
    assert t(2.0**-18) == 0 and t(2.0**-17) == 0 and t(3 * 2.0**-17) == 2   # ties to even
    assert t(1 - 2.0**-16) == 65535 and t(1 - 2.0**-20) == 65535 and t(0.99999999) == 65535
    for p in np.linspace(0, 0.999, 97):
        assert abs((1 - t(p) / 65536) - (1 - p)) <= 2.0**-17 + 1e-15


def test_mask_rule_spelled_out():
    """Element by element from the documented rule: one Philox call per 8 keys, 16-bit draws (low half for
    even j), keep iff draw >= threshold."""
    seed, offset, B, H, sq, sk, p = 2**40 + 77, (3 << 32) + 5, 2, 3, 40, 70, 0.3
    m = np.asarray(reference.dropout_mask(seed, B, H, sq, sk, p, offset))
    thr = reference.dropout_threshold(p)
    rng = np.random.default_rng(1)
    for _ in range(300):
        b, h, i, j = (int(rng.integers(n)) for n in (B, H, sq, sk))
        ctr = [np.uint32(j // 8), np.uint32(i), np.uint32(b * H + h), np.uint32(offset & 0xFFFFFFFF)]
        key = [np.uint32(seed & 0xFFFFFFFF), np.uint32(((seed >> 32) ^ (offset >> 32)) & 0xFFFFFFFF)]
        word = int(reference.philox4x32_10(ctr, key)[(j % 8) // 2])
        draw = (word >> (16 * (j % 2))) & 0xFFFF
        assert m[b, h, i, j] == (draw >= thr), (b, h, i, j)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction(p):
    m = np.asarray(reference.dropout_mask(77, 2, 4, 256, 512, p))
    assert abs(m.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / m.size) + 1e-4
    # both halves of a word and all 8 keys of a call are equally likely to be kept
    per_pos = m.reshape(-1, 8).mean(axis=0)
    assert np.all(np.abs(per_pos - (1 - p)) < 5 * np.sqrt(p * (1 - p) / (m.size / 8)))


def test_kept_fraction_and_seeds():
    m = np.asarray(reference.dropout_mask(1234, 2, 4, 300, 700, 0.1))
    assert m.shape == (2, 4, 300, 700) and m.dtype == bool
    assert abs(m.mean() - 0.9) < 0.005
    m2 = np.asarray(reference.dropout_mask(1235, 2, 4, 300, 700, 0.1))
    assert (m != m2).mean() > 0.1          # different seeds, different masks
    assert (np.asarray(reference.dropout_mask(1234, 2, 4, 300, 700, 0.1)) == m).all()  # same seed, same mask
    m3 = np.asarray(reference.dropout_mask(1234, 2, 4, 300, 700, 0.1, offset=1))
    assert (m != m3).mean() > 0.1          # offsets move the stream
    assert np.asarray(reference.dropout_mask(7, 1, 1, 5, 9, 0.0)).all()  # p = 0 keeps everything


def test_lazy_slices_equal_whole():
    lazy = reference.dropout_mask(99, 2, 3, 50, 70, 0.3)
    full = np.asarray(lazy)
    assert (lazy[:, :, 10:20, 33:61] == full[:, :, 10:20, 33:61]).all()
    assert (lazy[1:2, 2:3] == full[1:2, 2:3]).all()


@pytest.mark.parametrize("hk", [3, 1])
def test_forward_backward_with_lazy_mask(hk):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 37, 3, 16))
    k = rng.standard_normal((2, 53, hk, 16))
    v = rng.standard_normal((2, 53, hk, 16))
    lazy = reference.dropout_mask(5, 2, 3, 37, 53, 0.25)
    full = np.asarray(lazy)
    o1, l1 = reference.attention(q, k, v, causal=True, dropout_p=0.25, dropout_mask=lazy, return_lse=True,
                                 block_size=16)
    o2, l2 = reference.attention_naive(q, k, v, causal=True, dropout_p=0.25, dropout_mask=full, return_lse=True)
    np.testing.assert_allclose(o1, o2, atol=1e-12)
    np.testing.assert_allclose(l1, l2, atol=1e-12)
    do = rng.standard_normal(o1.shape)
    g1 = reference.attention_backward(do, q, k, v, o1, l1, causal=True, dropout_p=0.25, dropout_mask=lazy,
                                      block_size=16)
    g2 = reference.attention_backward_naive(do, q, k, v, o2, l2, causal=True, dropout_p=0.25, dropout_mask=full)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-11)
