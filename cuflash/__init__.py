"""cuflash: exact FlashAttention for CuPy, PyTorch and JAX arrays.

CUDA C++ kernels (``kernels_cu/``) JIT-compiled through NVRTC at first use; NumPy inputs are
computed by the float64 reference. ``import cuflash`` imports neither CuPy, torch nor JAX.

Public names
------------
attention, attention_backward, flash_attn_func   the API (any array type)
merge_attention                                  combine results over disjoint key sets
reference                                        NumPy float64 oracle
precompile                                       warm the kernel cache ahead of time
torch, jax                                       framework entry points (import cuflash.torch / cuflash.jax)
"""

import logging as _logging
import os as _os

__version__ = "0.1.0"

from . import reference
from ._api import attention, attention_backward, flash_attn_func, merge_attention
from ._precompile import precompile

__all__ = ["attention", "attention_backward", "flash_attn_func", "merge_attention", "reference", "precompile", "__version__"]

# One line on stderr for each cold compile (a first call can take seconds); CUFLASH_QUIET=1 silences it.
_logger = _logging.getLogger("cuflash")
if not _logger.handlers and not _os.environ.get("CUFLASH_QUIET"):
    _h = _logging.StreamHandler()
    _h.setLevel(_logging.INFO)
    _h.setFormatter(_logging.Formatter("%(message)s"))
    _logger.addHandler(_h)
    if _logger.level == _logging.NOTSET:
        _logger.setLevel(_logging.INFO)
