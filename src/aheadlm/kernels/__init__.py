"""Optional compiled CPU kernels (AVX2/FMA), built once on first use with the local compiler.

Everything works without them (dense torch matmuls); they make small-batch decoding several times
faster on CPUs where the BLAS handles skinny products poorly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: builds are serialized by torch's lock file alone
    fcntl = None

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


@contextlib.contextmanager
def build_lock(build: Path):
    """Hold the build folder for one process. torch's own lock (`<build>/lock`, a file that merely
    exists) outlives a process killed mid-build and makes every later start wait forever; our flock
    dies with its holder, so while we hold it any torch `lock` there is stale and is removed."""
    if fcntl is None:
        yield
        return
    with open(build / "aheadlm-build.lock", "a") as f:  # closing it releases the flock
        held = True
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not any(build.glob("*.so")):  # else the holder is only loading them: a short wait
                from ..progress import status

                status("waiting for another aheadlm process to finish compiling the CPU kernels")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some network mounts): torch's lock alone
            held = False
        if held:
            (build / "lock").unlink(missing_ok=True)
        yield


def build_dir() -> Path:
    """The folder this process's kernels are compiled into (one per source, torch and flags)."""
    import torch

    from ..registry import cache_dir

    src = b"".join(p.read_bytes() for p in [_SOURCE, *sorted(_SOURCE.parent.glob("*.h"))])
    flags = " ".join(_build_flags())
    tag = hashlib.sha256(src + torch.__version__.encode() + flags.encode()).hexdigest()[:12]
    return cache_dir() / "kernels" / tag


@functools.cache
def cpu_kernels():
    """The compiled extension module, or None when unavailable (no AVX2, no compiler, disabled)."""
    if os.environ.get("AHEADLM_KERNELS", "1") == "0" or not cpu_supports_avx2():
        return None
    from torch.utils import cpp_extension

    from ..progress import status

    build = build_dir()
    try:
        build.mkdir(parents=True, exist_ok=True)
        with build_lock(build):
            if not any(build.glob("*.so")):
                status("Compiling aheadlm CPU kernels (once, about a minute)")
            return cpp_extension.load(
                name=f"aheadlm_cpu_kernels_{build.name}",
                sources=[str(_SOURCE)],
                extra_include_paths=[str(_SOURCE.parent)],
                build_directory=str(build),
                extra_cflags=list(_build_flags()),
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
