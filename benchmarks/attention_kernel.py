"""The CPU attention kernel alone (`kernels.attention`) on the shapes of Gemma 3 270M and SmolLM2.

    python benchmarks/attention_kernel.py --json docs/results/attention_kernel.json

Median of 7 batches of 20 calls per case (ms): decode steps (1 query token), verifications of
4 drafts (5 tokens) and a 64-token prefill chunk, over a cache of S slots (Gemma 3's sliding
layers: a ring of 768 slots, 512 visible). To compare two versions, run this file with each on
PYTHONPATH, alternating (two builds of the extension cannot share a process).
`--kv-dtypes float32 bfloat16` times each case over both cache types, alternating (keys get a
`_float32` / `_bfloat16` suffix).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from draft_step import report  # the same printer as the draft-step benchmark (this folder)

from aheadlm.kernels import cpu_kernels, kernel_build

# name: query heads, KV heads, head dim, query tokens, slots, window
CASES = {
    "gemma3_sliding_decode": (4, 1, 256, 1, 768, 512),
    "gemma3_sliding_verify5": (4, 1, 256, 5, 768, 512),
    "gemma3_global_decode_1k": (4, 1, 256, 1, 1024, 0),
    "gemma3_global_decode_4k": (4, 1, 256, 1, 4096, 0),
    "gemma3_global_verify5_4k": (4, 1, 256, 5, 4096, 0),
    "smollm2_decode_1k": (9, 3, 64, 1, 1024, 0),
    "smollm2_decode_4k": (9, 3, 64, 1, 4096, 0),
    "smollm2_verify5_4k": (9, 3, 64, 5, 4096, 0),
    "smollm2_prefill64_1536": (9, 3, 64, 64, 1536, 0),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    kinds = a.kv_dtypes or [None]
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("this machine has no compiled CPU kernels")
    g = torch.Generator().manual_seed(0)
    result = {"kernels": kernel_build(), "threads": torch.get_num_threads()}
    for name, (hq, hkv, d, t, s, window) in CASES.items():
        q = torch.randn(1, hq, t, d, generator=g)
        k, v = torch.randn(1, hkv, s, d, generator=g), torch.randn(1, hkv, s, d, generator=g)
        kpos = torch.arange(s)[None] + (1000 if window else 0)  # a ring that has wrapped
        qpos = kpos[:, -t:].clone()
        times = {kind: [] for kind in kinds}
        for i in range(7):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                kk, vv = (k, v) if kind is None else (k.to(getattr(torch, kind)), v.to(getattr(torch, kind)))
                kernels.attention(q, kk, vv, kpos, qpos, 0.06, window, False)
                start = time.perf_counter()
                for _ in range(20):
                    kernels.attention(q, kk, vv, kpos, qpos, 0.06, window, False)
                times[kind].append((time.perf_counter() - start) / 20 * 1e3)
        for kind in kinds:
            result[f"{name}_ms" + ("" if kind is None else f"_{kind}")] = statistics.median(times[kind])
    report(result, a.json, digits=4)


if __name__ == "__main__":
    main()
