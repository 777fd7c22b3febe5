"""CPU tests of the sm80 tensor-core forward's kernels (no GPU needed: NVRTC compiles without one).

Every variant ``cuflash._launch_sm80.variants(arch)`` lists (what the dispatcher can pick on that
architecture's GPUs) compiles for sm_80 and sm_90a with no spills and no stack frame, at most 255
registers (the tiles only 99 KB GPUs pick are compiled for sm_86), and the shared memory the host asks
for (``cuflash._config`` sm80 tiles) equals what the kernel's traits derive and fits the 227 KB
per-block limit. Compiles run in a process pool through the on-disk cache, one variant per compile,
exactly as ``get_function`` compiles them at run time.
"""

import re

import pytest

from cuflash import _compile, _config

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch_sm80  # noqa: E402

from .compile_util import ARCHS, compile_variants, requires_nvrtc, sass_of_cubin  # noqa: E402
SMEM_LIMIT = 227 * 1024
SMALL_SMEM_ARCH = "sm_86"  # 99 KB per block (sm86 / sm89 / sm120): the only GPUs that pick some tiles


pytestmark = requires_nvrtc


def _variants(arch):
    """What the dispatcher can pick on ``arch``; for SMALL_SMEM_ARCH only what no arch of ARCHS lists."""
    if arch == SMALL_SMEM_ARCH:
        seen = {v for a in ARCHS for v in _launch_sm80.variants(a)}
        return [v for v in _launch_sm80.variants(arch) if v not in seen]
    return _launch_sm80.variants(arch)


@pytest.fixture(scope="module")
def compiled():
    return compile_variants(_variants, ARCHS + (SMALL_SMEM_ARCH,))


def test_variant_list():
    v = _launch_sm80.variants()
    assert len(v) == len(set(v)), "duplicate variants"
    files = {f for f, _ in v}
    assert files == {"fwd_sm80.cu", "combine.cu"}
    # 2 dtypes x every tile (without, with dropout), and the combine for the three output dtypes
    assert len(v) == 2 * (len(_config.sm80_forward_tiles()) + len(_config.sm80_forward_tiles(True))) + 3
    names = {n for _, n in v}
    for dt in ("float16", "bfloat16"):
        for tile in _config.sm80_forward_tiles():
            assert _launch_sm80.kernel_name(dt, tile) in names
        for tile in _config.sm80_forward_tiles(dropout=True):
            assert _launch_sm80.kernel_name(dt, tile, dropout=True) in names
            assert _launch_sm80.kernel_name(dt, tile, dropout=True).endswith(", true>")
    # d 160 with dropout takes its own tile (the 128 x 32 one spilled on sm_90a with NVRTC 13.0)
    drop160 = _config.SM80_FORWARD_TILES_DROPOUT[160]
    assert _config.sm80_forward(160, None, dropout=True) == drop160 != _config.sm80_forward(160)
    assert _launch_sm80.kernel_name("bfloat16", _config.SM80_FORWARD_TILES[160], dropout=True) not in names


def test_variant_lists_per_arch():
    """variants(arch) lists exactly what the dispatcher can pick on that arch's GPUs; None is the union."""
    union = set()
    archs = [(f"sm_{n}", lim) for n, lim in _config.SMEM_PER_BLOCK_BY_ARCH.items()] + [("sm_90a", SMEM_LIMIT)]
    for arch, limit in archs:
        v = _launch_sm80.variants(arch)
        assert len(v) == len(set(v)) and _config.smem_limit_of_arch(arch) == limit
        picked = {("fwd_sm80.cu", _launch_sm80.kernel_name(dt, _config.sm80_forward(d, limit, drop), drop))
                  for d in range(1, 257) for dt in ("float16", "bfloat16") for drop in (False, True)}
        picked |= {("combine.cu", _launch_sm80.combine_name(dt)) for dt in ("float16", "bfloat16", "float32")}
        assert set(v) == picked, arch
        union |= set(v)
    assert union == set(_launch_sm80.variants()) == set(_launch_sm80.variants("compute_90"))
    assert set(_launch_sm80.variants("sm_75")) == {(f, n) for f, n in union if f == "combine.cu"}
    small = _launch_sm80.kernel_name("bfloat16", _config.SM80_FORWARD_TILES_SMALL_SMEM[128])
    assert ("fwd_sm80.cu", small) in _launch_sm80.variants("sm_86")
    assert ("fwd_sm80.cu", small) not in _launch_sm80.variants("sm_80") + _launch_sm80.variants("sm_90a")


def test_no_spills_no_stack(compiled):
    bad = {job: r for job, (r, _) in compiled.items()
           if not r or r["spill_stores"] or r["spill_loads"] or r["stack"] or r["registers"] > 255}
    assert not bad, f"variants with spills / stack / > 255 registers: {bad}"


def test_shared_memory_within_limits(compiled):
    for tile in _config.sm80_forward_tiles() + _config.sm80_forward_tiles(True):
        assert tile.smem + 0 <= SMEM_LIMIT, tile
    for (arch, f, n), (r, _) in compiled.items():
        assert r["smem"] == 0, (n, r)  # all shared memory is dynamic, sized by the host


def test_one_block_of_registers_fits_an_sm(compiled):
    for (arch, f, n), (r, _) in compiled.items():
        if f != "fwd_sm80.cu":
            continue
        warps = int(n.split(",")[4])
        assert r["registers"] * 32 * warps <= 65536, (n, r)


def _traits_expr(tile):
    return (f"cuflash::Sm80FwdTraits<{tile.headdim_bucket}, {tile.block_m}, {tile.block_n}, {tile.warps}, "
            f"{tile.stages}, {'true' if tile.q_in_regs else 'false'}>")


def test_host_smem_equals_kernel_traits():
    """The host's Sm80Tile.smem and threads equal the C++ traits (static_assert in one NVRTC compile)."""
    src = _compile.build_source("fwd_sm80.cu")
    checks = []
    for tile in _config.sm80_forward_tiles() + _config.sm80_forward_tiles(True):
        t = _traits_expr(tile)
        checks.append(f"static_assert({t}::kSmemBytes == {tile.smem}, \"smem {tile}\");")
        checks.append(f"static_assert({t}::kThreads == {tile.threads}, \"threads {tile}\");")
    src += "\n" + "\n".join(checks) + "\n"
    opts = _compile._options("sm_80", ())
    _compile._nvrtc_compile(src, "fwd_sm80_traits_check.cu", (), opts)  # raises on a failed assert


def test_every_headdim_has_a_tile():
    for d in range(1, 257):
        for limit in (None, 99 * 1024, 163 * 1024, SMEM_LIMIT):
            for drop in (False, True):
                tile = _config.sm80_forward(d, limit, drop)
                assert tile is not None and tile.headdim_bucket >= d
                assert limit is None or tile.smem <= limit
                assert tile in _config.sm80_forward_tiles(drop)


def test_sass_uses_tensor_core_paths(compiled):
    """Where a cuobjdump that reads NVRTC's cubins is installed: HMMA, LDSM (ldmatrix, .trans too),
    LDGSTS (cp.async) and 128-bit global stores are in the forward kernels."""
    checked = 0
    for (arch, f, n), (r, path) in compiled.items():
        if f != "fwd_sm80.cu":
            continue
        sass = sass_of_cubin(path)
        if sass is None:
            pytest.skip("no cuobjdump that reads these cubins on this machine")
        for op in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128", "STG.E.128"):
            assert op in sass, (arch, n, op)
        assert not re.search(r"\b(LDL|STL)\b", sass), (arch, n, "local memory")
        checked += 1
    assert checked
