"""Optional compiled CPU kernels (AVX2/FMA), built once on first use with the local compiler.

Everything works without them (dense torch matmuls); they make small-batch decoding several times
faster on CPUs where the BLAS handles skinny products poorly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_supports_avx2() -> bool:
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


@functools.cache
def _build_flags() -> tuple[str, ...]:
    """Compiler flags of this process's kernels: 512-bit matrix products where the CPU has
    AVX-512F (AHEADLM_AVX512=0 turns them off), else AVX2."""
    flags = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp")
    if os.environ.get("AHEADLM_AVX512", "1") != "0" and "avx512f" in _cpu_flags():
        flags += ("-mavx512f",)
        if {"avx512bw", "avx512_vnni"} <= _cpu_flags():
            flags += ("-mavx512bw", "-mavx512vnni")
    return flags


@functools.cache
def cpu_kernels():
    """The compiled extension module, or None when unavailable (no AVX2, no compiler, disabled)."""
    if os.environ.get("AHEADLM_KERNELS", "1") == "0" or not cpu_supports_avx2():
        return None
    import torch
    from torch.utils import cpp_extension

    from ..progress import status
    from ..registry import cache_dir

    src = b"".join(p.read_bytes() for p in [_SOURCE, *sorted(_SOURCE.parent.glob("*.h"))])
    flags = list(_build_flags())
    tag = hashlib.sha256(src + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()[:12]
    build = cache_dir() / "kernels" / tag
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        status("Compiling aheadlm CPU kernels (once, about a minute)")
    try:
        return cpp_extension.load(
            name=f"aheadlm_cpu_kernels_{tag}",
            sources=[str(_SOURCE)],
            extra_include_paths=[str(_SOURCE.parent)],
            build_directory=str(build),
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as e:
        warnings.warn(f"aheadlm CPU kernels unavailable, using dense matmuls ({e})", stacklevel=2)
        return None


def kernel_build() -> str:
    """Which matrix kernels this process runs: "avx512", "avx2", or "none" (dense torch matmuls).
    Recorded with benchmark results, since speeds differ between the builds."""
    if cpu_kernels() is None:
        return "none"
    return "avx512" if "-mavx512f" in _build_flags() else "avx2"
