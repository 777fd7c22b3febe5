"""CPU tests of the sm80 tensor-core forward's kernels (no GPU needed: NVRTC compiles without one).

Every variant ``cuflash._launch_sm80.variants()`` lists (what the dispatcher can pick) compiles for
sm_80 and sm_90a with no spills and no stack frame, at most 255 registers, and the shared memory the
host asks for (``cuflash._config`` sm80 tiles) equals what the kernel's traits derive and fits the
227 KB per-block limit. Compiles run in a process pool through the on-disk cache, one variant per
compile, exactly as ``get_function`` compiles them at run time.
"""

import os
import re

import pytest

from cuflash import _compile, _config

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch_sm80  # noqa: E402

from .compile_util import compile_variants, requires_nvrtc  # noqa: E402
SMEM_LIMIT = 227 * 1024


pytestmark = requires_nvrtc


@pytest.fixture(scope="module")
def compiled():
    return compile_variants(_launch_sm80.variants())


def test_variant_list():
    v = _launch_sm80.variants()
    assert len(v) == len(set(v)), "duplicate variants"
    files = {f for f, _ in v}
    assert files == {"fwd_sm80.cu", "combine.cu"}
    # 2 dtypes x every tile x (no dropout, dropout), and the combine for the three output dtypes
    assert len(v) == 2 * 2 * len(_config.sm80_forward_tiles()) + 3
    names = {n for _, n in v}
    for dt in ("float16", "bfloat16"):
        for tile in _config.sm80_forward_tiles():
            assert _launch_sm80.kernel_name(dt, tile) in names
            assert _launch_sm80.kernel_name(dt, tile, dropout=True) in names
            assert _launch_sm80.kernel_name(dt, tile, dropout=True).endswith(", true>")


def test_no_spills_no_stack(compiled):
    bad = {job: r for job, (r, _) in compiled.items()
           if not r or r["spill_stores"] or r["spill_loads"] or r["stack"] or r["registers"] > 255}
    assert not bad, f"variants with spills / stack / > 255 registers: {bad}"


def test_shared_memory_within_limits(compiled):
    for tile in _config.sm80_forward_tiles():
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
    for tile in _config.sm80_forward_tiles():
        t = _traits_expr(tile)
        checks.append(f"static_assert({t}::kSmemBytes == {tile.smem}, \"smem {tile}\");")
        checks.append(f"static_assert({t}::kThreads == {tile.threads}, \"threads {tile}\");")
    src += "\n" + "\n".join(checks) + "\n"
    opts = _compile._options("sm_80", ())
    _compile._nvrtc_compile(src, "fwd_sm80_traits_check.cu", (), opts)  # raises on a failed assert


def test_every_headdim_has_a_tile():
    for d in range(1, 257):
        for limit in (None, 99 * 1024, 163 * 1024, SMEM_LIMIT):
            tile = _config.sm80_forward(d, limit)
            assert tile is not None and tile.headdim_bucket >= d
            assert limit is None or tile.smem <= limit


def _sass(path):
    """SASS of a cubin through cuobjdump, or None when no cuobjdump that reads it is found."""
    import shutil
    import subprocess

    exe = shutil.which("cuobjdump") or ("/usr/local/cuda/bin/cuobjdump"
                                        if os.path.exists("/usr/local/cuda/bin/cuobjdump") else None)
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "-sass", path], capture_output=True, text=True, timeout=120)
    except Exception:
        return None
    if res.returncode != 0 or "Function" not in res.stdout:
        return None
    return res.stdout


def test_sass_uses_tensor_core_paths(compiled):
    """Where a cuobjdump that reads NVRTC's cubins is installed: HMMA, LDSM (ldmatrix, .trans too),
    LDGSTS (cp.async) and 128-bit global stores are in the forward kernels."""
    checked = 0
    for (arch, f, n), (r, path) in compiled.items():
        if f != "fwd_sm80.cu":
            continue
        sass = _sass(path)
        if sass is None:
            pytest.skip("no cuobjdump that reads these cubins on this machine")
        for op in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128", "STG.E.128"):
            assert op in sass, (arch, n, op)
        assert not re.search(r"\b(LDL|STL)\b", sass), (arch, n, "local memory")
        checked += 1
    assert checked
