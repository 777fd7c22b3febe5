#!/usr/bin/env python3
"""Compile, in parallel, every variant of the named kernel files for this GPU (the device scripts' warm-up,
so that tests and benchmarks do not compile one kernel at a time). Usage: precompile_files.py FILE.cu ..."""
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


def main(files):
    arch = _compile.device_arch(0)
    vs = [v for v in all_variants(arch) if not files or v[0] in files]
    with ProcessPoolExecutor(16) as ex:
        for r in ex.map(_one, [(arch, v) for v in vs]):
            if r:
                print(r)
    print(f"precompiled {len(vs)} variants for {arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
