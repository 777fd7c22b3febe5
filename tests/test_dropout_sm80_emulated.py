"""CPU emulation of the tensor-core kernels' dropout bit plumbing (no GPU needed).

``dropout_frag_keep`` (kernels_cu/philox.cuh) draws the keep bits of a thread's mma.sync C fragments: one
Philox call per (row, n8 tile), i.e. per 8 keys of a row, made by lane ``nt % 4`` of the quad that owns the
row; each word becomes two keep bits (two 16-bit draws compared at once, or one by one), gathered into
byte blocks per destination lane and transposed across the quad with two shuffles (``DropoutFrag`` holds
the result). The forward (fwd_sm80.cu) turns the bits into AND masks of the 16-bit P operand of O += P V
(``DropoutFrag::mask16``), the backward (bwd_sm80.cu) into sign bits of the P tile (``drop_sign``), read
back in the dS step. This module mirrors that code line by line in Python (prmt with its sign-replicate
mode, the shuffles), for every warp and lane of the kernels' tiles, and checks that the (row, key) pairs it
drops are exactly those of ``cuflash.reference.dropout_mask`` (the portable kernels' mask). A change to the
index or bit math of those functions must be mirrored here.
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


def prmt(a, b, sel):
    """PTX prmt.b32 (default mode): byte n of the result is byte sel[4n+2:4n] of {b, a}, or with sel bit
    4n+3 set that byte's sign bit replicated over the byte."""
    src = [(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF for k in range(4)]
    out = 0
    for n in range(4):
        nib = (sel >> (4 * n)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * n)
    return out


def swar_keep(w, thr):
    """The two-per-word comparison: bits 15 / 31 of the result are (w & 0xffff) >= thr / (w >> 16) >= thr."""
    H = 0x80008000
    Y = (thr * 0x10001) & M32
    ylo, ny = Y & ~H & M32, ~Y & M32
    a = ((w | H) - ylo) & M32
    return (w & ny) | (w & a) | (ny & a)


class _P:
    """The Params fields the generator reads."""

    def __init__(self, seed, offset, nheads, p):
        self.seed, self.rng_offset, self.nheads = seed, offset, nheads
        self.threshold = reference.dropout_threshold(p)


class Frag:
    """DropoutFrag<R, NT> of one lane: its word(s) and the index math of philox.cuh."""

    def __init__(self, R, NT, w):
        self.R, self.NT, self.w = R, NT, w
        self.calls = R * NT // 4
        self.words = 2 if self.calls > 4 else 1
        assert len(w) == self.words

    def _word_bit(self, ri, nt):
        word = (nt & 3) >> 1 if self.words == 2 else 0
        bit = ri * (self.NT // 4) + (nt >> 2) + (0 if self.words == 2 else self.calls * ((nt & 3) >> 1))
        return self.w[word], bit

    def mask16(self, ri, nt):
        w, bit = self._word_bit(ri, nt)
        return prmt((w << (7 - bit)) & M32, 0, 0xBB99 if nt & 1 else 0xAA88)

    def drop_sign(self, ri, nt):
        w, bit = self._word_bit(ri, nt)
        return ~((w << (15 - bit - 8 * (nt & 1))) & M32) & 0x80008000


def frag_keep_warp(p, b, k0, R, NT, rowinfo, swar=True):
    """dropout_frag_keep for the 32 lanes of a warp: a Frag per lane. rowinfo(lane, ri) -> (i, h)."""
    assert NT % 4 == 0 and 1 <= R * NT // 4 <= 8 and k0 % 8 == 0
    key0, key1 = p.seed & M32, ((p.seed >> 32) ^ (p.rng_offset >> 32)) & M32
    calls = R * NT // 4
    x = [[0, 0] for _ in range(32)]
    for lane in range(32):
        s = lane & 3
        for ri in range(R):
            i, h = rowinfo(lane, ri)
            cz = b * p.nheads + h
            for q in range(NT // 4):
                wd = _philox((k0 >> 3) + 4 * q + s, i, cz, p.rng_offset, key0, key1)
                t = ri * (NT // 4) + q
                if swar:
                    ge = [swar_keep(w, p.threshold) for w in wd]
                    for m in range(2):
                        x[lane][m] |= prmt(ge[2 * m], ge[2 * m + 1], 0xFBD9) & (0x01010101 << t)
                else:
                    for d in range(4):
                        x[lane][d >> 1] |= ((int((wd[d] & 0xFFFF) >= p.threshold) << (8 * (d & 1) + t))
                                            | (int((wd[d] >> 16) >= p.threshold) << (8 * (d & 1) + t + 16)))
    # the transpose: two full-warp xor shuffles
    hi2 = [bool(ln & 2) for ln in range(32)]
    c = [bool(ln & 1) for ln in range(32)]
    k = [x[ln][1] if hi2[ln] else x[ln][0] for ln in range(32)]
    send1 = [x[ln][0] if hi2[ln] else x[ln][1] for ln in range(32)]
    tr = [send1[ln ^ 2] for ln in range(32)]                                  # __shfl_xor_sync(.., 2)
    send2 = [prmt(k[ln], tr[ln], 0x2604 if c[ln] else 0x7351) for ln in range(32)]
    rv = [send2[ln ^ 1] for ln in range(32)]                                  # __shfl_xor_sync(.., 1)
    out = []
    for ln in range(32):
        mine = 0xFF00FF00 if c[ln] else 0x00FF00FF
        g = (k[ln] & mine) | (rv[ln] & ~mine & M32)
        hh = prmt(tr[ln], rv[ln], 0x3715 if c[ln] else 0x6240)
        f0, f1 = (hh, g) if hi2[ln] else (g, hh)
        out.append(Frag(R, NT, [f0, f1] if calls > 4 else [f0 | ((f1 << calls) & M32)]))
    return out


# ---- the pieces ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("thr", [0, 1, 2, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 6554, 58982, 0xFFFE, 0xFFFF])
def test_swar_compare_is_exact(thr):
    """Both halves of every 16-bit value against the threshold (each value meets every other one's half)."""
    v = np.arange(1 << 16, dtype=np.uint64)
    rng = np.random.default_rng(thr)
    for hi in (v, rng.permutation(v), v[::-1].copy()):
        w = (hi << np.uint64(16)) | v
        H, Y = 0x80008000, (thr * 0x10001) & M32
        a = ((w | np.uint64(H)) - np.uint64(Y & ~H & M32)) & np.uint64(M32)
        ny = np.uint64(~Y & M32)
        ge = (w & ny) | (w & a) | (ny & a)
        assert ((ge >> np.uint64(15)) & np.uint64(1) == (v >= thr)).all()
        assert ((ge >> np.uint64(31)) & np.uint64(1) == (hi >= thr)).all()


def test_prmt_emulation():
    """The PTX ISA's rule for the selectors the kernels use (sign mode: 0x8 | byte index)."""
    assert prmt(0x80000000, 0, 0xBB99) == 0xFFFF0000  # bytes 0, 1 <- sign of byte 1; 2, 3 <- sign of byte 3
    assert prmt(0x00008000, 0, 0xBB99) == 0x0000FFFF
    assert prmt(0x00800080, 0, 0xAA88) == 0xFFFFFFFF
    assert prmt(0x11223344, 0x55667788, 0x7351) == 0x55117733


@pytest.mark.parametrize("R,NT", [(2, 4), (4, 4), (2, 8), (4, 8)])
@pytest.mark.parametrize("swar", [True, False])
def test_frag_bits_equal_reference(R, NT, swar):
    """Every lane's bit for every (row, n8 tile, key pair) against the reference mask (rows: quad-dependent)."""
    seed, offset, p = 0xDEADBEEF12345678, (5 << 32) + 9, 0.37
    B_, H = 1, 2
    pp = _P(seed, offset, H, p)
    k0 = 64
    rowinfo = lambda lane, ri: (3 + 8 * (lane >> 2) + 64 * ri, 1)  # noqa: E731
    frags = frag_keep_warp(pp, 0, k0, R, NT, rowinfo, swar=swar)
    want = np.asarray(reference.dropout_mask(seed, B_, H, 3 + 8 * 8 + 64 * R, k0 + 8 * NT, p, offset))
    for lane, f in enumerate(frags):
        for ri in range(R):
            i, h = rowinfo(lane, ri)
            for nt in range(NT):
                m, sgn = f.mask16(ri, nt), f.drop_sign(ri, nt)
                for e in range(2):
                    j = k0 + 8 * nt + 2 * (lane & 3) + e
                    kept = bool(want[0, h, i, j])
                    assert ((m >> (16 * e)) & 0xFFFF) == (0xFFFF if kept else 0), (lane, ri, nt, e)
                    assert bool(sgn & (0x8000 << (16 * e))) == (not kept), (lane, ri, nt, e)


# ---- forward ---------------------------------------------------------------------------------------------

def _fwd_dropped(tile, p, b, hy, pack, sq, m0, k0):
    """(row r of the block's packed rows, key) -> dropped, as fwd_sm80.cu zeroes the P operand."""
    BM, BN, W = tile.block_m, tile.block_n, tile.warps
    kWarpRows = BM // W
    kMT, kNT = kWarpRows // 16, BN // 8
    dropped = {}
    for w in range(W):
        frow0 = m0 + w * kWarpRows

        def rowinfo(lane, ri):
            r = frow0 + (lane >> 2) + (ri >> 1) * 16 + (ri & 1) * 8
            return (r if pack == 1 else r // pack), (hy if pack == 1 else hy * pack + r % pack)

        keeps = frag_keep_warp(p, b, k0, 2 * kMT, kNT, rowinfo)
        for lane in range(32):
            keep = keeps[lane]
            g, tq = lane >> 2, lane & 3
            for kk in range(BN // 16):
                for mt in range(kMT):
                    masks = [keep.mask16(2 * mt, 2 * kk), keep.mask16(2 * mt + 1, 2 * kk),
                             keep.mask16(2 * mt, 2 * kk + 1), keep.mask16(2 * mt + 1, 2 * kk + 1)]
                    # m16n8k16 A fragment: a0 (row g, k 2tq..), a1 (row g + 8), a2 (row g, k 8 + 2tq..), a3
                    for x, m in enumerate(masks):
                        row = frow0 + mt * 16 + g + 8 * (x & 1)
                        key = k0 + 16 * kk + 8 * (x >> 1) + 2 * tq
                        dropped[(row, key)] = (m & 0xFFFF) == 0
                        dropped[(row, key + 1)] = (m >> 16) == 0
                        assert (m & 0xFFFF) in (0, 0xFFFF) and (m >> 16) in (0, 0xFFFF)
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
    wide = 2 * MTS * NTS > 16          # kDropWide: the comparison and the dS code of bwd_sm80.cu
    out = {}
    for w in range(8):
        wm, wn = w % WMS, w // WMS
        row0 = m0 + wm * TMS

        def rowinfo(lane, ri):
            return row0 + (lane >> 2) + 16 * (ri >> 1) + 8 * (ri & 1), h

        keeps = frag_keep_warp(p, b, n0 + wn * TNS, 2 * MTS, NTS, rowinfo, swar=wide)
        for lane in range(32):
            keep = keeps[lane]
            g, tq = lane >> 2, lane & 3
            for mt in range(MTS):
                for hh in range(2):
                    for nt in range(NTS):
                        sign = keep.drop_sign(2 * mt + hh, nt)
                        pw = 0x3C003C00 | sign            # a packed pair of positive 16-bit values (1.0, 1.0)
                        # the dS step: Z r = 0 where the sign bit is set; dV's operand with those halves zeroed
                        if wide:
                            zr0, zr1 = (0 if pw & 0x8000 else 1), (0 if pw & 0x80000000 else 1)
                            dv_op = pw & ~prmt(pw, 0, 0xBB99) & M32
                        else:
                            dropped = (pw >> 15) & 0x10001
                            zr0, zr1 = (0 if dropped & 1 else 1), (0 if dropped >> 16 else 1)
                            dv_op = pw & ~(dropped * 0xFFFF) & M32
                        i = row0 + g + 16 * mt + 8 * hh
                        j = n0 + wn * TNS + 8 * nt + 2 * tq
                        out[(i, j)] = (bool(pw & 0x8000), zr0 == 0, (dv_op & 0xFFFF) == 0)
                        out[(i, j + 1)] = (bool(pw & 0x80000000), zr1 == 0, (dv_op >> 16) == 0)
                        assert dv_op & 0xFFFF in (0, 0x3C00) and dv_op >> 16 in (0, 0x3C00)
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
