"""CPU tests of the portable backward's kernels: every variant (dropout on and off) compiles for sm_80 and
sm_90a with no spills and no stack, at most 255 registers (and few enough for one block per SM), and the
static shared memory each kernel declares is what the host-side tile table (``cuflash._launch_bwd``) says.

No GPU needed. Compiles go through the on-disk cache (shared with tests/test_compile.py) in a process
pool, one variant per compile, exactly as ``get_function`` compiles them at run time.
"""


import pytest


pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch_bwd  # noqa: E402

from .compile_util import compile_variants, requires_nvrtc  # noqa: E402


pytestmark = requires_nvrtc


@pytest.fixture(scope="module")
def compiled():
    return {job: res for job, (res, _) in compile_variants(_launch_bwd.backward_portable_variants()).items()}


def _threads(name: str) -> int:
    if "bwd_preprocess_portable" in name or "bwd_dq_convert_portable" in name:
        return _launch_bwd.ROW_KERNEL_THREADS
    return _launch_bwd.portable_backward_tiles(_launch_bwd.variant_headdim(name)).threads


def test_variant_list_is_complete():
    variants = _launch_bwd.backward_portable_variants()
    assert len(variants) == len(set(variants))
    names = [n for _, n in variants]
    for ctype in ("cuflash::half_t", "cuflash::bf16_t", "float"):
        assert f"cuflash::bwd_preprocess_portable<{ctype}>" in names
        assert f"cuflash::bwd_dq_convert_portable<{ctype}>" in names
        for d in _launch_bwd.HEADDIM_BUCKETS:
            for drop in ("false", "true"):
                assert f"cuflash::bwd_dkdv_portable<{ctype}, {d}, {drop}>" in names
                assert f"cuflash::bwd_dq_portable<{ctype}, {d}, {drop}>" in names
    # every head dim 1..256 maps to a bucket whose kernels are in the list
    for hd in range(1, 257):
        tiles = _launch_bwd.portable_backward_tiles(hd)
        assert tiles.headdim_bucket >= hd
        assert f"cuflash::bwd_dkdv_portable<float, {tiles.headdim_bucket}, true>" in names


def test_dispatch_picks_listed_variants():
    """Every kernel that backward_portable can launch (each dtype, head dim, dropout, mode) is listed."""
    names = {n for _, n in _launch_bwd.backward_portable_variants()}
    for dtype in ("float16", "bfloat16", "float32"):
        for hd in (1, 31, 32, 33, 64, 100, 128, 129, 256):
            for dropout in (False, True):
                d = _launch_bwd.portable_backward_tiles(hd).headdim_bucket
                picked = _launch_bwd._names(dtype, d, dropout)
                assert set(picked.values()) <= names, (dtype, hd, dropout, picked)
                assert _launch_bwd.variant_dropout(picked["dkdv"]) is dropout
                assert _launch_bwd.variant_headdim(picked["dq"]) == d


def test_tiles_are_consistent():
    for d in _launch_bwd.HEADDIM_BUCKETS:
        t = _launch_bwd.portable_backward_tiles(d)
        assert t.threads % t.tpr == 0 and 32 % t.tpr == 0
        assert t.block_n * t.tpr == t.threads and t.dq_block_m * t.tpr == t.threads
        assert (d // t.tpr) % 4 == 0 and d // t.tpr <= 16   # float4 chunks, at most 16 columns per thread
        # dQ phase mapping: threads -> (column, row group), or several columns per thread when d > threads
        assert t.threads % d == 0 and t.block_q % (t.threads // d) == 0 or d % t.threads == 0
        assert t.dkdv_smem_dropout <= 48 * 1024 and t.dq_smem <= 48 * 1024
        # dropout: 4-key Philox groups, one u32 of keep bits per row, warp-uniform Philox loop (dK/dV kernel)
        assert t.block_n % 4 == 0 and t.block_n <= 32 and t.dq_block_n % 4 == 0 and t.dq_block_n <= 32
        assert (t.block_q * t.block_n // 4) % 32 == 0


def test_backward_variants_no_spills(compiled):
    assert len(compiled) == 2 * len(_launch_bwd.backward_portable_variants())
    bad = {}
    for (arch, f, n), r in compiled.items():
        assert r, f"no ptxas resources parsed for {n} ({arch})"
        if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["registers"] > 255:
            bad[(arch, n)] = r
    assert not bad, f"variants with spills/stack or too many registers: {bad}"


def test_backward_variants_fit_one_block_per_sm(compiled):
    for (arch, f, n), r in compiled.items():
        assert r["registers"] * _threads(n) <= 65536, (arch, n, r)


def test_backward_main_kernels_keep_three_blocks_per_sm(compiled):
    # __launch_bounds__(128, 3): ptxas must honour the 168-register cap (else occupancy drops silently)
    for (arch, f, n), r in compiled.items():
        if "bwd_dkdv_portable" in n or "bwd_dq_portable" in n:
            assert r["registers"] <= 168, (arch, n, r)


def test_backward_static_smem_matches_tiles(compiled):
    for (arch, f, n), r in compiled.items():
        assert r["smem"] == _launch_bwd.expected_static_smem(n), (arch, n, r)


def test_dropout_off_variants_carry_no_dropout_cost(compiled):
    """DROPOUT = false compiles the generator out: the keep-bit shared memory (dK/dV kernel) exists only in
    the dropout variants."""
    for (arch, f, n), r in compiled.items():
        if n.endswith(", false>"):
            on = compiled[(arch, f, n.replace(", false>", ", true>"))]
            d = _launch_bwd.variant_headdim(n)
            tiles = _launch_bwd.portable_backward_tiles(d)
            if "bwd_dkdv_portable" in n:
                assert r["smem"] == tiles.dkdv_smem and on["smem"] == tiles.dkdv_smem_dropout, (arch, n)
            else:
                assert r["smem"] == on["smem"] == tiles.dq_smem, (arch, n)
