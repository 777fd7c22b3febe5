"""CPU emulation of the tensor-core kernels' dropout bit plumbing (no GPU needed).

``dropout_frag_keep`` (kernels_cu/philox.cuh) draws the keep bits of a thread's mma.sync C fragments, one
Philox call per 4 keys of a row shared by a lane pair through a shuffle; the forward (fwd_sm80.cu) turns
them into AND masks of the 16-bit P operand of O += P V, the backward (bwd_sm80.cu) into sign bits of the P
tile, read back in the dS step. This module mirrors that code line by line in Python, for every warp and
lane of the kernels' tiles, and checks that the (row, key) pairs it drops are exactly those of
``cuflash.reference.dropout_mask`` (the portable kernels' mask). A change to the index or bit math of those
functions must be mirrored here.
"""

from __future__ import annotations

import numpy as np
import pytest

from cuflash import _config, reference
from cuflash import _launch_bwd_sm80 as B

M32 = 0xFFFFFFFF


def _philox(cx, cy, cz, cw, k0, k1):
    words = reference.philox4x32_10([np.uint32(cx & M32), np.uint32(cy & M32), np.uint32(cz & M32),
                                     np.uint32(cw & M32)], [np.uint32(k0), np.uint32(k1)])
    return [int(w) for w in words]


class _P:
    """The Params fields the generator reads."""

    def __init__(self, seed, offset, nheads, p):
        self.seed, self.rng_offset, self.nheads = seed, offset, nheads
        self.threshold = reference.dropout_threshold(p)


def frag_keep_warp(p, b, k0, R, NP, rowinfo):
    """dropout_frag_keep for the 32 lanes of a warp: [(even, odd)] per lane. rowinfo(lane, ri) -> (i, h)."""
    assert R * NP <= 16
    key0, key1 = p.seed & M32, ((p.seed >> 32) ^ (p.rng_offset >> 32)) & M32
    a, c = [0] * 32, [0] * 32
    for lane in range(32):
        tq = lane & 3
        cx0 = (k0 >> 2) + 2 * (tq & 1) + (tq >> 1)
        for ri in range(R):
            i, h = rowinfo(lane, ri)
            cz = b * p.nheads + h
            for q in range(NP):
                r = _philox(cx0 + 4 * q, i, cz, p.rng_offset, key0, key1)
                keep = [int(x >= p.threshold) for x in r]
                u = ri * NP + q
                a[lane] |= (keep[0] << u) | (keep[1] << (u + 16))
                c[lane] |= (keep[2] << u) | (keep[3] << (u + 16))
    send = [(a[ln] if (ln & 1) else c[ln]) for ln in range(32)]
    out = []
    for lane in range(32):
        par = lane & 1
        recv = send[lane ^ 1]  # __shfl_xor_sync(..., 1)
        out.append((recv if par else a[lane], c[lane] if par else recv))
    return out


def mask16(w, u):
    return (((w >> u) & 0x10001) * 0xFFFF) & M32


# ---- forward ---------------------------------------------------------------------------------------------

def _fwd_dropped(tile, p, b, hy, pack, sq, m0, k0):
    """(row r of the block's packed rows, key) -> dropped, as fwd_sm80.cu zeroes the P operand."""
    BM, BN, W = tile.block_m, tile.block_n, tile.warps
    kWarpRows = BM // W
    kMT, kNT = kWarpRows // 16, BN // 8
    one = 2 * kMT * (kNT // 2) <= 8  # kDropOneWord
    dropped = {}
    for w in range(W):
        frow0 = m0 + w * kWarpRows

        def rowinfo(lane, ri):
            r = frow0 + (lane >> 2) + (ri >> 1) * 16 + (ri & 1) * 8
            return (r if pack == 1 else r // pack), (hy if pack == 1 else hy * pack + r % pack)

        keeps = frag_keep_warp(p, b, k0, 2 * kMT, kNT // 2, rowinfo)
        for lane in range(32):
            even, odd = keeps[lane]
            if one:
                even |= odd << 8
            g, tq = lane >> 2, lane & 3
            for kk in range(BN // 16):
                for mt in range(kMT):
                    wodd = even if one else odd
                    masks = [mask16(even, (2 * mt) * (kNT // 2) + kk),
                             mask16(even, (2 * mt + 1) * (kNT // 2) + kk),
                             mask16(wodd, (2 * mt) * (kNT // 2) + kk + (8 if one else 0)),
                             mask16(wodd, (2 * mt + 1) * (kNT // 2) + kk + (8 if one else 0))]
                    # m16n8k16 A fragment: a0 (row g, k 2tq..), a1 (row g + 8), a2 (row g, k 8 + 2tq..), a3
                    for x, m in enumerate(masks):
                        row = frow0 + mt * 16 + g + 8 * (x & 1)
                        key = k0 + 16 * kk + 8 * (x >> 1) + 2 * tq
                        dropped[(row, key)] = (m & 0xFFFF) == 0
                        dropped[(row, key + 1)] = (m >> 16) == 0
    return dropped


FWD_TILES = sorted(set(_config.sm80_forward_tiles(dropout=True)), key=lambda t: (t.headdim_bucket, t.block_n))


@pytest.mark.parametrize("tile", FWD_TILES, ids=lambda t: f"d{t.headdim_bucket}-{t.block_m}x{t.block_n}")
@pytest.mark.parametrize("pack", [1, 4])
def test_forward_fragment_mask_equals_reference(tile, pack):
    seed, offset, p = 2**63 + 12345, (7 << 32) + 3, 0.3
    B_, H, sq, sk = 2, 8, 300, 3 * tile.block_n + 40
    pp = _P(seed, offset, H, p)
    want = np.asarray(reference.dropout_mask(seed, B_, H, sq, sk, p, offset))  # (b, h, sq, sk)
    b, hy = 1, 1                       # head group hy: heads hy * pack + (0..pack-1) when packed
    m0, k0 = tile.block_m, 2 * tile.block_n
    got = _fwd_dropped(tile, pp, b, hy, pack, sq, m0, k0)
    assert len(got) == tile.block_m * tile.block_n
    for (r, j), drop in got.items():
        i, h = (r, hy) if pack == 1 else (r // pack, hy * pack + r % pack)
        assert drop == (not want[b, h, i, j]), (r, j)


# ---- backward --------------------------------------------------------------------------------------------

def _bwd_tile_bits(tile, p, b, h, m0, n0):
    """(query row, key) -> (stored P sign bit, dS step's dropped flag, dV operand zeroed), as bwd_sm80.cu."""
    BM, BN, WMS = tile.block_m, tile.block_n, tile.warps_m_s
    WNS = 8 // WMS
    TMS, TNS = BM // WMS, BN // WNS
    MTS, NTS = TMS // 16, TNS // 8
    out = {}
    for w in range(8):
        wm, wn = w % WMS, w // WMS
        row0 = m0 + wm * TMS

        def rowinfo(lane, ri):
            return row0 + (lane >> 2) + 16 * (ri >> 1) + 8 * (ri & 1), h

        keeps = frag_keep_warp(p, b, n0 + wn * TNS, 2 * MTS, NTS // 2, rowinfo)
        for lane in range(32):
            even, odd = keeps[lane]
            g, tq = lane >> 2, lane & 3
            for mt in range(MTS):
                for hh in range(2):
                    for nt in range(NTS):
                        wd = odd if (nt & 1) else even
                        sign = (((~wd & M32) >> ((2 * mt + hh) * (NTS // 2) + (nt >> 1))) & 0x10001) << 15
                        pw = 0x3C003C00 | sign            # a packed pair of positive 16-bit values (1.0, 1.0)
                        dropped = (pw >> 15) & 0x10001    # the dS step
                        dv_op = pw & ~(dropped * 0xFFFF) & M32
                        i = row0 + g + 16 * mt + 8 * hh
                        j = n0 + wn * TNS + 8 * nt + 2 * tq
                        out[(i, j)] = (bool(pw & 0x8000), bool(dropped & 1), (dv_op & 0xFFFF) == 0)
                        out[(i, j + 1)] = (bool(pw & 0x80000000), bool(dropped >> 16), (dv_op >> 16) == 0)
    return out


@pytest.mark.parametrize("tile", B.tiles(dropout=True),
                         ids=lambda t: f"d{t.headdim_bucket}-st{t.stages}-w{t.warps_m_s}{t.warps_n_kv}{t.warps_m_q}")
def test_backward_fragment_mask_equals_reference(tile):
    seed, offset, p = 99, (1 << 32) + 17, 0.17
    B_, H, sq, sk = 2, 3, 2 * tile.block_m + 5, 3 * tile.block_n
    pp = _P(seed, offset, H, p)
    want = np.asarray(reference.dropout_mask(seed, B_, H, sq, sk, p, offset))
    b, h = 1, 2
    m0, n0 = tile.block_m, tile.block_n
    got = _bwd_tile_bits(tile, pp, b, h, m0, n0)
    assert len(got) == tile.block_m * tile.block_n
    for (i, j), (sign, drop, zero) in got.items():
        kept = bool(want[b, h, i, j])
        assert sign == drop == zero == (not kept), (i, j)
