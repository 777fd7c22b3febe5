"""GPU tests are marked ``gpu`` and skipped cleanly where no CUDA GPU (or no CuPy) is present."""

import os

import pytest

# JAX must not grab most of the GPU's memory when it shares the device with torch and CuPy.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (or CuPy) on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
