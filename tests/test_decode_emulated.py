"""CPU emulation of the decode forward's block / slice / warp schedule (``kernels_cu/fwd_decode.cu``).

The kernel's index logic, step for step in NumPy (float64): which key tiles a block visits (window
clipping, split-KV slices, possibly empty), which warp sub-tiles skip masking (``right_lim`` /
``left_lim``), the per-warp online softmax, the merge of the warps through (m, l, O), the slice
outputs and the combine. Checked against the float64 reference, so that a wrong bound (a sub-tile
left unmasked, a tile never visited) fails here without a GPU. Numerics (fragments, rounding) are
the GPU tests' business (tests/test_gpu_decode.py).
"""

import numpy as np
import pytest

from cuflash import reference
from cuflash._launch_decode import DecodeTile, ROWS, key_tiles


def _emulate(q, k, v, *, window, num_splits, tile, scale):
    """out (b, sq, h, d), lse (b, h, sq) as fwd_decode + fwd_combine compute them (float64)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = h // hk
    M = sq * group
    m_blocks = -(-M // ROWS)
    bn, wkeys = tile.block_n, tile.warp_keys
    wl, wr = window
    wl = -1 if wl >= sk else wl          # Run.params' normalisation
    wr = -1 if wr >= sq else wr
    shift = sk - sq
    splits = max(1, num_splits)
    o_part = np.zeros((splits, b, h, sq, d))
    lse_part = np.full((splits, b, h, sq), -np.inf)
    for bi in range(b):
        for hy in range(hk * m_blocks):
            kh, m0 = hy // m_blocks, (hy % m_blocks) * ROWS
            rows = [r for r in range(m0, m0 + ROWS) if r < M]
            i_first, i_last = m0 // group, (min(m0 + ROWS, M) - 1) // group
            key_lo = 0 if wl < 0 else max(0, i_first + shift - wl)
            key_hi = sk - 1 if wr < 0 else min(sk - 1, i_last + shift + wr)
            nb_lo0 = key_lo // bn
            nb_hi0 = nb_lo0 if key_hi < key_lo else key_hi // bn + 1
            right_lim = sk - 1 if wr < 0 else min(sk - 1, i_first + shift + wr)
            left_lim = 0 if wl < 0 else i_last + shift - wl
            for split in range(splits):
                nb_lo, nb_hi = nb_lo0, nb_hi0
                if num_splits > 1:
                    per = -(-(nb_hi - nb_lo) // num_splits)
                    lo = nb_lo + split * per
                    nb_hi, nb_lo = min(nb_hi, lo + per), lo
                # per warp: m, l, O over its sub-tiles (rows = the block's real rows)
                qs = np.stack([q[bi, r // group, kh * group + r % group] for r in rows]) * scale
                m = np.full((tile.warps, len(rows)), -np.inf)
                l = np.zeros((tile.warps, len(rows)))
                o = np.zeros((tile.warps, len(rows), d))
                for n in range(nb_lo, nb_hi):
                    for w in range(tile.warps):
                        kw0 = n * bn + w * wkeys
                        keys = np.arange(kw0, kw0 + wkeys)
                        kk = np.where((keys < sk)[:, None], k[bi, np.minimum(keys, sk - 1), kh], 0.0)
                        vv = np.where((keys < sk)[:, None], v[bi, np.minimum(keys, sk - 1), kh], 0.0)
                        s = qs @ kk.T
                        if kw0 + wkeys - 1 > right_lim or kw0 < left_lim:
                            for x, r in enumerate(rows):
                                ipos = r // group + shift
                                lo_k = 0 if wl < 0 else ipos - wl
                                hi_k = sk - 1 if wr < 0 else min(sk - 1, ipos + wr)
                                s[x, (keys < lo_k) | (keys > hi_k)] = -np.inf
                        mx = np.maximum(m[w], s.max(1))
                        base = np.where(np.isfinite(mx), mx, 0.0)
                        alpha = np.exp(m[w] - base)
                        p = np.exp(s - base[:, None])
                        o[w] = o[w] * alpha[:, None] + p @ vv
                        l[w] = l[w] * alpha + p.sum(1)
                        m[w] = mx
                # merge of the warps
                mm = m.max(0)
                wgt = np.where(np.isfinite(mm), np.exp(m - np.where(np.isfinite(mm), mm, 0.0)), 0.0)
                ll = (wgt * l).sum(0)
                oo = (wgt[:, :, None] * o).sum(0) / np.where(ll > 0, ll, 1.0)[:, None]
                lse = np.where(ll > 0, mm + np.log(np.where(ll > 0, ll, 1.0)), -np.inf)
                for x, r in enumerate(rows):
                    o_part[split, bi, kh * group + r % group, r // group] = oo[x]
                    lse_part[split, bi, kh * group + r % group, r // group] = lse[x]
    # combine (a single slice is the output itself)
    mx = lse_part.max(0)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    wsum = np.exp(lse_part - safe).sum(0)
    lse = np.where(np.isfinite(mx), safe + np.log(np.where(wsum > 0, wsum, 1.0)), -np.inf)
    wts = np.where(np.isfinite(lse), np.exp(lse_part - np.where(np.isfinite(lse), lse, 0.0)), 0.0)
    out = (wts[..., None] * o_part).sum(0)           # (b, h, sq, d)
    return out.transpose(0, 2, 1, 3), lse


CASES = [
    # (b, sq, sk, h, hk, d, causal, window, splits, tile)
    (2, 1, 1, 8, 2, 16, False, (-1, -1), 0, DecodeTile(64, 4, 3)),
    (1, 1, 300, 8, 2, 16, True, (-1, -1), 3, DecodeTile(64, 4, 3)),
    (1, 4, 200, 16, 4, 8, True, (17, -1), 1, DecodeTile(64, 4, 3)),
    (1, 4, 200, 16, 4, 8, False, (17, 5), 4, DecodeTile(64, 2, 3)),
    (2, 3, 130, 10, 2, 8, False, (0, 0), 7, DecodeTile(64, 4, 3, 32)),
    (1, 6, 3, 8, 4, 8, True, (-1, -1), 2, DecodeTile(64, 4, 3)),        # rows without keys
    (1, 16, 100, 2, 2, 8, True, (-1, -1), 5, DecodeTile(64, 1, 3)),
    (1, 1, 700, 32, 1, 8, False, (300, 0), 6, DecodeTile(64, 4, 3)),    # 2 row blocks
    (1, 3, 90, 12, 1, 8, False, (40, 2), 64, DecodeTile(64, 8, 2)),     # more slices than tiles
    (1, 1, 1000, 4, 4, 8, False, (-1, 1), 0, DecodeTile(64, 4, 3)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_schedule_matches_reference(case):
    b, sq, sk, h, hk, d, causal, window, splits, tile = CASES[case]
    rng = np.random.default_rng(case)
    q, k, v = (rng.standard_normal(s) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)))
    ref, ref_lse = reference.attention(q, k, v, causal=causal, window_size=window, return_lse=True)
    left, right = reference.normalize_window(window, causal)
    # the host caps forced splits at the key tiles (plan()); the kernel must also take more
    n_tiles = key_tiles(type("R", (), {"seqlen_q": sq, "seqlen_k": sk, "window": (left, right)})(), tile.block_n)
    for s in {splits, max(1, min(splits, n_tiles))}:
        out, lse = _emulate(q, k, v, window=(left, right), num_splits=s, tile=tile, scale=d ** -0.5)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
        assert (np.isneginf(lse) == np.isneginf(ref_lse)).all()
        fin = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-10, atol=1e-10)


def test_key_tiles_brute_force():
    """key_tiles (the split heuristic's tile count) equals the tiles holding a key some query keeps."""
    for sq in (1, 2, 5, 16):
        for sk in (1, 3, 64, 65, 200):
            for window in ((-1, -1), (-1, 0), (3, 0), (0, 0), (10, 2), (-1, 1), (500, -1)):
                keep = reference.keep_mask(np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk, window)
                cols = np.nonzero(keep.any(0))[0]
                want = 0 if cols.size == 0 else cols[-1] // 64 - cols[0] // 64 + 1
                run = type("R", (), {"seqlen_q": sq, "seqlen_k": sk, "window": reference.normalize_window(window)})()
                assert key_tiles(run, 64) == want, (sq, sk, window)
