"""``cuflash.precompile``: compile kernel variants ahead of time (e.g. while building an image)."""

from __future__ import annotations


def all_variants(arch: str | None = None) -> list[tuple[str, str]]:
    """Every (file, name expression) the dispatcher can pick on GPUs of ``arch`` (e.g. ``"sm_90a"``), over
    all paths; None: on any GPU (the union over architectures)."""
    from . import _config
    from ._launch_bwd import backward_portable_variants
    from ._launch_bwd_sm80 import variants as bwd_sm80_variants
    from ._launch_bwd_sm90 import variants as bwd_sm90_variants
    from ._launch_decode import variants as decode_variants
    from ._launch_sm80 import variants as sm80_variants
    from ._launch_sm90 import variants as sm90_variants

    return (list(_config.portable_forward_variants()) + backward_portable_variants() + sm80_variants(arch)
            + bwd_sm80_variants(arch) + bwd_sm90_variants(arch) + sm90_variants(arch) + decode_variants(arch))


def precompile(archs=None, *, dtypes=None, progress=True, files=None) -> int:
    """Compile every kernel variant each architecture's GPUs can use into the on-disk cache; returns how
    many (architecture, variant) pairs.

    Parameters
    ----------
    archs : sequence of str, optional
        NVRTC targets such as ``("sm_80", "sm_90a")``. Default: the current GPU's, or, with no GPU,
        ``("sm_80", "sm_90a")``. No GPU is needed to compile.
    dtypes : sequence of str, optional
        Restrict to variants whose name mentions these C++ types (e.g. ``("bf16_t",)``).
    progress : bool
        Show a tqdm progress bar.
    files : sequence of str, optional
        Restrict to these kernel files.
    """
    from . import _compile

    if archs is None:
        try:
            import cupy

            archs = (_compile.device_arch(cupy.cuda.runtime.getDevice()),)
        except Exception:
            archs = ("sm_80", "sm_90a")
    jobs = [(a, f, n) for a in archs for f, n in all_variants(a)
            if (not dtypes or any(d in n for d in dtypes)) and (not files or f in files)]
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="cuflash precompile", unit="kernel")
    for arch, f, n in it:
        _compile.compile_cubin(f, (n,), arch)
    return len(jobs)
