"""CPU tests of the Hopper forward's kernels (NVRTC compiles for sm_90a without a GPU).

Every variant ``cuflash._launch_sm90.variants("sm_90a")`` lists compiles with no spills and no stack
frame, with no serialised-wgmma warning from ptxas (C7514 / C7519 / C7517 mean the tensor-core pipeline
would be drained around each MMA), within the 227 KB shared-memory limit; no sm90 variant is listed for
other architectures; and the generated wgmma wrappers (kernels_cu/wgmma_ops.cuh) are what
``cuflash._gen_wgmma`` writes.
"""

import pytest

from cuflash import _compile, _gen_wgmma

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch_sm90  # noqa: E402

from .compile_util import compile_variants, requires_nvrtc  # noqa: E402

SMEM_LIMIT = 227 * 1024


def test_generated_wgmma_header_is_current():
    assert _gen_wgmma.header_path().read_text() == _gen_wgmma.render(), \
        "kernels_cu/wgmma_ops.cuh is stale: run python -m cuflash._gen_wgmma"


def test_variants_only_for_sm90a():
    assert _launch_sm90.variants("sm_80") == [] and _launch_sm90.variants("sm_86") == []
    v = _launch_sm90.variants("sm_90a")
    assert len(v) == len(set(v)) == 2 * len(_launch_sm90.SM90_FORWARD_TILES)
    for t in _launch_sm90.SM90_FORWARD_TILES.values():
        assert t.smem + 1024 <= SMEM_LIMIT  # + the static (1024-aligned) barrier block


@requires_nvrtc
def test_every_variant_compiles_without_spills_or_serialised_wgmma():
    res = compile_variants(lambda arch: _launch_sm90.variants(arch), ("sm_90a",))
    assert len(res) == len(_launch_sm90.variants("sm_90a"))
    for (arch, f, n), (r, path) in res.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, (n, r)
        c = _compile.compile_cubin(f, (n,), arch)  # cache hit: its ptxas log
        log = getattr(c, "log", "") or ""
        for code in ("C7514", "C7519", "C7517", "C7508"):
            assert code not in log, (n, code, log[-2000:])
