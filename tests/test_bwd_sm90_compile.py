"""CPU tests of the Hopper backward (``kernels_cu/bwd_sm90.cu``, ``cuflash/_launch_bwd_sm90.py``). No GPU.

* Compilation: every variant ``_launch_bwd_sm90.variants("sm_90a")`` lists (and the debugging MODE
  variants) compiles through NVRTC for sm_90a with no spills, no stack frame and no serialised-wgmma
  message from ptxas; the host tile table equals the kernel traits (static_asserts compiled by NVRTC); no
  variant is listed for other architectures; precompile lists them.
* Host plan: tiles, head dims taken, grids, splits, scratch shapes, without a GPU.
* Block model: the kernel's query-block range and its "this tile needs no mask" decision, mirrored in
  Python, checked by brute force against the mask rule (every kept pair visited; no pair skipped by the
  unmasked fast path is masked).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cuflash import _compile

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch, _launch_bwd_sm90 as L  # noqa: E402
from cuflash._launch_bwd_sm80 import ordered_turn_bisect  # noqa: E402

from .compile_util import compile_variants, requires_nvrtc  # noqa: E402

SMEM_LIMIT = 227 * 1024


# ==== variants and compilation ========================================================================

def test_variants_only_for_sm90a():
    assert L.variants("sm_80") == [] and L.variants("sm_86") == [] and L.variants("sm_100") == []
    v = L.variants("sm_90a")
    # fp16 / bf16 x (MODE 0, the ordered deterministic mode's MODE_ORDERED) x (d64 / d128 without and with
    # dropout, d256 without)
    assert len(v) == len(set(v)) == 2 * sum(len(L.modes(t)) for t in L.all_tiles()) == 20
    assert sum(n.endswith(", true>") for _, n in v) == 8
    assert {f for f, _ in v} == {"bwd_sm90.cu"}
    for t in L.TILES.values():
        # + the static block (barriers: 1024 bytes as ptxas lays it out; with dropout the RNG state)
        assert t.smem + 1024 <= SMEM_LIMIT
        if t.headdim_bucket not in L.DROPOUT_BUCKETS:
            assert L.tile_for(t.headdim_bucket, dropout=True) is None
            continue
        assert L.tile_for(t.headdim_bucket, dropout=True).smem + 4096 <= SMEM_LIMIT
        # the dropout variant adds one keep bit per (key, query) of a step to each slot
        assert L.tile_for(t.headdim_bucket, True).smem - t.smem == t.stages * t.block_n * t.block_m // 8
    from cuflash._precompile import all_variants

    assert set(v) <= set(all_variants("sm_90a")) and not set(v) & set(all_variants("sm_80"))
    # preprocess and convert come from bwd_sm80.cu, which the sm80 path lists for sm_90a
    from cuflash import _launch_bwd_sm80

    names = {n for _, n in _launch_bwd_sm80.variants("sm_90a")}
    for dt in L._DTYPES:
        k = L.kernel_names(dt, L.TILES[64])
        assert k["preprocess"] in names and k["convert"] in names


@requires_nvrtc
def test_every_variant_compiles_without_spills_or_serialised_wgmma():
    # (the overlapped schedule, MODE 4, has no d256 variant: a static_assert)
    extra = [(L.FILE, L.kernel_name("bfloat16", t, m)) for t in L.TILES.values() for m in (1, 2, 3, 4)
             if not (m & 4 and t.split_d)]
    res = compile_variants(lambda arch: L.variants(arch) + extra, ("sm_90a",))
    assert len(res) == len(L.variants("sm_90a")) + len(extra)
    for (arch, f, n), (r, _path) in res.items():
        if (f, n) in L.variants(arch):  # the debugging MODE variants only have to compile (a few may spill)
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, (n, r)
        assert r["registers"] <= 168, (n, r)  # 384 threads, one block per SM (setmaxnreg redistributes)
        c = _compile.compile_cubin(f, (n,), arch)  # cache hit: its ptxas log
        log = getattr(c, "log", "") or ""
        bad = [ln for ln in log.splitlines() if "serialized" in ln or "Performance Loss" in ln]
        assert not bad or (f, n) not in L.variants(arch), (n, bad)


@requires_nvrtc
def test_host_table_matches_kernel_traits():
    src = _compile.build_source(L.FILE) + "\n" + "\n".join(L.expected_traits_checks()) + "\n"
    _compile._nvrtc_compile(src, "bwd_sm90_traits_check.cu", (), _compile._options("sm_90a", ()))


# ==== host plan ==========================================================================================

class _Arr:
    def __init__(self, shape):
        self.shape = shape


def _run(b=2, sq=300, sk=77, h=6, hk=2, d=128, dtype="bfloat16", deterministic=False):
    return _launch.Run(device_id=0, arch="sm_90a", stream=None, dtype=dtype, q=_Arr((b, sq, h, d)),
                       k=_Arr((b, sk, hk, d)), v=_Arr((b, sk, hk, d)), deterministic=deterministic)


def test_tile_for_head_dims():
    for hd in range(1, 257):
        t = L.tile_for(hd)
        r32 = -(-hd // 32) * 32
        if r32 in (64, 128, 256):
            assert t is not None and t.headdim_bucket == r32
        else:
            assert t is None, hd
    assert L.TILES[64].block_m == 128 and L.TILES[128].block_m == 64 and L.TILES[256].block_m == 64
    assert [t.block_n for t in L.TILES.values()] == [128, 128, 64] and L.TILES[256].split_d
    for d in (64, 128):
        t = L.tile_for(d, dropout=True)
        assert t.dropout and t.block_m == L.TILES[d].block_m and not L.TILES[d].dropout
    assert L.tile_for(256, dropout=True) is None and L.tile_for(230, dropout=True) is None  # sm80 path


def test_plan_grids_and_names():
    run = _run()
    pl = L.plan(run, mode_=0)
    t = L.TILES[128]
    assert pl["tile"] == t and pl["splits"] == 1 and pl["sq_pad"] == 384 and pl["n_blocks"] == 1
    assert pl["grid_main"] == (1, 2, 2)
    assert pl["grid_rows"] == (384 // 32, 6, 2) and pl["grid_convert"] == (-(-300 // 32), 6, 2)
    assert pl["names"]["main"] == "cuflash::bwd_sm90<cuflash::bf16_t, 128, 64, 2, 0>"
    assert pl["names"]["preprocess"] == "cuflash::bwd_sm80_preprocess<cuflash::bf16_t>"
    assert pl["names"]["convert"] == "cuflash::bwd_sm80_dq_convert<cuflash::bf16_t>"
    run = _run(sq=1000, sk=1537, d=64, dtype="float16", deterministic=True)
    pl = L.plan(run, splits=5, mode_=0)
    assert pl["splits"] == 5 and pl["grid_main"] == (5, 2, 2) and pl["n_blocks"] == 13
    assert pl["names"]["main"] == "cuflash::bwd_sm90<cuflash::half_t, 64, 128, 2, 0>"
    assert L.plan(run, splits=99, mode_=0)["splits"] == 13       # at most one split per key block
    drop = _launch.Run(**{**run.__dict__, "dropout_p": 0.1})
    assert L.plan(drop, splits=5, mode_=0)["names"]["main"] == "cuflash::bwd_sm90<cuflash::half_t, 64, 128, 2, 0, true>"
    # the overlapped debugging schedule has no dropout variant: its bit is dropped
    assert L.plan(drop, splits=5, mode_=4)["names"]["main"].endswith("64, 128, 2, 0, true>")
    ordered = L.plan(_launch.Run(**{**_run(deterministic=True).__dict__, "dropout_p": 0.1}), mode_=0)
    assert ordered["ordered"] and ordered["names"]["main"] == "cuflash::bwd_sm90<cuflash::bf16_t, 128, 64, 2, 8, true>"
    auto = L.plan(run, mode_=0)["splits"]
    assert 1 <= auto <= 13


def test_supports_rejects_without_gpu_arrays():
    # wrong arch / dtype / dropout / head dims: rejected before any array is inspected
    assert not L.supports(_launch.Run(**{**_run().__dict__, "arch": "sm_80"}))
    assert not L.supports(_launch.Run(**{**_run().__dict__, "dtype": "float32"}))
    for d in (32, 96, 160, 192):
        assert not L.supports(_run(d=d)), d
    assert not L.supports(_launch.Run(**{**_run(d=256).__dict__, "dropout_p": 0.1}))


# ==== block model ========================================================================================

def _query_block_range(n0, sq, sk, wl, wr, bm, bn=128):
    return L.query_block_range(n0, sq, sk, wl, wr, bm, bn)  # the host's copy of the kernel's bounds


def _need_mask(kw0, m0, sq, sk, wl, wr, bm):
    shift = sk - sq
    right_lim = sk - 1 if wr < 0 else min(sk - 1, m0 + shift + wr)
    return kw0 + 63 > right_lim or (wl >= 0 and kw0 < m0 + bm - 1 + shift - wl)


def _kept(i, j, sq, sk, wl, wr):
    ipos = i + sk - sq
    lo = 0 if wl < 0 else ipos - wl
    hi = sk - 1 if wr < 0 else np.minimum(sk - 1, ipos + wr)
    return (j >= lo) & (j <= hi)


@pytest.mark.parametrize("bm", [64, 128])
def test_block_model_ranges_and_mask_decisions(bm):
    cases = list(itertools.product((1, 77, 128, 300, 520), (1, 77, 128, 300, 520),
                                   ((-1, -1), (-1, 0), (17, 5), (0, 0), (100, -1), (-1, 37))))
    for sq, sk, (wl, wr) in cases:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        keep = _kept(i, j, sq, sk, wl, wr)
        for nb in range(-(-sk // 128)):
            n0 = nb * 128
            m_first, n_m = _query_block_range(n0, sq, sk, wl, wr, bm)
            visited = np.zeros(sq, bool)
            for mi in range(n_m):
                m0 = (m_first + mi) * bm
                assert 0 <= m0 < sq
                visited[m0:m0 + bm] = True
                for cw in (0, 1):
                    kw0 = n0 + 64 * cw
                    if not _need_mask(kw0, m0, sq, sk, wl, wr, bm):
                        # the fast path keeps every (row < sq, key) pair of the consumer's tile
                        rows = np.arange(m0, min(m0 + bm, sq))[:, None]
                        keys = np.arange(kw0, kw0 + 64)[None, :]
                        assert (keys < sk).all(), (sq, sk, wl, wr, n0, m0, cw)
                        assert _kept(rows, keys, sq, sk, wl, wr).all(), (sq, sk, wl, wr, n0, m0, cw)
            # every row that keeps a key of the block is in a visited query block
            rows_needed = keep[:, n0:n0 + 128].any(axis=1)
            assert not (rows_needed & ~visited).any(), (sq, sk, wl, wr, n0)


# ==== the ordered deterministic mode's schedule ==========================================================

@pytest.mark.parametrize("bm,bn", [(64, 128), (128, 128), (64, 64)])
def test_ordered_walk_and_turns(bm, bn):
    """Mirror of bwd_sm90.cu's ordered mode (walk from the pivot; turns from ordered_turn): every key block
    walks each of its query blocks once; on every (query block, plane) the turns are 0 .. k - 1 (a wrong
    rank would make a block wait forever); with two planes a block's predecessor is key block nb + 1
    (scheduled before it: the grid runs the key blocks last to first), and when the key blocks start
    together no block reaches a query block before its predecessor has. The turns' closed form (the
    kernels') equals a bisection over the walks' bounds. (64, 64): bwd_sm80.cu's d > 128 tiles."""
    for sq, sk, wr in itertools.product((1, 77, 128, 300, 1000, 2048), (1, 77, 128, 300, 1537, 4096), (-1, 0, 5, 300)):
        n_kb = -(-sk // bn)
        for two in (False, True):
            visits = {}
            for nb in range(n_kb):
                m_first, n_m = L.query_block_range(nb * bn, sq, sk, -1, wr, bm, bn)
                if n_m == 0:
                    continue
                piv = L.ordered_pivot(nb, n_kb, sq, sk, wr, bm, bn)
                assert m_first <= piv < m_first + n_m
                walk = [piv + mi if piv + mi < m_first + n_m else piv + mi - n_m for mi in range(n_m)]
                assert sorted(walk) == list(range(m_first, m_first + n_m))
                for step, m in enumerate(walk):
                    part, rank = L.ordered_turn(nb, m, n_kb, sq, sk, wr, two, bm, bn)
                    assert (part, rank) == ordered_turn_bisect(nb, m, n_kb, sq, sk, wr, two, bm, bn)
                    assert part == (1 if two and m < piv else 0)  # the kernel's plane of the step
                    visits.setdefault((m, part), []).append((rank, nb, step))
            for key, v in visits.items():
                v.sort()
                assert [r for r, _, _ in v] == list(range(len(v))), (sq, sk, wr, two, key)
                if two:
                    nbs = [nb for _, nb, _ in v]
                    assert nbs == list(range(nbs[0], nbs[0] - len(v), -1)), (sq, sk, wr, key)
                    steps = [st for _, _, st in v]
                    assert steps == sorted(steps), (sq, sk, wr, key, v)
            if two and not L.ordered_has_lower(sq, sk, wr, bm, bn):
                assert all(part == 0 for _, part in visits)
