"""Shared scaffolding of the CPU compile tests: NVRTC availability, target archs, a process pool.

NVRTC compiles without a GPU; a 2-core CI machine compiles two variants at a time, and results land
in the on-disk kernel cache so reruns are fast.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
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


# ==== SASS (where a cuobjdump can be found: on PATH, in /usr/local/cuda/bin, or with triton=True in Triton's
# wheel; the older SASS tests keep to the first two: their via-ptxas path, without NVRTC's options, reads
# local-memory traffic into bwd_sm80 kernels that NVRTC compiles without any) ===============================

def tool(name, triton=False):
    exe = shutil.which(name)
    if exe is None and os.path.exists(f"/usr/local/cuda/bin/{name}"):
        exe = f"/usr/local/cuda/bin/{name}"
    if exe is None and triton:
        spec = importlib.util.find_spec("triton")  # (not imported: the location of its bundled tools)
        if spec is not None and spec.submodule_search_locations:
            cand = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin", name)
            exe = cand if os.path.exists(cand) else None
    return exe


def sass_of_cubin(path, triton=False):
    exe = tool("cuobjdump", triton)
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "-sass", path], capture_output=True, text=True, timeout=120)
    except Exception:
        return None
    return res.stdout if res.returncode == 0 and "Function" in res.stdout else None


def sass_via_ptxas(arch, filename, name, triton=False):
    """NVRTC's PTX (same options) through a local ptxas: for a cuobjdump older than NVRTC's cubins.
    The PTX .version is lowered to what that ptxas accepts (the kernels use no newer PTX feature)."""
    ptxas, cuobjdump = tool("ptxas", triton), tool("cuobjdump", triton)
    if ptxas is None or cuobjdump is None:
        return None
    from cupy_backends.cuda.libs import nvrtc

    opts = [o for o in _compile._options(arch, ()) if not o.startswith("-arch")]
    opts.append("-arch=" + arch.replace("sm_", "compute_"))
    prog = nvrtc.createProgram(_compile.build_source(filename), filename, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, opts)
        ptx = nvrtc.getPTX(prog).rstrip(b"\0").decode()
    finally:
        nvrtc.destroyProgram(prog)
    with tempfile.TemporaryDirectory() as td:
        src, out = os.path.join(td, "k.ptx"), os.path.join(td, "k.cubin")
        for _ in range(2):
            with open(src, "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, f"-arch={arch}", src, "-o", out], capture_output=True, text=True)
            if r.returncode == 0:
                return sass_of_cubin(out, triton)
            m = re.search(r"current version is '(\d+\.\d+)'", r.stderr)
            if not m:
                return None
            ptx = re.sub(r"^\.version \d+\.\d+", f".version {m.group(1)}", ptx, flags=re.M)
    return None
