"""Progress display on stderr for slow steps (first GGUF load, training, benchmarks)."""

from __future__ import annotations

import os
import sys


def enabled() -> bool:
    return os.environ.get("AHEADLM_QUIET") != "1"


def status(message: str) -> None:
    if enabled():
        print(message, file=sys.stderr, flush=True)


def progress(iterable, total=None, desc=None, show: bool = True, **kwargs):
    """tqdm that appears only when the step lasts over a second and is silenced by AHEADLM_QUIET=1
    (or `show=False`, e.g. on all but the first of several training processes)."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        delay=1.0,
        disable=not (show and enabled()),
        file=sys.stderr,
        dynamic_ncols=True,
        **kwargs,
    )
