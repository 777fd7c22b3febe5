"""CPU tests of the compile pipeline: every kernel variant the dispatcher can pick compiles through
NVRTC for sm_80 and sm_90a with zero spills, and the host/device parameter struct agree.

No GPU needed: NVRTC compiles without one. Compiles run in a process pool (a 2-core CI machine
compiles two variants at a time) and land in the on-disk cache, so a rerun is fast.
"""

import os
import re

import numpy as np
import pytest

from cuflash import _compile, _launch

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) not installed")

from .compile_util import compile_variants, requires_nvrtc  # noqa: E402


pytestmark = requires_nvrtc


# ---- the Params struct: header and host mirror agree field by field ------------------------------

_CTYPE_TO_NP = {"const void*": "u8", "void*": "u8", "float*": "u8", "const float*": "u8", "int*": "u8",
                "i64": "i8", "u64": "u8", "int": "i4", "float": "f4", "u32": "u4"}


def _header_fields():
    text = (_compile.kernel_dir() / "params.cuh").read_text()
    body = re.search(r"struct Params \{(.*?)\n\};", text, re.S).group(1)
    fields = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.match(r"((?:const )?\w+\*?)\s+(.+);$", line)
        assert m, f"unparsed Params line: {line!r}"
        ctype, names = m.groups()
        for n in names.split(","):
            fields.append((n.strip(), _CTYPE_TO_NP[ctype]))
    return fields


def test_params_struct_matches_header():
    assert _header_fields() == _launch.PARAMS_FIELDS
    # 8-byte fields first: no hidden padding, the size is the sum of the fields
    assert _launch.PARAMS_DTYPE.itemsize == sum(np.dtype(t).itemsize for _, t in _launch.PARAMS_FIELDS)


def test_build_source_inlines_headers_once():
    src = _compile.build_source("fwd_portable.cu")
    assert '#include "' not in src
    assert src.count("struct Params {") == 1


def test_cache_key_covers_headers(tmp_path, monkeypatch):
    # Editing a header must change the key of every kernel including it.
    import shutil

    kd = tmp_path / "kernels_cu"
    shutil.copytree(_compile.kernel_dir(), kd)
    monkeypatch.setattr(_compile, "kernel_dir", lambda: kd)
    opts = _compile._options("sm_80", ())
    k1 = _compile._cache_key(_compile.build_source("fwd_portable.cu"), ("x",), opts)
    (kd / "mask.cuh").write_text((kd / "mask.cuh").read_text() + "\n// edited\n")
    k2 = _compile._cache_key(_compile.build_source("fwd_portable.cu"), ("x",), opts)
    assert k1 != k2


def test_dev_defines_reach_the_options_and_the_cache_key(monkeypatch):
    # CUFLASH_NVRTC_DEFINES (A / B runs of the kernels' compile-time switches) appends -D options, which
    # are part of the cache key, so a switched build never shadows the default one.
    monkeypatch.delenv("CUFLASH_NVRTC_DEFINES", raising=False)
    base = _compile._options("sm_90a", ())
    assert not [o for o in base if o.startswith("-D") and o != "-DNDEBUG"]
    monkeypatch.setenv("CUFLASH_NVRTC_DEFINES", "CUFLASH_BWD_RNG_NPAR=4, FOO ,")
    opts = _compile._options("sm_90a", ())
    assert opts == base + ("-DCUFLASH_BWD_RNG_NPAR=4", "-DFOO")
    assert _compile._cache_key("x", ("k",), opts) != _compile._cache_key("x", ("k",), base)


def test_ptxas_log_parser():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z1kv\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n")
    assert _compile.parse_ptxas_log(log) == {"_Z1kv": {"registers": 40, "stack": 8, "spill_stores": 4,
                                                       "spill_loads": 4, "smem": 2048}}


def test_disk_cache_second_process(tmp_path):
    """A second process loads the cubin from disk instead of compiling."""
    import subprocess
    import sys

    code = ("from cuflash import _compile as c; r = c.compile_cubin('fwd_portable.cu', "
            "['cuflash::fwd_portable<float, 32, false>'], 'sm_80'); print(r.from_cache, r.seconds)")
    import cuflash

    root = os.path.dirname(os.path.dirname(os.path.abspath(cuflash.__file__)))
    env = dict(os.environ, CUFLASH_CACHE_DIR=str(tmp_path),
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split()[0] == "False" and "compiled fwd_portable.cu" in first.stderr
    assert second.stdout.split()[0] == "True" and "compiled" not in second.stderr


# ---- every variant, both architectures, zero spills --------------------------------------------

@pytest.fixture(scope="module")
def compiled():
    from cuflash._precompile import all_variants

    return {job: res for job, (res, _) in compile_variants(all_variants).items()}  # each arch: its own list


def test_every_variant_compiles_without_spills(compiled):
    assert len(compiled) >= 2 * 12  # at least the portable forward for 3 dtypes x 4 buckets x 2 archs
    bad = {job: r for job, r in compiled.items()
           if r.get("spill_stores", 1) or r.get("spill_loads", 1) or r.get("stack", 1) or r.get("registers", 256) > 255}
    assert not bad, f"variants with spills/stack or too many registers: {bad}"


def test_portable_forward_limits(compiled):
    from cuflash import _config

    for (arch, f, n), r in compiled.items():
        if f != "fwd_portable.cu":
            continue
        d = int(n.split(",")[1].strip(" >"))
        cfg = _config.portable_forward(d)
        # static shared memory: K and V tiles in fp32, as the traits say
        assert r["smem"] == 2 * cfg.block_n * d * 4, (n, r)
        assert r["registers"] <= 65536 // cfg.threads, (n, r)  # one block fits an SM


def test_concurrent_first_use_compiles_once(tmp_path, monkeypatch):
    """Threads asking for the same variant at once wait for one compile and share its result."""
    import threading

    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_compile, "_compiled", {})
    calls = []
    real = _compile._nvrtc_compile

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(_compile, "_nvrtc_compile", counting)
    results, errors = [], []

    def worker():
        try:
            results.append(_compile.compile_cubin("fwd_portable.cu", ("cuflash::fwd_portable<float, 64, false>",),
                                                  "sm_80"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1, f"{len(calls)} compiles for one variant"
    assert len({id(r) for r in results}) == 1 and len(results) == 8
