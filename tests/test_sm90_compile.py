"""CPU tests of the Hopper forward's kernels (NVRTC compiles for sm_90a without a GPU).

Every variant ``cuflash._launch_sm90.variants("sm_90a")`` lists compiles with no spills and no stack
frame, with no serialised-wgmma message from ptxas (C75xx "wgmma.mma_async instructions are serialized":
the tensor-core pipeline would be drained around each MMA), within the 227 KB shared-memory limit; no sm90 variant is listed for
other architectures; and the generated wgmma wrappers (kernels_cu/wgmma_ops.cuh) are what
``cuflash._gen_wgmma`` writes. Where a cuobjdump is found: the schedule-5 kernels wait for P V only
after the softmax's exponentials (ptxas hoists that wait otherwise).
"""

import re

import pytest

from cuflash import _compile, _gen_wgmma

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from cuflash import _launch_sm90  # noqa: E402

from .compile_util import compile_variants, requires_nvrtc, sass_of_cubin, sass_via_ptxas  # noqa: E402

SMEM_LIMIT = 227 * 1024


def test_generated_wgmma_header_is_current():
    assert _gen_wgmma.header_path().read_text() == _gen_wgmma.render(), \
        "kernels_cu/wgmma_ops.cuh is stale: run python -m cuflash._gen_wgmma"


def test_variants_only_for_sm90a():
    assert _launch_sm90.variants("sm_80") == [] and _launch_sm90.variants("sm_86") == []
    v = _launch_sm90.variants("sm_90a")
    tiles = {**{("base", d): t for d, t in _launch_sm90.SM90_FORWARD_TILES.items()},
             **{("wide", d): t for d, t in _launch_sm90.SM90_WIDE_TILES.items()}}
    # each tile and its DROPOUT variant (key tiles of a multiple of 32), fp16 and bf16
    drops = {_launch_sm90.dropout_tile(t) for t in tiles.values()}
    assert len(v) == len(set(v)) == 2 * (len(tiles) + len(drops))
    for t in tiles.values():
        for tt in (t, _launch_sm90.dropout_tile(t)):
            assert tt.smem + 1024 <= SMEM_LIMIT  # + the static (1024-aligned) barrier block
            assert not tt.dropout or tt.block_n % 32 == 0
    assert sum(n.count(",") == 8 for _, n in v) == 2 * len(drops)  # the ninth template argument: DROPOUT


@requires_nvrtc
def test_host_smem_and_q_buffers_equal_kernel_traits():
    """Sm90Tile.smem / q_buffers / own_o equal Sm90FwdTraits' (static_assert in one NVRTC compile): the
    launch's shared memory and the kernel's layout come from the same rule."""
    from dataclasses import replace

    tiles = list(_launch_sm90.SM90_FORWARD_TILES.values()) + list(_launch_sm90.SM90_WIDE_TILES.values())
    tiles += [_launch_sm90.dropout_tile(t) for t in tiles]
    tiles += [replace(t, q_bufs=1) for t in tiles] + [replace(t, persist=not t.persist) for t in tiles]
    checks = []
    for t in dict.fromkeys(tiles):
        tr = (f"cuflash::sm90::Sm90FwdTraits<{t.headdim_bucket}, {t.block_n}, {t.stages}, {t.consumers}, "
              f"{t.q_buffers if t.persist else 0}>")
        checks.append(f'static_assert({tr}::kSmemBytes == {t.smem}, "smem {t}");')
        checks.append(f'static_assert({tr}::kQBufs == {t.q_buffers}, "q buffers {t}");')
        checks.append(f'static_assert({tr}::kOwnO == {"true" if t.own_o else "false"}, "own o {t}");')
    src = _compile.build_source(_launch_sm90.FILE) + "\n" + "\n".join(checks) + "\n"
    _compile._nvrtc_compile(src, "fwd_sm90_traits_check.cu", (), _compile._options("sm_90a", ()))


@requires_nvrtc
def test_every_variant_compiles_without_spills_or_serialised_wgmma():
    res = compile_variants(lambda arch: _launch_sm90.variants(arch), ("sm_90a",))
    assert len(res) == len(_launch_sm90.variants("sm_90a"))
    for (arch, f, n), (r, path) in res.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, (n, r)
        c = _compile.compile_cubin(f, (n,), arch)  # cache hit: its ptxas log
        log = getattr(c, "log", "") or ""
        # ptxas's "Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..."
        # (C7508 .. C7519: registers written under an in-flight wgmma, too few registers, ...): every
        # wgmma of the kernel then waits for the previous one, silently 15-25% slower.
        bad = [ln for ln in log.splitlines() if "serialized" in ln or "Performance Loss" in ln]
        assert not bad, (n, bad)


@requires_nvrtc
def test_pinned_schedule_waits_for_pv_after_the_softmax():
    """fwd_sm90.cu's schedule 5 (the d64 / d128 table): in the SASS of the key loop, the wait for the
    warpgroup's own P V (WARPGROUP.DEPBAR.LE gsb0, 0x0 after the wait for S, ... 0x1) must come after
    the softmax's MUFU.EX2: no exponential between it and the loop's next branch. ptxas hoists a plain
    wgmma.wait_group above the softmax (fwd_sm90.cu, kSchedOverlapPinned), which silently turns the
    intra-warpgroup overlap off."""
    names = [n for f, n in _launch_sm90.variants("sm_90a") if ", 5, " in n]
    assert names, "no schedule-5 kernel in the table"
    checked = 0
    for n in names:
        c = _compile.compile_cubin(_launch_sm90.FILE, (n,), "sm_90a")
        sass = sass_of_cubin(str(c.cubin_path), True) or sass_via_ptxas("sm_90a", _launch_sm90.FILE, n, True)
        if sass is None:
            pytest.skip("no cuobjdump (or ptxas + cuobjdump) that reads these kernels on this machine")
        ins = re.findall(r"/\*[0-9a-f]{4,5}\*/\s+([^;]*);", sass)
        waits = [i for i, x in enumerate(ins) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in x]
        assert waits, n
        for i in waits:
            j = next(k for k in range(i + 1, len(ins)) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in ins[k])
            end = next((k for k in range(j + 1, len(ins)) if re.search(r"\bBRA\b", ins[k])), len(ins))
            between = sum("MUFU.EX2" in x for x in ins[j:end])
            assert between == 0, (n, f"{between} exponentials after the wait for P V")
        checked += 1
    assert checked == len(names)
