"""Shared scaffolding of the CPU compile tests: NVRTC availability, target archs, a process pool.

NVRTC compiles without a GPU; a 2-core CI machine compiles two variants at a time, and results land
in the on-disk kernel cache so reruns are fast.
"""

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from cuflash import _compile

ARCHS = ("sm_80", "sm_90a")


def nvrtc_ok() -> bool:
    try:
        _compile.nvrtc_version()
        return True
    except Exception:
        return False


requires_nvrtc = pytest.mark.skipif(not nvrtc_ok(), reason="NVRTC library not found (pip install nvidia-cuda-nvrtc)")


def pool_map(fn, jobs):
    """fn over jobs in a process pool as wide as the machine (fn must be a module-level function)."""
    jobs = list(jobs)
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as ex:
        return list(ex.map(fn, jobs))


def _compile_one(job):
    arch, f, n = job
    c = _compile.compile_cubin(f, (n,), arch)
    return job, c.resources[n], str(c.cubin_path)


def arch_jobs(variants, archs=ARCHS):
    """[(arch, file, name)]: ``variants`` is a list (the same on every arch) or a function of the arch
    (e.g. ``_launch_sm80.variants``: what the dispatcher can pick there)."""
    return [(arch, f, n) for arch in archs for f, n in (variants(arch) if callable(variants) else variants)]


def compile_variants(variants, archs=ARCHS):
    """{(arch, file, name): (resources, cubin path)} for every variant of every arch (``variants`` as in
    ``arch_jobs``), compiled in a pool."""
    return {job: (res, path) for job, res, path in pool_map(_compile_one, arch_jobs(variants, archs))}
