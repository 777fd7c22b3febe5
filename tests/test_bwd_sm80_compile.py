"""CPU tests of the tensor-core backward (``kernels_cu/bwd_sm80.cu``, ``cuflash/_launch_bwd_sm80.py``).

No GPU needed.

* Compilation: every variant ``_launch_bwd_sm80.variants(arch)`` lists (what the dispatcher can pick on
  that architecture's GPUs) compiles for sm_80 and sm_90a with no spills and no stack frame, at most 255 registers, no static shared memory; the host's tile table
  equals the kernel traits (static_asserts compiled by NVRTC) and fits the 227 KB per-block limit.
* SASS (where a cuobjdump, or a ptxas + cuobjdump pair, can read the code): tensor-core MMA, ldmatrix
  (plain and .trans), cp.async, vector fp32 reductions on sm90, 128-bit stores, no local memory.
* Emulation: a NumPy model of the kernel's fragment and shared-memory index math (ldmatrix / mma
  m16n8k16 fragment semantics of the PTX ISA, the swizzled tile layout, every GEMM's lane addressing,
  the P / dS stores, the dK / dV staging, the tile loaders) checked against plain matrix products for
  every head-dim bucket, with a bank-conflict check of every ldmatrix phase and 32-bit store; and a
  block-level model of the kernel's control flow (query-block ranges, masking decisions, GQA loop,
  deterministic splits, padded scratch) checked against the float64 reference with the GPU suite's
  error rule. The models mirror the CUDA code line by line: a change to the kernel's index math or
  control flow must be mirrored here.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

from cuflash import _compile

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch_bwd_sm80 as L  # noqa: E402

from .compile_util import ARCHS, compile_variants, sass_of_cubin, sass_via_ptxas  # noqa: E402
from .compile_util import requires_nvrtc as needs_nvrtc  # noqa: E402

SMEM_LIMIT = 227 * 1024


# ==== compilation ===================================================================================

@pytest.fixture(scope="module")
def compiled():
    return compile_variants(L.variants)  # each arch: what the dispatcher can pick there


def test_variant_list():
    v = L.variants()
    # every tile with and without dropout, plus preprocess and convert, for both dtypes
    assert len(v) == len(set(v)) == 2 * (2 * (len(L.TILES) + len(L.TILES_SMALL_SMEM)) + 2) == 44
    assert {f for f, _ in v} == {"bwd_sm80.cu"}
    names = [n for _, n in v]
    for ct in ("cuflash::half_t", "cuflash::bf16_t"):
        assert f"cuflash::bwd_sm80_preprocess<{ct}>" in names
        assert f"cuflash::bwd_sm80_dq_convert<{ct}>" in names
        for d in L.HEADDIM_BUCKETS:
            assert f"cuflash::bwd_sm80<{ct}, {d}, 2>" in names
            assert f"cuflash::bwd_sm80<{ct}, {d}, 2, true>" in names
        for d in L.TILES_SMALL_SMEM:
            assert f"cuflash::bwd_sm80<{ct}, {d}, 1>" in names
            assert f"cuflash::bwd_sm80<{ct}, {d}, 1, true>" in names
    # d 128 with dropout: its own warp grids (the regular tile's DROPOUT variant spilled with NVRTC 13.0),
    # under the regular kernel name with ", true"; the regular tile is never used with dropout
    t128 = L.TILES_DROPOUT[128]
    assert L.tile_for(128, None, dropout=True) == t128 != L.tile_for(128)
    assert t128 in L.tiles(True) and L.TILES[128] not in L.tiles(True) and t128 not in L.tiles(False)
    assert L.kernel_names("bfloat16", t128, dropout=True)["main"] == "cuflash::bwd_sm80<cuflash::bf16_t, 128, 2, true>"
    for tile, drop in ((t128, False), (L.TILES[128], True)):
        with pytest.raises(ValueError):
            L.kernel_names("bfloat16", tile, drop)


def test_variant_lists_per_arch():
    """variants(arch) lists exactly what the dispatcher can pick on that arch's GPUs; None is the union."""
    from cuflash import _config

    union = set()
    archs = [(f"sm_{n}", lim) for n, lim in _config.SMEM_PER_BLOCK_BY_ARCH.items()] + [("sm_90a", SMEM_LIMIT)]
    for arch, limit in archs:
        v = L.variants(arch)
        assert len(v) == len(set(v))
        picked = {L.kernel_names(dt, L.tile_for(hd, limit, drop), drop)["main"]
                  for hd in range(1, 257) for dt in L._DTYPES for drop in (False, True) if L.tile_for(hd, limit)}
        if picked:
            picked |= {L.kernel_names(dt, L.TILES[32])[k] for dt in L._DTYPES for k in ("preprocess", "convert")}
        assert {n for _, n in v} == picked, arch
        union |= set(v)
    assert union == set(L.variants()) == set(L.variants("compute_90"))
    assert L.variants("sm_75") == [] and L.variants("sm_86") == []   # 99 KB GPUs: the portable backward
    assert len(L.variants("sm_80")) == len(L.variants("sm_90a")) == 36
    single = {f"cuflash::bwd_sm80<{ct}, {d}, 1{x}>" for ct in ("cuflash::half_t", "cuflash::bf16_t")
              for d in (224, 256) for x in ("", ", true")}
    assert single <= {n for _, n in L.variants("sm_80")}                # A100: single-stage 224 and 256
    assert not single & {n for _, n in L.variants("sm_90a")}            # never picked on an H100


def test_every_headdim_has_a_tile():
    names = [n for _, n in L.variants()]
    for hd in range(1, 257):
        for limit in (None, 227 * 1024, 163 * 1024):
            for drop in (False, True):
                t = L.tile_for(hd, limit, drop)
                assert t is not None and t.headdim_bucket >= hd and t.headdim_bucket - hd < 32, (hd, limit)
                assert limit is None or t.smem <= limit
                assert L.kernel_names("bfloat16", t, drop)["main"] in names
                assert t in L.tiles(drop)
        assert L.tile_for(hd, 227 * 1024).stages == 2 and L.tile_for(hd, 227 * 1024, True).stages == 2
    assert L.tile_for(256, 163 * 1024).stages == 1 and L.tile_for(128, 163 * 1024).stages == 2
    assert L.tile_for(64, 99 * 1024) is None  # sm86 / sm89: the portable path
    with pytest.raises(ValueError):
        L.tile_for(257)


@needs_nvrtc
def test_no_spills_no_stack(compiled):
    assert len(compiled) == sum(len(L.variants(a)) for a in ARCHS)
    bad = {job: r for job, (r, _) in compiled.items()
           if not r or r["spill_stores"] or r["spill_loads"] or r["stack"] or r["registers"] > 255}
    assert not bad, f"variants with spills / stack / > 255 registers: {bad}"


@needs_nvrtc
def test_registers_and_shared_memory(compiled):
    for (arch, f, n), (r, _) in compiled.items():
        assert r["smem"] == 0, (arch, n, r)  # all shared memory is dynamic, sized by the host
        threads = L.THREADS if "bwd_sm80<" in n else L.ROW_THREADS
        assert r["registers"] * threads <= 65536, (arch, n, r)
    for t in L.all_tiles():
        assert t.smem <= SMEM_LIMIT, t
        assert t.smem % 16 == 0
    for t in L.TILES_SMALL_SMEM.values():
        assert t.smem <= 163 * 1024, t  # the A100


@needs_nvrtc
def test_host_table_matches_kernel_traits():
    src = _compile.build_source(L.FILE) + "\n" + "\n".join(L.expected_traits_checks()) + "\n"
    _compile._nvrtc_compile(src, "bwd_sm80_traits_check.cu", (), _compile._options("sm_80", ()))


# ==== SASS ===========================================================================================

@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_sass_uses_tensor_core_paths(compiled, arch):
    checked = 0
    for (a, f, n), (r, path) in compiled.items():
        if a != arch or "bwd_sm80<" not in n:
            continue
        sass = sass_of_cubin(path) or sass_via_ptxas(arch, L.FILE, n)
        if sass is None:
            pytest.skip("no cuobjdump (or ptxas + cuobjdump) that reads these kernels on this machine")
        red = "REDG.E.ADD.F32x2" if arch == "sm_90a" else "RED.E.ADD.F32"
        for op in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128", red, "STG.E.128"):
            assert op in sass, (arch, n, op)
        if "bf16_t" in n:
            assert "HMMA.16816.F32.BF16" in sass, (arch, n)
        assert not re.search(r"\b(LDL|STL)\b", sass), (arch, n, "local memory")
        checked += 1
    assert checked == sum("bwd_sm80<" in n for _, n in L.variants(arch))


# ==== support and plan (no device needed) ===================================================================

class _FakeArray:
    def __init__(self, shape, strides_elems, ptr=0, itemsize=2):
        self.shape, self.ndim, self.itemsize = tuple(shape), len(shape), itemsize
        self.strides = tuple(s * itemsize for s in strides_elems)

        class _D:
            pass

        self.data = _D()
        self.data.ptr = ptr


def _fake_run(**kw):
    from cuflash._launch import Run

    b, sq, sk, h, hk, d = kw.pop("shape", (2, 100, 120, 4, 2, 64))
    pad = kw.pop("pad", d)

    def arr(s, heads):
        return _FakeArray((b, s, heads, d), (s * heads * pad, heads * pad, pad, 1), ptr=4096)

    q, k, v = arr(sq, h), arr(sk, hk), arr(sk, hk)
    args = dict(device_id=0, arch="sm_90a", stream=None, dtype="bfloat16", q=q, k=k, v=v, out=arr(sq, h),
                lse=object(), dout=arr(sq, h), dq=arr(sq, h), dk=arr(sk, hk), dv=arr(sk, hk))
    args.update(kw)
    return Run(**args)


def test_supports_rules(monkeypatch):
    monkeypatch.setattr(L, "_smem_optin", lambda dev: 227 * 1024)
    assert L.supports(_fake_run())
    assert not L.supports(_fake_run(dtype="float32"))
    assert not L.supports(_fake_run(arch="sm_75"))
    assert L.supports(_fake_run(dropout_p=0.1))                          # the DROPOUT variants
    assert L.plan(_fake_run(dropout_p=0.1))["names"]["main"] == "cuflash::bwd_sm80<cuflash::bf16_t, 64, 2, true>"
    assert L.plan(_fake_run())["names"]["main"] == "cuflash::bwd_sm80<cuflash::bf16_t, 64, 2>"
    pl = L.plan(_fake_run(shape=(1, 10, 10, 2, 2, 128), dropout_p=0.1))   # d 128: the dropout-only tile
    assert pl["tile"] == L.TILES_DROPOUT[128] and pl["names"]["main"] == "cuflash::bwd_sm80<cuflash::bf16_t, 128, 2, true>"
    assert L.plan(_fake_run(shape=(1, 10, 10, 2, 2, 128)))["tile"] == L.TILES[128]
    assert not L.supports(_fake_run(shape=(1, 10, 10, 2, 2, 59)))        # rows not 16-byte aligned
    assert L.supports(_fake_run(shape=(1, 10, 10, 2, 2, 59), pad=64))    # padded rows are
    r = _fake_run()
    r.dk = _FakeArray(r.dk.shape, (1, 1, 1, 1), ptr=4096)                # an output that is not
    assert not L.supports(r)
    assert not L.supports(_fake_run(shape=(1, 10, 10, 2, 2, 300)))
    monkeypatch.setattr(L, "_smem_optin", lambda dev: 163 * 1024)        # A100: single-stage 224 and 256
    assert L.supports(_fake_run(shape=(1, 10, 10, 2, 2, 128)))
    assert L.supports(_fake_run(shape=(1, 10, 10, 2, 2, 256)))
    assert L.plan(_fake_run(shape=(1, 10, 10, 2, 2, 256)))["names"]["main"].endswith(", 256, 1>")
    monkeypatch.setattr(L, "_smem_optin", lambda dev: 99 * 1024)         # sm86 / sm89: portable path
    assert not L.supports(_fake_run(shape=(1, 10, 10, 2, 2, 64)))


def test_plan_and_splits(monkeypatch):
    monkeypatch.setattr(L, "_num_sms", lambda dev: 132)
    monkeypatch.setattr(L, "_smem_optin", lambda dev: 227 * 1024)
    r = _fake_run(shape=(2, 1000, 1537, 4, 2, 64))
    pl = L.plan(r)
    t = L.TILES[64]
    assert pl["splits"] == 1 and pl["grid_main"] == (-(-1537 // t.block_n), 2, 2)
    assert pl["sq_pad"] == 1024 and pl["grid_rows"] == (32, 4, 2) and pl["grid_convert"] == (32, 4, 2)
    r.deterministic = True
    # sm_90a: the ordered mode (one block per key block; dq_accum planes: 2 with a lower part above 8 key
    # blocks; counters per (batch, head, query block, plane))
    pl = L.plan(r)
    assert pl["ordered"] and pl["splits"] == 2 and pl["grid_main"] == (pl["n_blocks"], 2, 2)
    assert pl["counters"] == 2 * 4 * -(-1000 // t.block_m) * 2
    causal = _fake_run(shape=(2, 1000, 1000, 4, 2, 64))
    causal.deterministic, causal.window = True, (-1, 0)
    assert L.plan(causal)["splits"] == 1  # causal, square: no lower part
    short = _fake_run(shape=(2, 300, 500, 4, 2, 64))
    short.deterministic = True
    assert L.plan(short)["splits"] == 1  # 8 key blocks: one plane
    # explicit splits, a left window, or sm_80: per-split dQ copies
    assert L.plan(r, splits=3)["splits"] == 3 and L.plan(r, splits=10**6)["splits"] == pl["n_blocks"]
    assert not L.plan(r, splits=3)["ordered"]
    r.window = (100, -1)
    pl = L.plan(r)
    assert not pl["ordered"] and 1 <= pl["splits"] <= pl["n_blocks"] and pl["grid_main"] == (pl["splits"], 2, 2)
    r.window, r.arch = (-1, -1), "sm_80"
    pl = L.plan(r)
    assert not pl["ordered"] and 1 <= pl["splits"] <= pl["n_blocks"] and pl["grid_main"] == (pl["splits"], 2, 2)
    # a grid that already fills the GPU needs no split; a small one does; the memory cap holds
    assert L.deterministic_splits(8, 16, 16, 4096, 4096, L.TILES[128], 132) == 1
    assert L.deterministic_splits(1, 16, 16, 4096, 4096, L.TILES[128], 132) > 1
    s = L.deterministic_splits(1, 1, 1, 131072, 131072, L.TILES[128], 132)
    assert s == 1 or s * 131072 * 128 * 4 <= L.MAX_SPLIT_BYTES


# ==== emulation of the kernel's index math ======================================================================
# Mirrors traits_bwd_sm80.cuh (chunk_off, lane_off64 / lane_off32, step_addr) and bwd_sm80.cu (lane roles,
# the GEMM loops, the P / dS stores, the dK / dV staging, load_tile).

def _chunk_off(R, C, r, c):
    kf = C // 64
    if c < kf * 8:
        return (c >> 3) * R * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4)
    return kf * R * 128 + r * 64 + (((c & 3) ^ ((r >> 1) & 3)) << 4)


def _lane_off64(R, C, row, cl):
    return row * 128 + ((cl ^ (row & 7)) << 4)


def _lane_off32(R, C, row, cl):
    return (C // 64) * R * 128 + row * 64 + ((cl ^ ((row >> 1) & 3)) << 4)


def _step_addr(R, C, W, b64, b32, k, j):
    kf = C // 64
    c = 2 * W * k
    if c < 8 * kf:
        return (b64 ^ ((c & 7) << 4)) + ((c >> 3) * R * 128 + j * 16 * 128)
    return (b32 ^ (((c - 8 * kf) & 3) << 4)) + j * 16 * 64


def _rowA(ft): return (ft & 7) + ((ft >> 3) & 1) * 8   # noqa: E704
def _bitA(ft): return (ft >> 4) & 1                     # noqa: E704
def _rowB(ft): return (ft & 7) + ((ft >> 4) & 1) * 8   # noqa: E704
def _bitB(ft): return (ft >> 3) & 1                     # noqa: E704
def _fg(ft): return (ft & 31) >> 2                      # noqa: E704
def _ftq(ft): return ft & 3                             # noqa: E704


class _Shape:
    def __init__(self, t):
        self.D, self.BM, self.BN = t.headdim_bucket, t.block_m, t.block_n
        self.WMS, self.WNS = t.warps_m_s, 8 // t.warps_m_s
        self.TMS, self.TNS = self.BM // self.WMS, self.BN // self.WNS
        self.MTS, self.NTS = self.TMS // 16, self.TNS // 8
        self.KSD = self.D // 16
        self.WNKV, self.WDKV = t.warps_n_kv, 8 // t.warps_n_kv
        self.MTKV, self.SKV, self.KSM = self.BN // 16 // self.WNKV, self.D // 16 // self.WDKV, self.BM // 16
        self.WMQ, self.WDQ = t.warps_m_q, 8 // t.warps_m_q
        self.TMQ = self.BM // self.WMQ
        self.MTQ, self.SQ, self.KSN = self.TMQ // 16, self.D // 16 // self.WDQ, self.BN // 16


class _Smem:
    """Byte-addressed shared memory of 16-bit values (float64: exact for small integers)."""

    def __init__(self, nbytes):
        self.v = np.full(nbytes // 2, np.nan)

    def put(self, base, M):
        R, C = M.shape
        for r in range(R):
            for c in range(C // 8):
                o = (base + _chunk_off(R, C, r, c)) // 2
                self.v[o:o + 8] = M[r, 8 * c:8 * c + 8]

    def ldsm_x4(self, addrs, trans=False):
        """PTX ldmatrix .x4 (.trans): lanes 8i..8i+7 give the row addresses of matrix i; register i of
        lane l holds (row l / 4, columns 2 (l % 4), +1) of matrix i (of its transpose with .trans)."""
        regs = np.empty((32, 4, 2))
        for i in range(4):
            rows = [addrs[8 * i + r] for r in range(8)]
            assert all(a % 16 == 0 for a in rows)
            assert len({(a // 16) % 8 for a in rows}) == 8, ("ldmatrix bank conflict", rows)
            Mi = np.stack([self.v[a // 2:a // 2 + 8] for a in rows])
            if trans:
                Mi = Mi.T
            for lane in range(32):
                regs[lane, i] = Mi[lane // 4, 2 * (lane % 4):2 * (lane % 4) + 2]
        return regs


def _mma(c, a, b0, b1):
    """PTX mma.m16n8k16 fragments: a = {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)},
    b = {(k 2t.., n g), (k 2t+8.., n g)}, c = {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane, 0], a[lane, 1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[lane, 2], a[lane, 3]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b0[lane], b1[lane]
    Cm = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        c[lane] += (Cm[g, 2 * t], Cm[g, 2 * t + 1], Cm[g + 8, 2 * t], Cm[g + 8, 2 * t + 1])


def _gemm_nt(sh, sm, sa, sb):  # gemm_nt: S = Q K^T, dP = dO V^T; returns the BM x BN result (C mapping)
    BM, BN, D = sh.BM, sh.BN, sh.D
    M = np.full((BM, BN), np.nan)
    for w in range(8):
        fts = [32 * w + lane for lane in range(32)]
        acc = np.zeros((sh.MTS, sh.NTS, 32, 4))
        ra = [(ft >> 5) % sh.WMS * sh.TMS + _rowA(ft) for ft in fts]
        rb = [(ft >> 5) // sh.WMS * sh.TNS + _rowB(ft) for ft in fts]
        a64 = [sa + _lane_off64(BM, D, ra[i], _bitA(fts[i])) for i in range(32)]
        a32 = [sa + _lane_off32(BM, D, ra[i], _bitA(fts[i])) for i in range(32)]
        b64 = [sb + _lane_off64(BN, D, rb[i], _bitB(fts[i])) for i in range(32)]
        b32 = [sb + _lane_off32(BN, D, rb[i], _bitB(fts[i])) for i in range(32)]
        for ks in range(sh.KSD):
            a = [sm.ldsm_x4([_step_addr(BM, D, 1, a64[i], a32[i], ks, mt) for i in range(32)]) for mt in range(sh.MTS)]
            for np_ in range(sh.NTS // 2):
                b = sm.ldsm_x4([_step_addr(BN, D, 1, b64[i], b32[i], ks, np_) for i in range(32)])
                for mt in range(sh.MTS):
                    _mma(acc[mt, 2 * np_], a[mt], b[:, 0], b[:, 1])
                    _mma(acc[mt, 2 * np_ + 1], a[mt], b[:, 2], b[:, 3])
        for lane, ft in enumerate(fts):
            rbase, kc = (ft >> 5) % sh.WMS * sh.TMS + _fg(ft), (ft >> 5) // sh.WMS * sh.TNS + 2 * _ftq(ft)
            for mt in range(sh.MTS):
                for nt in range(sh.NTS):
                    for x in range(4):
                        r, c = rbase + 16 * mt + 8 * (x >> 1), kc + 8 * nt + (x & 1)
                        assert np.isnan(M[r, c])
                        M[r, c] = acc[mt, nt, lane, x]
    return M


def _kv_pos(sh, ft, i, n, x):  # dK / dV accumulator element -> (key row, column, chunk): the epilogue's mapping
    row = 16 * ((ft >> 5) % sh.WNKV + sh.WNKV * i) + 8 * (x >> 1) + _fg(ft)
    chunk = 2 * ((ft >> 5) // sh.WNKV + sh.WDKV * (n >> 1)) + (n & 1)
    return row, 8 * chunk + 2 * _ftq(ft) + (x & 1), chunk


def _gemm_tn(sh, sm, sa, sb):  # gemm_tn: dV += P^T dO, dK += dS^T Q; returns BN x D
    BM, BN, D = sh.BM, sh.BN, sh.D
    M = np.full((BN, D), np.nan)
    for w in range(8):
        fts = [32 * w + lane for lane in range(32)]
        acc = np.zeros((sh.MTKV, 2 * sh.SKV, 32, 4))
        a64 = [sa + _lane_off64(BM, BN, _rowB(ft), 2 * ((ft >> 5) % sh.WNKV) + _bitB(ft)) for ft in fts]
        cl = [2 * ((ft >> 5) // sh.WNKV) + _bitA(ft) for ft in fts]
        b64 = [sb + _lane_off64(BM, D, _rowA(fts[i]), cl[i]) for i in range(32)]
        b32 = [sb + _lane_off32(BM, D, _rowA(fts[i]), cl[i]) for i in range(32)]
        for kk in range(sh.KSM):
            a = [sm.ldsm_x4([_step_addr(BM, BN, sh.WNKV, a64[j], a64[j], i, kk) for j in range(32)], trans=True)
                 for i in range(sh.MTKV)]
            for k in range(sh.SKV):
                b = sm.ldsm_x4([_step_addr(BM, D, sh.WDKV, b64[j], b32[j], k, kk) for j in range(32)], trans=True)
                for i in range(sh.MTKV):
                    _mma(acc[i, 2 * k], a[i], b[:, 0], b[:, 1])
                    _mma(acc[i, 2 * k + 1], a[i], b[:, 2], b[:, 3])
        for lane, ft in enumerate(fts):
            for i in range(sh.MTKV):
                for n in range(2 * sh.SKV):
                    for x in range(4):
                        r, c, _ = _kv_pos(sh, ft, i, n, x)
                        assert np.isnan(M[r, c])
                        M[r, c] = acc[i, n, lane, x]
    return M


def _gemm_dq(sh, sm, sdS, sK):  # dQ = dS K, scattered with the red_add2 addressing; returns BM x D
    BM, BN, D = sh.BM, sh.BN, sh.D
    M = np.full((BM, D), np.nan)
    for w in range(8):
        fts = [32 * w + lane for lane in range(32)]
        acc = np.zeros((sh.MTQ, 2 * sh.SQ, 32, 4))
        a64 = [sdS + _lane_off64(BM, BN, (ft >> 5) % sh.WMQ * sh.TMQ + _rowA(ft), _bitA(ft)) for ft in fts]
        cl = [2 * ((ft >> 5) // sh.WMQ) + _bitA(ft) for ft in fts]
        b64 = [sK + _lane_off64(BN, D, _rowA(fts[i]), cl[i]) for i in range(32)]
        b32 = [sK + _lane_off32(BN, D, _rowA(fts[i]), cl[i]) for i in range(32)]
        for ks in range(sh.KSN):
            a = [sm.ldsm_x4([_step_addr(BM, BN, 1, a64[i], a64[i], ks, mt) for i in range(32)]) for mt in range(sh.MTQ)]
            for k in range(sh.SQ):
                b = sm.ldsm_x4([_step_addr(BN, D, sh.WDQ, b64[i], b32[i], k, ks) for i in range(32)], trans=True)
                for mt in range(sh.MTQ):
                    _mma(acc[mt, 2 * k], a[mt], b[:, 0], b[:, 1])
                    _mma(acc[mt, 2 * k + 1], a[mt], b[:, 2], b[:, 3])
        for lane, ft in enumerate(fts):
            base = ((ft >> 5) % sh.WMQ * sh.TMQ + _fg(ft)) * D + 16 * ((ft >> 5) // sh.WMQ) + 2 * _ftq(ft)
            for mt in range(sh.MTQ):
                for hh in range(2):
                    for n in range(2 * sh.SQ):
                        off = base + (16 * mt + 8 * hh) * D + 16 * sh.WDQ * (n >> 1) + 8 * (n & 1)
                        assert off % 2 == 0  # 8-byte aligned pair: one vector red on sm90
                        for e in range(2):
                            r, c = divmod(off + e, D)
                            assert np.isnan(M[r, c])
                            M[r, c] = acc[mt, n, lane, 2 * hh + e]
    return M


def _load_tile_plan(R, C, NT, nvalid, headdim):
    """load_tile's cp.async plan: destination -> (row, column, bytes); every chunk exactly once."""
    seen = {}
    kf = C // 64
    for tid in range(NT):
        parts = []
        if kf:
            parts.append((NT // 8, tid & 7, tid >> 3, [(blk, blk * 64 + (tid & 7) * 8) for blk in range(kf)], 128))
        if C % 64:
            parts.append((NT // 4, tid & 3, tid >> 2, [(kf, kf * 64 + (tid & 3) * 8)], 64))
        for RP, c, r0, cols, rowbytes in parts:
            for pss in range((R + RP - 1) // RP):
                rr = r0 + pss * RP
                if R % RP and rr >= R:
                    continue
                for blk, col in cols:
                    nb = 2 * min(max(headdim - col, 0), 8) if rr < nvalid else 0
                    if rowbytes == 128:
                        dst = blk * R * 128 + rr * 128 + ((c ^ (rr & 7)) << 4)
                    else:
                        dst = kf * R * 128 + rr * 64 + ((c ^ ((rr >> 1) & 3)) << 4)
                    assert dst == _chunk_off(R, C, rr, col // 8) and dst not in seen
                    seen[dst] = (rr, col, nb)
    assert len(seen) == R * C // 8
    return seen


@pytest.mark.parametrize("tile", [L.TILES[d] for d in L.HEADDIM_BUCKETS] + list(L.TILES_DROPOUT.values()),
                         ids=lambda t: f"d{t.headdim_bucket}-{t.warps_m_s}{t.warps_n_kv}{t.warps_m_q}")
def test_fragment_index_math_emulated(tile):
    d = tile.headdim_bucket
    sh = _Shape(tile)
    BM, BN, D = sh.BM, sh.BN, sh.D
    rng = np.random.default_rng(d)
    mats = {n: rng.integers(-3, 4, shape).astype(float) for n, shape in
            (("Q", (BM, D)), ("dO", (BM, D)), ("K", (BN, D)), ("V", (BN, D)), ("P", (BM, BN)), ("dS", (BM, BN)))}
    bases, off = {}, 1024  # 128-aligned, nonzero tile addresses: the XOR addressing must not touch them
    for n, M in mats.items():
        bases[n], off = off, off + M.size * 2
    sm = _Smem(off)
    for n, M in mats.items():
        sm.put(bases[n], M)
    Q, dO, K, V, P, dS = (mats[n] for n in ("Q", "dO", "K", "V", "P", "dS"))
    assert np.array_equal(_gemm_nt(sh, sm, bases["Q"], bases["K"]), Q @ K.T)
    assert np.array_equal(_gemm_nt(sh, sm, bases["dO"], bases["V"]), dO @ V.T)
    assert np.array_equal(_gemm_tn(sh, sm, bases["P"], bases["dO"]), P.T @ dO)
    assert np.array_equal(_gemm_tn(sh, sm, bases["dS"], bases["Q"]), dS.T @ Q)
    assert np.array_equal(_gemm_dq(sh, sm, bases["dS"], bases["K"]), dS @ K)

    # P / dS stores (tile_pos): each pair at its chunk_off place, once, 32 distinct banks per store
    seen = set()
    for w in range(8):
        for mt in range(sh.MTS):
            for hh in range(2):
                for nt in range(sh.NTS):
                    banks = set()
                    for lane in range(32):
                        ft = 32 * w + lane
                        rbase, kc = (ft >> 5) % sh.WMS * sh.TMS + _fg(ft), (ft >> 5) // sh.WMS * sh.TNS + 2 * _ftq(ft)
                        pchunk = (ft >> 5) // sh.WMS * sh.NTS
                        ost = (pchunk >> 3) * BM * 128 + rbase * 128 + (((pchunk & 7) ^ _fg(ft)) << 4) + 4 * _ftq(ft)
                        o = (ost ^ (nt << 4)) + (16 * mt + 8 * hh) * 128
                        r, c = rbase + 16 * mt + 8 * hh, kc + 8 * nt
                        assert o == _chunk_off(BM, BN, r, c // 8) + 2 * (c % 8) and o not in seen
                        seen.add(o)
                        banks.add((o // 4) % 32)
                    assert len(banks) == 32
    assert len(seen) == BM * BN // 2

    # dK / dV staging stores: each pair at its place, once, 32 distinct banks per store
    seen = set()
    for w in range(8):
        for i in range(sh.MTKV):
            for n in range(2 * sh.SKV):
                for x in (0, 2):
                    banks = set()
                    for lane in range(32):
                        ft = 32 * w + lane
                        r, c, chunk = _kv_pos(sh, ft, i, n, x)
                        o = _chunk_off(BN, D, r, chunk) + 4 * _ftq(ft)
                        assert o == _chunk_off(BN, D, r, c // 8) + 2 * (c % 8) and o not in seen
                        seen.add(o)
                        banks.add((o // 4) % 32)
                    assert len(banks) == 32
    assert len(seen) == BN * D // 2

    # loaders: coverage, zero fill past the valid rows and headdim, partial chunks
    for R in {BM, BN}:
        for nvalid in (R, 1, R - 3):
            for hd in {D, D - 3, D - 31}:
                for dst, (rr, col, nb) in _load_tile_plan(R, D, L.THREADS, nvalid, hd).items():
                    assert nb == (0 if rr >= nvalid else 2 * min(max(hd - col, 0), 8))


# ==== emulation of the kernel's control flow =================================================================
# Mirrors bwd_sm80.cu's block loop: query-block range per key block, the need_mask decision and the
# per-element window test, the GQA head loop, the deterministic split walk, padded D / L scratch, the
# 16-bit roundings of P, P (1 - tanh^2) and dS, and the convert. Matrix products stand for the GEMMs
# (their index math is checked above).

_LOG2E = 1.4426950408889634


def _emulate_backward(q, k, v, out, lse, dout, dtype, *, scale, window, softcap=0.0, alibi=None,
                      deterministic=False, splits=3):
    from cuflash._interop import BFLOAT16

    npt = {"float16": np.float16, "bfloat16": BFLOAT16}[dtype]

    def r16(x):
        return np.asarray(np.asarray(x, np.float32).astype(npt), np.float32)

    b_, sq, H, hd = q.shape
    sk, Hk = k.shape[1], k.shape[2]
    group = H // Hk
    t = L.tile_for(hd)
    D, BM, BN = t.headdim_bucket, t.block_m, t.block_n
    left, right = window                       # Run.params normalisation
    wl = -1 if left >= sk else left
    wr = -1 if right >= sq else right
    shift, sq_pad = sk - sq, -(-sq // L.PAD_ROWS) * L.PAD_ROWS
    sl2 = np.float32(scale * math.log2(math.e))
    Dv = np.zeros((b_, H, sq_pad), np.float32)                       # preprocess
    Lv = np.full((b_, H, sq_pad), np.inf, np.float32)
    Dv[:, :, :sq] = (dout.astype(np.float32) * out.astype(np.float32)).sum(-1).transpose(0, 2, 1)
    lf = lse.astype(np.float32)
    Lv[:, :, :sq] = np.where(lf > -np.inf, lf * np.float32(_LOG2E), np.inf)
    n_blocks = -(-sk // BN)
    gridx = min(splits, n_blocks) if deterministic else n_blocks
    dq_acc = np.zeros((gridx if deterministic else 1, b_, H, sq_pad, D), np.float32)
    dk = np.full(k.shape, np.nan, np.float32)
    dv = np.full(v.shape, np.nan, np.float32)
    for b in range(b_):
        for hk in range(Hk):
            for bx in range(gridx):
                split = bx if deterministic else 0
                for nb in range(bx, n_blocks, gridx):
                    n0 = nb * BN
                    m_first, n_m = L.query_block_range(n0, sq, sk, wl, wr, BM, BN)  # the kernel's bounds
                    Kt, Vt = np.zeros((BN, D), np.float32), np.zeros((BN, D), np.float32)
                    nv = min(BN, sk - n0)
                    Kt[:nv, :hd], Vt[:nv, :hd] = k[b, n0:n0 + nv, hk], v[b, n0:n0 + nv, hk]
                    adk, adv = np.zeros((BN, D), np.float32), np.zeros((BN, D), np.float32)
                    hi_, mi_ = 0, 0
                    for _ in range(n_m * group):
                        h, m0 = hk * group + hi_, (m_first + mi_) * BM
                        mi_ += 1
                        if mi_ == n_m:
                            mi_, hi_ = 0, hi_ + 1
                        Qt, dOt = np.zeros((BM, D), np.float32), np.zeros((BM, D), np.float32)
                        mv = min(BM, sq - m0)
                        Qt[:mv, :hd], dOt[:mv, :hd] = q[b, m0:m0 + mv, h], dout[b, m0:m0 + mv, h]
                        Lr, Dr = Lv[b, h, m0:m0 + BM][:, None], Dv[b, h, m0:m0 + BM][:, None]
                        S = Qt @ Kt.T
                        rows, cols = np.arange(BM)[:, None], np.arange(BN)[None, :]
                        ipos = m0 + rows + shift
                        lo = (0 if wl < 0 else ipos - wl) - n0
                        hi = (sk - 1 if wr < 0 else np.minimum(sk - 1, ipos + wr)) - n0
                        kept = (cols >= lo) & (cols <= hi)
                        right_lim = sk - 1 if wr < 0 else min(sk - 1, m0 + shift + wr)
                        need_mask = n0 + BN - 1 > right_lim or (wl >= 0 and n0 < m0 + BM - 1 + shift - wl)
                        assert need_mask or kept.all(), "a block taken as unmasked has masked elements"
                        if not need_mask:
                            kept = np.ones_like(kept)
                        tt = np.zeros_like(S)
                        if softcap > 0:
                            e2 = np.exp2(S * np.float32(scale / softcap) * np.float32(2.8853900817779268))
                            with np.errstate(over="ignore"):
                                tt = np.float32(1) - np.float32(2) / (e2 + np.float32(1))
                            sc = np.float32(softcap * _LOG2E) * tt
                        else:
                            sc = S * sl2
                        if alibi is not None:
                            slope = alibi[b, h] if alibi.ndim == 2 else alibi[h]
                            sc = sc - np.float32(slope * _LOG2E) * np.abs(ipos - n0 - cols).astype(np.float32)
                        with np.errstate(invalid="ignore"):
                            P = np.exp2(np.where(kept, sc - Lr, -np.inf))
                        P16 = r16(P)
                        Pc16 = r16(P * (np.float32(1) - tt * tt)) if (softcap > 0 or alibi is not None) else P16
                        dS16 = r16(Pc16 * (dOt @ Vt.T - Dr))
                        dq_acc[split, b, h, m0:m0 + BM] += dS16 @ Kt
                        adv += P16.T @ dOt
                        adk += dS16.T @ Qt
                    dk[b, n0:n0 + nv, hk] = r16(adk * np.float32(scale))[:nv, :hd]
                    dv[b, n0:n0 + nv, hk] = r16(adv)[:nv, :hd]
    dq = r16(dq_acc.sum(0)[:, :, :sq, :hd].transpose(0, 2, 1, 3) * np.float32(scale))
    return dq, dk, dv


_CASES = [
    dict(dtype="bfloat16", sq=113, sk=203, h=2, hk=2, d=64, causal=False),
    dict(dtype="float16", sq=113, sk=203, h=2, hk=2, d=128, causal=True),
    dict(dtype="bfloat16", sq=239, sk=1, h=2, hk=2, d=96, causal=True),
    dict(dtype="float16", sq=1, sk=239, h=2, hk=2, d=32, window=(17, 5)),
    dict(dtype="bfloat16", sq=257, sk=64, h=2, hk=2, d=160, causal=True),
    dict(dtype="float16", sq=257, sk=64, h=2, hk=2, d=59, window=(0, 0)),
    dict(dtype="bfloat16", sq=128, sk=128, h=2, hk=2, d=224, window=(17, 5)),
    dict(dtype="float16", sq=239, sk=113, h=2, hk=2, d=64, causal=True, window=(17, -1)),
    dict(dtype="float16", sq=113, sk=203, h=2, hk=2, d=64, alibi="bh", causal=True),
    dict(dtype="bfloat16", sq=113, sk=203, h=2, hk=2, d=192, softcap=30.0, softmax_scale=1.0),
    dict(dtype="bfloat16", sq=257, sk=64, h=2, hk=2, d=128, softcap=30.0, alibi="h", window=(17, 5)),
    dict(dtype="float16", sq=113, sk=203, h=6, hk=2, d=64, causal=True, deterministic=True),
    dict(dtype="float16", sq=113, sk=203, h=6, hk=1, d=111, softmax_scale=-0.3),
    dict(dtype="bfloat16", sq=257, sk=600, h=4, hk=2, d=256, causal=True, deterministic=True),
]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_control_flow_emulated(case):
    from cuflash import reference

    from .helpers import ATOL, randn, rounded
    from .test_gpu_backward import GRAD_FACTOR, grad_scale, lowp_backward

    c = dict(case)
    dtype, sq, sk, h, hk, d = (c.pop(x) for x in ("dtype", "sq", "sk", "h", "hk", "d"))
    causal, window = c.pop("causal", False), c.pop("window", (-1, -1))
    softcap, scale = c.pop("softcap", 0.0), c.pop("softmax_scale", None)
    alibi, det = c.pop("alibi", None), c.pop("deterministic", False)
    rng = np.random.default_rng(sq * 7 + sk + d)
    b = 2
    q, k, v, do = (randn(rng, s, dtype) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, h, d)))
    slopes = None if alibi is None else rng.uniform(0.05, 0.5, (h,) if alibi == "h" else (b, h)).astype(np.float32)
    opts = dict(causal=causal, softmax_scale=scale, window_size=window, softcap=softcap)
    s64 = None if slopes is None else slopes.astype(np.float64)
    out, lse = reference.attention(q, k, v, alibi_slopes=s64, return_lse=True, **opts)
    ref = reference.attention_backward(do, q, k, v, out, lse, alibi_slopes=s64, **opts)
    base = lowp_backward(do, q, k, v, dtype, alibi_slopes=slopes, **opts)
    got = _emulate_backward(q, k, v, rounded(out, dtype), lse, do, dtype,
                            scale=scale if scale is not None else 1 / math.sqrt(d),
                            window=reference.normalize_window(window, causal), softcap=softcap, alibi=slopes,
                            deterministic=det)
    gs = grad_scale(ref)
    for name, g, r, bs in zip(("dq", "dk", "dv"), got, ref, base):
        g = np.asarray(g, np.float64)
        assert not np.isnan(g).any(), name
        err, berr = float(np.max(np.abs(g - r))), float(np.max(np.abs(bs - r)))
        assert err <= GRAD_FACTOR * berr + ATOL[dtype] * gs, (name, err, berr)
