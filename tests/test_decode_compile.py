"""CPU tests of the decoding forward's kernels (``kernels_cu/fwd_decode.cu``; no GPU needed).

Every variant ``cuflash._launch_decode.variants(arch)`` lists (what the dispatcher can pick on that
architecture's GPUs) compiles for sm_80 and sm_90a (and sm_86 for the tiles only 99 KB GPUs pick) with no
spills and no stack frame, within the registers its __launch_bounds__ occupancy allows; the host's shared
memory, threads and occupancy equal the kernel traits'; and the tile table, dispatch rule and split
heuristic behave. Compiles run in a process pool through the on-disk cache, as ``get_function`` does.
"""

import pytest

from cuflash import _compile, _config

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch_decode, _launch_sm80  # noqa: E402

from .compile_util import ARCHS, compile_variants, requires_nvrtc  # noqa: E402

SMALL_SMEM_ARCH = "sm_86"
SMEM_LIMIT = 227 * 1024


@pytest.fixture(autouse=True)
def _default_env(monkeypatch):
    monkeypatch.delenv("CUFLASH_DECODE_TILE", raising=False)
    monkeypatch.delenv("CUFLASH_DISABLE_DECODE", raising=False)


def _variants(arch):
    """What the dispatcher can pick on ``arch``; for SMALL_SMEM_ARCH only what no arch of ARCHS lists."""
    if arch == SMALL_SMEM_ARCH:
        seen = {v for a in ARCHS for v in _launch_decode.variants(a)}
        return [v for v in _launch_decode.variants(arch) if v not in seen]
    return _launch_decode.variants(arch)


@pytest.fixture(scope="module")
def compiled():
    return compile_variants(_variants, ARCHS + (SMALL_SMEM_ARCH,))


def _tile_of(name):
    """DecodeTile of a kernel name expression."""
    args = [a.strip(" >") for a in name.split("<", 1)[1].split(",")]
    d, warps, wkeys, stages, qregs = int(args[1]), int(args[2]), int(args[3]), int(args[4]), args[5] == "true"
    return _launch_decode.DecodeTile(d, warps, stages, wkeys, qregs)


@requires_nvrtc
def test_no_spills_no_stack(compiled):
    assert compiled
    bad = {job: r for job, (r, _) in compiled.items()
           if not r or r["spill_stores"] or r["spill_loads"] or r["stack"] or r["registers"] > 255}
    assert not bad, f"variants with spills / stack / > 255 registers: {bad}"


@requires_nvrtc
def test_registers_allow_the_planned_occupancy(compiled):
    """The split heuristic counts min_blocks blocks per SM (H100): registers must allow them."""
    for (arch, f, n), (r, _) in compiled.items():
        tile = _tile_of(n)
        assert r["registers"] * tile.threads * tile.min_blocks <= 65536, (arch, n, r, tile.min_blocks)
        assert r["smem"] == 0, (n, r)  # all shared memory is dynamic, sized by the host


@requires_nvrtc
def test_host_smem_equals_kernel_traits():
    """DecodeTile.smem / threads / min_blocks equal the C++ traits (static_assert in one NVRTC compile)."""
    src = _compile.build_source("fwd_decode.cu")
    checks = []
    every = {t for cands in _launch_decode.DECODE_TILES.values() for t in cands}
    every |= {_launch_decode.DecodeTile(128, 4, 3, 32), _launch_decode.DecodeTile(64, 8, 2),
              _launch_decode.DecodeTile(256, 1, 2, 16, False)}
    for t in sorted(every, key=repr):
        tr = (f"cuflash::DecodeTraits<{t.headdim_bucket}, {t.warps}, {t.warp_keys}, {t.stages}, "
              f"{'true' if t.q_in_regs else 'false'}>")
        checks.append(f'static_assert({tr}::kSmemBytes == {t.smem}, "smem {t}");')
        checks.append(f'static_assert({tr}::kThreads == {t.threads}, "threads {t}");')
        checks.append(f'static_assert({tr}::kBN == {t.block_n}, "block_n {t}");')
        checks.append(f'static_assert({tr}::kStageBytes == {t.tile_bytes}, "tile bytes {t}");')
        checks.append(f'static_assert({tr}::kMinBlocks == {t.min_blocks}, "min blocks {t}");')
    src += "\n" + "\n".join(checks) + "\n"
    _compile._nvrtc_compile(src, "fwd_decode_traits_check.cu", (), _compile._options("sm_80", ()))


def test_variant_lists_per_arch():
    """variants(arch) lists exactly what the dispatcher can pick on that arch's GPUs; None is the union."""
    union = set()
    archs = [(f"sm_{n}", lim) for n, lim in _config.SMEM_PER_BLOCK_BY_ARCH.items()] + [("sm_90a", SMEM_LIMIT)]
    for arch, limit in archs:
        v = _launch_decode.variants(arch)
        assert len(v) == len(set(v))
        picked = set()
        for d in range(1, 257):
            for dt in ("float16", "bfloat16"):
                tile = _launch_decode.tile_for(d, limit)
                picked.add((_launch_decode.FILE, _launch_decode.kernel_name(dt, tile)))
                if _launch_decode.cluster_arch(arch):  # split-KV merged in a cluster (sm_90+)
                    picked |= {(_launch_decode.FILE, _launch_decode.kernel_name(dt, tile, c))
                               for c in _launch_decode.cluster_sizes(tile)}
        assert set(v) == picked, arch
        union |= set(v)
    # None / compute_90 (PTX for any newer GPU, shared memory unknown): every tile, with every cluster size
    assert union <= set(_launch_decode.variants()) == set(_launch_decode.variants("compute_90"))
    assert {v for v in union if "cluster" not in v[1]} == {v for v in _launch_decode.variants()
                                                         if "cluster" not in v[1]}
    assert _launch_decode.variants("sm_75") == []
    from cuflash._precompile import all_variants

    for arch in ("sm_80", "sm_90a", None):
        assert set(_launch_decode.variants(arch)) <= set(all_variants(arch))


def test_every_headdim_has_a_tile(monkeypatch):
    for d in range(1, 257):
        for limit in (None, 99 * 1024, 163 * 1024, SMEM_LIMIT):
            tile = _launch_decode.tile_for(d, limit)
            assert tile is not None and tile.headdim_bucket >= d
            assert limit is None or tile.smem <= limit
            assert tile.stages >= 3, tile  # tiles still loading while a block waits for its next one
    assert _launch_decode.tile_for(100, SMEM_LIMIT) == _launch_decode.DECODE_TILES[128][0]
    monkeypatch.setenv("CUFLASH_DECODE_TILE", "2x5x32")
    t = _launch_decode.tile_for(100, SMEM_LIMIT)
    assert (t.headdim_bucket, t.warps, t.stages, t.warp_keys) == (128, 2, 5, 32)


def test_split_heuristic_unit():
    h = _launch_decode.num_splits_heuristic
    assert h(8, 132, 1) == 1                   # one key tile: nothing to split
    assert h(2000, 132, 64) == 1               # the grid already fills the GPU several times over
    assert h(128, 132, 64) == 1                # 128 blocks: 97% of the SMs
    # the benchmark's decode shapes on an H100 (8 kv heads, d128, 64-key tiles): 128 blocks
    assert h(8, 132, 2048) == 16               # batch 1, 128k keys
    assert h(64, 132, 2048) == 2               # batch 8, 128k keys
    assert h(8, 132, 64) == 16                 # batch 1, 4k keys: 4 tiles per block
    assert h(16, 132, 64) == 8                 # batch 2, 4k keys
    assert h(8, 132, 3) == 3                   # too few tiles for one block per SM: every tile its own
    assert h(8, 132, 64, max_splits=10) == 10  # capped: the largest count without an empty slice
    for c in (1, 3, 8, 50, 200, 1000):
        for n in (1, 2, 5, 64, 1000, 5000):
            s = h(c, 132, n)
            assert 1 <= s <= min(n, _launch_decode.MAX_SPLITS)
            assert -(-n // -(-n // s)) == s     # no empty slice
            smaller = [t for t in range(1, s) if -(-n // -(-n // t)) == t]
            assert all(c * t < 0.95 * 132 for t in smaller)   # the fewest that fill the SMs


class _Arr:
    """Enough of a CuPy array for supports(): shape, strides, itemsize, data.ptr."""

    def __init__(self, shape, itemsize=2, ptr=1 << 20, strides=None):
        self.shape, self.itemsize, self.ndim = tuple(shape), itemsize, len(shape)
        if strides is None:
            strides, acc = [], itemsize
            for n in reversed(shape):
                strides.insert(0, acc)
                acc *= n
        self.strides = tuple(strides)

        class _D:
            pass

        self.data = _D()
        self.data.ptr = ptr


def _run(b, sq, sk, h, hk, d, dtype="bfloat16", **kw):
    from cuflash._launch import Run

    q, out = _Arr((b, sq, h, d)), _Arr((b, sq, h, d))
    k, v = _Arr((b, sk, hk, d)), _Arr((b, sk, hk, d))
    return Run(device_id=0, arch=kw.pop("arch", "sm_90a"), stream=None, dtype=dtype, q=q, k=k, v=v, out=out, **kw)


def test_dispatch_rule(monkeypatch):
    monkeypatch.setattr(_launch_decode, "_device_limits", lambda dev: (132, 227 * 1024, 228 * 1024))
    ok = _launch_decode.supports
    assert ok(_run(1, 1, 4096, 32, 8, 128))                    # GQA 4, seqlen_q 1
    assert ok(_run(1, 1, 70000, 16, 1, 64))                    # MQA, group 16
    assert ok(_run(2, 16, 100, 4, 4, 256))                     # 16 queries, no GQA
    assert ok(_run(2, 4, 100, 8, 2, 72))                       # 4 x 4 rows
    assert not ok(_run(1, 1, 4096, 32, 1, 128))                # 32 rows per kv head: sm80 packs them
    assert not ok(_run(1, 17, 100, 4, 4, 128))                 # 17 queries
    assert not ok(_run(1, 1, 4096, 32, 8, 128, dtype="float32"))
    assert not ok(_run(1, 1, 4096, 32, 8, 128, arch="sm_75"))
    assert not ok(_run(1, 1, 4096, 32, 8, 128, dropout_p=0.1))
    assert not ok(_run(1, 1, 4096, 32, 8, 59))                 # unaligned rows (row stride 59 elements)
    assert ok(_run(1, 1, 4096, 32, 8, 128, arch="sm_80"))
    monkeypatch.setenv("CUFLASH_DISABLE_DECODE", "1")
    assert not ok(_run(1, 1, 4096, 32, 8, 128))


def test_plan(monkeypatch):
    monkeypatch.setattr(_launch_decode, "_device_limits", lambda dev: (132, 227 * 1024, 228 * 1024))
    pl = _launch_decode.plan(_run(1, 1, 131072, 32, 8, 128))
    assert pl["tile"] == _launch_decode.DECODE_TILES[128][0] and pl["blocks_per_sm"] == 2
    assert pl["n_tiles"] == 2048 and pl["splits"] == 16 and pl["grid"] == (16, 8, 1)
    pl = _launch_decode.plan(_run(8, 1, 131072, 32, 8, 128, num_splits=3))
    assert pl["splits"] == 3 and pl["grid"] == (3, 8, 8)
    pl = _launch_decode.plan(_run(1, 1, 100, 32, 8, 128, num_splits=50))
    assert pl["splits"] == 2                                   # capped at the key tiles
    # a sliding window splits only the window: keys 65999 .. 69999 lie in tiles 1031 .. 1093
    pl = _launch_decode.plan(_run(1, 1, 70000, 32, 8, 128, window=(4000, 0)))
    assert pl["n_tiles"] == 63
    # causal, seqlen_q 3 > seqlen_k 1: only the last query keeps a key (key 0)
    pl = _launch_decode.plan(_run(1, 3, 1, 4, 4, 64, window=(-1, 0)))
    assert pl["n_tiles"] == 1 and pl["splits"] == 1
    pl = _launch_decode.plan(_run(1, 1, 100, 64, 2, 64))         # 32 rows per kv head: 2 row blocks
    assert pl["m_blocks"] == 2 and pl["grid"][1] == 4
    assert _launch_sm80.MAX_SPLITS >= 1  # the combine (shared with sm80) takes any count


def test_cluster_choice(monkeypatch):
    """Which key slices merge in a cluster (sm_90+) and which through fwd_combine."""
    monkeypatch.delenv("CUFLASH_DECODE_CLUSTER", raising=False)
    L = _launch_decode
    sizes = (2, 4, 8, 16)
    assert L.cluster_for(1, sizes, False, 64) == 1                      # no split: no cluster
    assert [L.cluster_for(s, sizes, False, 64) for s in (2, 3, 5, 9, 16)] == [2, 4, 8, 16, 16]
    assert L.cluster_for(17, sizes, False, 64) == 1                     # more slices than a cluster
    assert L.cluster_for(9, (2, 4, 8), False, 64) == 1                  # one block per SM: at most 8
    assert L.cluster_for(4, sizes, False, 4 * L.CLUSTER_MAX_SLICE_TILES) == 4
    assert L.cluster_for(4, sizes, False, 4 * L.CLUSTER_MAX_SLICE_TILES + 1) == 1  # long slices: combine
    assert [L.cluster_for(s, sizes, True, 10**6) for s in (2, 3, 8, 16)] == [2, 1, 8, 16]  # forced: exact
    monkeypatch.setenv("CUFLASH_DECODE_CLUSTER", "0")
    assert L.cluster_for(8, sizes, False, 64) == 1
    assert L.cluster_sizes(L.DecodeTile(128, 4, 3)) == sizes             # 2 blocks per SM on the H100
    assert L.cluster_sizes(L.DecodeTile(256, 4, 3, q_in_regs=False)) == (2, 4, 8)
