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


def cpu_supports_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


@functools.cache
def cpu_kernels():
    """The compiled extension module, or None when unavailable (no AVX2, no compiler, disabled)."""
    if os.environ.get("AHEADLM_KERNELS", "1") == "0" or not cpu_supports_avx2():
        return None
    import torch
    from torch.utils import cpp_extension

    from ..progress import status
    from ..registry import cache_dir

    src = _SOURCE.read_bytes()
    tag = hashlib.sha256(src + torch.__version__.encode()).hexdigest()[:12]
    build = cache_dir() / "kernels" / tag
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        status("Compiling aheadlm CPU kernels (once, about a minute)")
    try:
        return cpp_extension.load(
            name=f"aheadlm_cpu_kernels_{tag}",
            sources=[str(_SOURCE)],
            build_directory=str(build),
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as e:
        warnings.warn(f"aheadlm CPU kernels unavailable, using dense matmuls ({e})", stacklevel=2)
        return None
