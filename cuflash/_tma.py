"""TMA tensor maps for the sm90 forward: ``cuTensorMapEncodeTiled`` through ctypes on the driver.

A tensor map (``CUtensorMap``, 128 opaque bytes) describes one operand for the copy engine: base
address, sizes and byte strides of up to five dimensions, the box copied per instruction and the
shared-memory swizzle. cuflash's operands are (batch, seqlen, heads, headdim) with any strides; the map
lists them innermost first: (headdim, heads, seqlen, batch). Boxes are 64 columns (128 bytes, the
128-byte swizzle) x 1 head x rows x 1 batch.

Encoding is a pure host call of the driver (no context, no device work), a few microseconds. Maps are
cached by everything they encode (the base address included), so that repeated calls on the same
buffers, the common case in training loops and benchmarks, cost one dictionary lookup.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

SIZE = 128  # bytes of one CUtensorMap
DTYPE_CODES = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_INTERLEAVE_NONE = 0
_OOB_FILL_ZEROS = 0
_MAX_STRIDE = 1 << 40
_MAX_DIM = 1 << 32


class TmaError(RuntimeError):
    """The driver rejected a tensor map (the caller falls back to another path)."""


class MapSpec(NamedTuple):
    """One 4-D operand map, all but the base address: what a recorded launch keeps for replays."""

    operand: str                 # Run attribute / replay slot name: "q", "k", "v", "out"
    dtype: str                   # "float16" | "bfloat16"
    dims: tuple                  # (headdim, heads, seqlen, batch), innermost first
    strides: tuple               # byte strides of dims 1..3
    box: tuple                   # (64, 1, rows, 1)


_cu = None


def _driver():
    global _cu
    if _cu is None:
        from ._compile import libcuda

        fn = libcuda().cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _cu = fn
    return _cu


def spec_for(operand: str, a, rows: int) -> MapSpec:
    """The map of a 4-D (batch, seqlen, heads, headdim) CuPy array with boxes of ``rows`` rows.

    Raises TmaError when the copy engine cannot address it (base or strides not multiples of 16
    bytes, or sizes past its limits); dimensions of extent 1 get a harmless stride of 16 bytes.
    """
    if a.ndim != 4 or a.itemsize != 2 or str(a.dtype) not in DTYPE_CODES:
        raise TmaError(f"{operand}: expected a 4-D float16/bfloat16 array")
    b, s, h, d = (int(x) for x in a.shape)
    if a.shape[3] > 1 and a.strides[3] != 2:
        raise TmaError(f"{operand}: the last dimension must be contiguous")
    strides = []
    for ext, st in ((h, a.strides[2]), (s, a.strides[1]), (b, a.strides[0])):
        st = int(st)
        if ext == 1:
            st = 16
        if st <= 0 or st % 16 or st >= _MAX_STRIDE:
            raise TmaError(f"{operand}: byte stride {st} is not a positive multiple of 16 below 2^40")
        strides.append(st)
    if max(b, s, h, d) > _MAX_DIM:
        raise TmaError(f"{operand}: a dimension exceeds 2^32")
    dtype = "bfloat16" if "bfloat16" in str(a.dtype) else "float16"
    return MapSpec(operand, dtype, (d, h, s, b), tuple(strides), (64, 1, int(rows), 1))


@functools.lru_cache(maxsize=1024)
def encode(spec: MapSpec, ptr: int) -> bytes:
    """The 128 bytes of the map of ``spec`` at base address ``ptr`` (cached)."""
    if ptr % 16:
        raise TmaError(f"{spec.operand}: base address is not 16-byte aligned")
    out = (ctypes.c_uint8 * SIZE)()
    dims = (ctypes.c_uint64 * 4)(*spec.dims)
    strides = (ctypes.c_uint64 * 3)(*spec.strides)
    box = (ctypes.c_uint32 * 4)(*spec.box)
    estr = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    rc = _driver()(ctypes.addressof(out), DTYPE_CODES[spec.dtype], 4, ctypes.c_void_p(ptr), dims, strides, box,
                   estr, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if rc != 0:
        raise TmaError(f"{spec.operand}: cuTensorMapEncodeTiled returned CUresult {rc} for {spec}")
    return bytes(out)


def pack(specs, ptrs) -> bytes:
    """The kernel's TmaMaps argument: the maps of ``specs`` at ``ptrs``, concatenated."""
    return b"".join(encode(s, int(p)) for s, p in zip(specs, ptrs))
