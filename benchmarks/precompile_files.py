#!/usr/bin/env python3
"""Compile, in parallel, every variant of the named kernel files for this GPU (the device scripts' warm-up,
so that tests and benchmarks do not compile one kernel at a time). Usage: precompile_files.py FILE.cu ...
[--sm90-test-variants] (also the Hopper forward variants tests/test_gpu_sm90.py builds beside the table)."""
import sys
from concurrent.futures import ProcessPoolExecutor

from cuflash import _compile
from cuflash._precompile import all_variants


def _one(args):
    arch, (f, name) = args
    try:
        _compile.compile_cubin(f, (name,), arch)
    except Exception as e:  # reported, not raised: the tests then show which kernel fails
        return f"COMPILE FAILED {f} {name}: {str(e)[:300]}"
    return None


def _sm90_test_variants():
    from cuflash import _launch_sm90 as L
    from tests.test_gpu_sm90 import VARIANTS

    tiles = {f(L.tile_for(d)) for f in VARIANTS.values() for d in (64, 128, 192, 256)}
    return sorted({(L.FILE, L.kernel_name(dt, t)) for t in tiles for dt in ("float16", "bfloat16")
                   if not (t.headdim_bucket > 64 and t.consumers == 3)})


def main(args):
    files = [a for a in args if not a.startswith("--")]
    arch = _compile.device_arch(0)
    vs = [v for v in all_variants(arch) if not files or v[0] in files]
    if "--sm90-test-variants" in args:
        vs += [v for v in _sm90_test_variants() if v not in vs]
    with ProcessPoolExecutor(16) as ex:
        for r in ex.map(_one, [(arch, v) for v in vs]):
            if r:
                print(r)
    print(f"precompiled {len(vs)} variants for {arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
