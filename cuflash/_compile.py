"""Compilation of the CUDA sources in ``kernels_cu/``: NVRTC to cubin, caches, ``precompile``.

One module owns compilation. The pipeline is:

1. ``build_source(file)`` reads a ``.cu`` file and inlines every ``#include "..."`` of a local
   header (recursively, each header once). The result is self-contained, so the cache key below is
   a hash over *everything* the kernel is made of (CuPy's own disk cache hashes only the top-level
   string and would miss an edited header).
2. ``compile_cubin(file, name_expressions, arch)`` runs NVRTC (through CuPy's binding, which needs
   no GPU) to a cubin for one architecture, with ``-Xptxas=-v`` so that registers, spills and
   shared memory of every kernel come back in the log (``Compiled.resources``). Results are kept
   in memory and on disk (``cache_dir()``), keyed by the full source, name expressions, options,
   architecture and NVRTC version; a second process loads the cubin instead of compiling.
3. ``get_function(file, name_expression)`` loads the cubin into the current device through
   ``cupy.RawModule`` and returns the ``cupy.RawKernel``-like function, cached per device.

Every cold compile logs one line (logger ``cuflash``) naming what was compiled and how long it took.
First use is thread-safe: concurrent callers of the same variant wait for one compile.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_log = logging.getLogger("cuflash")

CACHE_FORMAT = 1  # bump when the cache layout or the meaning of an entry changes

# -maxrregcount=255: without it NVRTC sometimes caps a 128-thread kernel at 96 registers and spills
# (seen on fwd_portable<half, 32, dropout> for sm_80); __launch_bounds__ still bound each kernel.
_BASE_OPTIONS = ("-std=c++17", "-default-device", "-DNDEBUG", "-Xptxas=-v", "-lineinfo", "--maxrregcount=255")


def kernel_dir() -> Path:
    """Where the CUDA sources are: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (cand / "params.cuh").is_file():
            return cand
    raise FileNotFoundError(
        f"cuflash: CUDA sources not found next to {here} (looked for kernels_cu/params.cuh); "
        "the installation is incomplete"
    )


def kernel_files() -> list[str]:
    """The kernel families: every ``.cu`` file in ``kernels_cu/``."""
    return sorted(p.name for p in kernel_dir().glob("*.cu"))


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def build_source(filename: str) -> str:
    """The self-contained source of ``kernels_cu/<filename>`` with local headers inlined."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"cuflash: kernel source {name!r} not found in {root}")
        text = path.read_text()

        def repl(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            return f"// ---- begin {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE_RE.sub(repl, text)

    seen.add(filename)
    return expand(filename)


def nvrtc_version() -> tuple[int, int]:
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())


def supported_archs() -> tuple[int, ...]:
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getSupportedArchs())


def arch_for_capability(major: int, minor: int) -> str:
    """``sm_90a`` on Hopper (wgmma, setmaxnreg), otherwise the device's own ``sm_XY``.

    If this NVRTC is older than the device, compile for the newest architecture it knows as
    ``compute_XY`` (PTX), which the driver JIT-compiles for the device.
    """
    cc = 10 * major + minor
    if cc == 90:
        return "sm_90a"
    known = [a for a in supported_archs() if a <= cc]
    if not known:
        raise RuntimeError(f"cuflash: NVRTC {nvrtc_version()} cannot compile for compute capability {major}.{minor}")
    if known[-1] == cc:
        return f"sm_{cc}"
    return f"compute_{known[-1]}"


def cache_dir() -> Path:
    """On-disk cache: ``$CUFLASH_CACHE_DIR``, else ``$XDG_CACHE_HOME/cuflash``, else ``~/.cache/cuflash``."""
    env = os.environ.get("CUFLASH_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cuflash"


_RES_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_RES_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RES_USED = re.compile(r"Used (\d+) registers")
_RES_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, stack, spill_stores, spill_loads, smem (static bytes)."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in log.splitlines():
        m = _RES_ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": 0, "stack": 0, "spill_stores": 0,
                                               "spill_loads": 0, "smem": 0})
            continue
        if cur is None:
            continue
        m = _RES_FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _RES_USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            m2 = _RES_SMEM.search(line)
            if m2:
                cur["smem"] = int(m2.group(1))
    return out


@dataclass
class Compiled:
    """A compiled kernel family for one architecture."""

    filename: str
    arch: str
    key: str
    cubin_path: Path
    lowered: dict[str, str]          # name expression -> mangled name
    log: str
    seconds: float                   # compile time (0 when it came from the disk cache)
    from_cache: bool
    resources: dict[str, dict[str, int]] = field(default_factory=dict)  # by name expression

    def resource(self, name_expression: str) -> dict[str, int]:
        return self.resources[name_expression]


_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}
_compiled: dict[str, Compiled] = {}
_functions: dict[tuple, object] = {}
_modules: dict[tuple, object] = {}      # keeps each loaded module alive with its function
_smem_set: dict[tuple, int] = {}        # dynamic shared memory limit already raised per function


def _options(arch: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    return (f"-arch={arch}",) + _BASE_OPTIONS + tuple(extra) + _dev_defines()


def _dev_defines() -> tuple[str, ...]:
    """``-D`` options from CUFLASH_NVRTC_DEFINES ("NAME[=VALUE],..."): compile-time switches of the kernel
    sources for A / B measurements (e.g. CUFLASH_BWD_RNG_NPAR=4); empty normally. Part of the cache key."""
    spec = os.environ.get("CUFLASH_NVRTC_DEFINES", "")
    return tuple(f"-D{d.strip()}" for d in spec.split(",") if d.strip())


def _cache_key(source: str, names: tuple[str, ...], options: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (f"cuflash-cache-{CACHE_FORMAT}", repr(nvrtc_version()), repr(options), repr(names), source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _nvrtc_compile(source: str, filename: str, names: tuple[str, ...], options: tuple[str, ...]):
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"cuflash: NVRTC failed to compile {filename} for {names}:\n{log}") from e
        log = nvrtc.getProgramLog(prog).rstrip("\0")
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        binary = nvrtc.getCUBIN(prog) if any(o.startswith("-arch=sm_") for o in options) else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return binary, lowered, log


def compile_cubin(filename: str, name_expressions, arch: str, extra_options=()) -> Compiled:
    """Compile ``kernels_cu/<filename>`` for ``arch`` (no GPU needed); memory- and disk-cached."""
    names = tuple(name_expressions)
    source = build_source(filename)
    options = _options(arch, tuple(extra_options))
    key = _cache_key(source, names, options)
    with _lock:
        hit = _compiled.get(key)
        if hit is not None:
            return hit
        klock = _key_locks.setdefault(key, threading.Lock())
    with klock:
        with _lock:
            hit = _compiled.get(key)
        if hit is not None:
            return hit
        result = _load_from_disk(key, filename, arch)
        if result is None:
            t0 = time.perf_counter()
            binary, lowered, log = _nvrtc_compile(source, filename, names, options)
            dt = time.perf_counter() - t0
            result = _store_on_disk(key, filename, arch, binary, lowered, log, dt)
            _log.info("cuflash: compiled %s [%s] for %s in %.1f s (cached in %s)",
                      filename, ", ".join(names), arch, dt, result.cubin_path.parent)
        with _lock:
            _compiled[key] = result
        return result


def _with_resources(c: Compiled) -> Compiled:
    by_mangled = parse_ptxas_log(c.log)
    c.resources = {n: by_mangled.get(m, {}) for n, m in c.lowered.items()}
    return c


def _load_from_disk(key: str, filename: str, arch: str) -> Compiled | None:
    d = cache_dir()
    meta_path, bin_path = d / f"{key}.json", d / f"{key}.bin"
    try:
        meta = json.loads(meta_path.read_text())
        if not bin_path.is_file() or meta.get("format") != CACHE_FORMAT:
            return None
    except (OSError, ValueError):
        return None
    return _with_resources(Compiled(filename, arch, key, bin_path, meta["lowered"], meta["log"],
                                    0.0, True))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _store_on_disk(key, filename, arch, binary, lowered, log, seconds) -> Compiled:
    d = cache_dir()
    bin_path = d / f"{key}.bin"
    meta = {"format": CACHE_FORMAT, "file": filename, "arch": arch, "lowered": lowered, "log": log,
            "seconds": round(seconds, 3), "created": time.time()}
    try:
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(bin_path, bytes(binary))
        _atomic_write(d / f"{key}.json", json.dumps(meta).encode())
    except OSError as e:  # read-only home and such: keep going from a temporary file
        _log.warning("cuflash: cannot write the kernel cache in %s (%s); using a temporary file", d, e)
        fd, tmp = tempfile.mkstemp(suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(binary))
        bin_path = Path(tmp)
    return _with_resources(Compiled(filename, arch, key, bin_path, lowered, log, seconds, False))


def device_arch(device_id: int) -> str:
    import cupy

    major, minor = cupy.cuda.Device(device_id).compute_capability
    return arch_for_capability(int(major), int(minor))


def get_function(filename: str, name_expression: str, device_id: int, dynamic_smem: int = 0,
                 attributes: tuple = ()):
    """The loaded kernel for the given device (compiling or loading from cache on first use).

    ``dynamic_smem`` raises the function's dynamic shared-memory limit when it is above 48 KB;
    ``attributes``: (CUfunction_attribute, value) pairs set on the function through the driver (e.g.
    ``FUNC_ATTR_NON_PORTABLE_CLUSTER``, 1: clusters above the portable 8 blocks).
    """
    fkey = (filename, name_expression, device_id, _dev_defines())  # (A / B builds with -D switches apart)
    fn = _functions.get(fkey)
    if fn is None:
        import cupy

        compiled = compile_cubin(filename, (name_expression,), device_arch(device_id))
        with cupy.cuda.Device(device_id):
            module = cupy.RawModule(path=str(compiled.cubin_path))
            fn = module.get_function(compiled.lowered[name_expression])
        with _lock:
            _modules.setdefault(fkey, module)
            fn = _functions.setdefault(fkey, fn)
    if dynamic_smem > 48 * 1024 and _smem_set.get(fkey, 0) < dynamic_smem:
        fn.max_dynamic_shared_size_bytes = dynamic_smem
        _smem_set[fkey] = dynamic_smem
    for attr, value in attributes:
        if _attrs_set.get((fkey, attr)) != value:
            _set_function_attribute(fn, attr, value)
            _attrs_set[(fkey, attr)] = value
    return fn


# cuda.h, CUfunction_attribute
FUNC_ATTR_NON_PORTABLE_CLUSTER = 14      # 1: cluster sizes above 8 allowed
FUNC_ATTR_CLUSTER_SCHEDULING = 15        # 0 default, 1 spread, 2 load balancing
_attrs_set: dict = {}


@functools.lru_cache(maxsize=None)
def libcuda():
    """The CUDA driver library through ctypes (for what CuPy does not expose: function attributes here,
    tensor-map encoding in _tma)."""
    import ctypes

    return ctypes.CDLL("libcuda.so.1")


def _set_function_attribute(fn, attribute: int, value: int) -> None:
    """cuFuncSetAttribute on a loaded kernel (CuPy exposes only some attributes), through the driver."""
    import ctypes

    set_attr = libcuda().cuFuncSetAttribute
    set_attr.restype = ctypes.c_int
    set_attr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    err = set_attr(ctypes.c_void_p(int(fn.kernel.ptr)), attribute, value)
    if err != 0:
        raise RuntimeError(f"cuFuncSetAttribute({attribute}, {value}) failed with CUresult {err}")


def cached_entries() -> list[dict]:
    """What the on-disk cache holds (for ``python -m cuflash info``)."""
    out = []
    d = cache_dir()
    if not d.is_dir():
        return out
    for meta_path in sorted(d.glob("*.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        out.append({"key": meta_path.stem, "file": meta.get("file"), "arch": meta.get("arch"),
                    "kernels": list(meta.get("lowered", {})), "seconds": meta.get("seconds")})
    return out
