"""What kind of array came in, zero-copy views of it, and results back in the caller's type.

Frameworks are recognised by the module their array type lives in and never imported here: when a
torch tensor arrives, torch is already in ``sys.modules`` and is taken from there. CUDA memory is
viewed as a CuPy array through DLPack with no copy; outputs are allocated by the caller's own
framework (torch's caching allocator for tensors) and viewed the same way, so the result handed
back *is* the memory the kernel wrote. Work runs on the input's device and the caller's current
stream (torch's current stream for tensors, CuPy's for CuPy arrays).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
_DLPACK_CUDA, _DLPACK_CPU = 2, 1


def kind_of(x) -> str | None:
    """'numpy' | 'cupy' | 'torch' | 'jax' | 'dlpack' (any other DLPack producer) | None."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "cupy" or mod == "cupyx":
        return "cupy"
    if mod == "torch" and hasattr(x, "data_ptr"):
        return "torch"
    if mod in ("jax", "jaxlib") and hasattr(x, "devices"):
        return "jax"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return "dlpack"
    return None


def describe(x) -> str:
    """Short description for error messages: type, and dtype/shape when it has them."""
    t = type(x)
    name = f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{name} of shape {tuple(shape)} and dtype {dtype_name(dtype) or dtype}"
    return name


def dtype_name(dt) -> str | None:
    """Canonical dtype name ('float16', 'bfloat16', 'float32', ...) for numpy/cupy/torch/jax dtypes."""
    s = str(dt)
    if s.startswith("torch."):
        s = s[6:]
    try:
        return np.dtype(s).name if s != "bfloat16" else "bfloat16"
    except TypeError:
        return s


@dataclass
class Info:
    """What an argument is, read without copying or importing its framework."""

    kind: str
    shape: tuple
    dtype: str
    strides: tuple | None     # in elements; None when the framework hides them (JAX: row-major)
    device: tuple             # ("cpu", 0) or ("cuda", id)

    @property
    def is_cuda(self) -> bool:
        return self.device[0] == "cuda"


def info(x, kind: str | None = None) -> Info:
    kind = kind or kind_of(x)
    if kind == "numpy":
        isz = x.itemsize
        return Info(kind, tuple(x.shape), dtype_name(x.dtype), tuple(s // isz for s in x.strides), ("cpu", 0))
    if kind == "cupy":
        isz = x.itemsize
        return Info(kind, tuple(x.shape), dtype_name(x.dtype), tuple(s // isz for s in x.strides),
                    ("cuda", x.device.id))
    if kind == "torch":
        dev = x.device
        device = ("cuda", dev.index if dev.index is not None else 0) if dev.type == "cuda" else (dev.type, 0)
        return Info(kind, tuple(x.shape), dtype_name(x.dtype), tuple(x.stride()), device)
    if kind == "jax":
        devs = list(x.devices())
        if len(devs) != 1:
            raise ValueError(f"cuflash: a JAX array on {len(devs)} devices (sharded) is not supported; "
                             "call cuflash per shard (e.g. inside shard_map)")
        d = devs[0]
        device = ("cuda", d.local_hardware_id if d.local_hardware_id is not None else d.id) \
            if d.platform in ("gpu", "cuda") else ("cpu", 0)
        return Info(kind, tuple(x.shape), dtype_name(x.dtype), None, device)
    if kind == "dlpack":
        dev_type, dev_id = x.__dlpack_device__()
        if int(dev_type) == _DLPACK_CUDA:
            return info(_cupy().from_dlpack(x), "cupy")._replace_kind("dlpack")
        if int(dev_type) == _DLPACK_CPU:
            return info(np.from_dlpack(x), "numpy")._replace_kind("dlpack")
        raise TypeError(f"cuflash: DLPack device type {dev_type} is not supported (CPU or CUDA only)")
    raise TypeError(f"cuflash: expected a CuPy, NumPy, PyTorch or JAX array (or any DLPack producer), "
                    f"got {describe(x)}")


def _replace_kind(self: Info, kind: str) -> Info:
    return Info(kind, self.shape, self.dtype, self.strides, self.device)


Info._replace_kind = _replace_kind


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("cuflash: CUDA arrays need CuPy: pip install 'cuflash[cuda13]' "
                           "(or cuda12 for CUDA 12 drivers)") from e
    return cupy


# ---- CPU arrays (computed by the NumPy reference) --------------------------------------------------

def to_numpy(x, kind: str):
    """A NumPy array with the values of a CPU array (torch bf16 goes through float32)."""
    if kind == "numpy":
        return x
    if kind == "torch":
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            return t.float().numpy().astype(BFLOAT16)
        return t.numpy()
    if kind == "jax":
        return np.asarray(x)
    return np.from_dlpack(x)


def from_numpy(a: np.ndarray, kind: str, like, dtype: str):
    """Hand a NumPy result back as the caller's CPU array type with the given dtype."""
    target = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    a = np.ascontiguousarray(a.astype(target, copy=False))
    if kind == "torch":
        torch = sys.modules["torch"]
        if dtype == "bfloat16":
            return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(a)
    if kind == "jax":
        return sys.modules["jax"].numpy.asarray(a)
    return a


# ---- CUDA arrays ---------------------------------------------------------------------------------

class _StreamHandle:
    """A raw stream pointer presented through the CUDA stream protocol."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


_external_streams: dict[tuple[int, int], object] = {}


def external_stream(ptr: int, device_id: int):
    """A CuPy stream object for a stream someone else owns (cached: wrapping costs microseconds)."""
    key = (int(ptr), device_id)
    s = _external_streams.get(key)
    if s is None:
        cupy = _cupy()
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            with cupy.cuda.Device(device_id):
                s = from_external(_StreamHandle(ptr))  # CUDA stream protocol (CuPy >= 14)
        else:  # pragma: no cover - older CuPy
            s = cupy.cuda.ExternalStream(int(ptr), device_id)
        _external_streams[key] = s
    return s


def current_stream(kind: str, device_id: int):
    """The caller's current stream on the device, as a CuPy stream object."""
    cupy = _cupy()
    if kind == "torch":
        torch = sys.modules["torch"]
        return external_stream(torch.cuda.current_stream(device_id).cuda_stream, device_id)
    with cupy.cuda.Device(device_id):
        return cupy.cuda.get_current_stream()


def _torch_view(t):
    """Zero-copy CuPy view of a CUDA tensor: its own pointer, shape and strides, the tensor kept alive
    as the memory's owner. (DLPack would do the same, but torch's __dlpack__ costs ~50 us a call in
    stream bookkeeping that is moot here: the work already runs on torch's current stream.)"""
    cupy = _cupy()
    dtype = _np_dtype(str(t.dtype)[6:])
    isz = dtype.itemsize
    shape = tuple(t.shape)
    nbytes = max(1, (sum((n - 1) * st for n, st in zip(shape, t.stride())) + 1) * isz) if t.numel() else 0
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), nbytes, t, t.device.index or 0)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0), strides=tuple(st * isz for st in t.stride()))


def as_cupy(x, kind: str):
    """Zero-copy CuPy view of a CUDA array (call inside the run's device and stream context)."""
    if kind == "cupy":
        return x
    cupy = _cupy()
    if kind == "torch":
        return _torch_view(x.detach())
    if kind == "jax":
        # JAX runs asynchronously on streams of its own: wait until the producer is done.
        x.block_until_ready()
    return cupy.from_dlpack(x)


class Allocator:
    """Allocates outputs and scratch with the caller's framework, returning (native, cupy view)."""

    def __init__(self, kind: str, like, device_id: int):
        self.kind, self.like, self.device_id = kind, like, device_id

    def empty(self, shape, dtype: str):
        cupy = _cupy()
        if self.kind == "torch":
            torch = sys.modules["torch"]
            t = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.like.device)
            return t, (_torch_view(t) if t.numel() else cupy.empty(tuple(shape), _np_dtype(dtype)))
        a = cupy.empty(tuple(shape), _np_dtype(dtype))
        return a, a

    def zeros(self, shape, dtype: str):
        native, view = self.empty(shape, dtype)
        view.fill(0)
        return native, view

    def scratch(self, shape, dtype: str):
        """Temporary device memory (just the CuPy view)."""
        return self.empty(shape, dtype)[1]


def _np_dtype(dtype: str):
    return BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)


def to_caller(native, kind: str, stream=None):
    """The result in the caller's type. ``native`` is what ``Allocator.empty`` returned."""
    if kind == "jax":
        if stream is not None:
            stream.synchronize()  # JAX does not see our stream: the data must be complete
        return sys.modules["jax"].dlpack.from_dlpack(native)
    return native
