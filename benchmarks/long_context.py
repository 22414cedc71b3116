"""Prefill, decode and verification cost against context length, on one model, in one process.

    python benchmarks/long_context.py --model smollm2-135m --json docs/results/long_context_smollm2.json

For each context length: prefill that many tokens of varied text (tokens/s), then the median of
`--reps` decode steps (one token) and verification forwards of 5 and 7 tokens at that length (each
rolled back before the next). Attention reads the whole cache, so at long contexts it is what grows.
To compare two versions of the engine, run this same file with each on PYTHONPATH, alternating.
`--kv-dtypes float32 bfloat16` measures both KV cache types at each length, in alternating order
(keys get a `_float32` / `_bfloat16` suffix).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from draft_step import VARIED, report  # the same printer and text as the draft-step benchmark (this folder)

import aheadlm
from aheadlm.kernels import kernel_build


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--kv-dtypes", nargs="+", default=None, help="KV cache types to compare (default: the model's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    llm = aheadlm.load(a.model, drafter="none")
    kinds = a.kv_dtypes or [None]
    engines = {
        kv: aheadlm.engine.Engine(llm.engine.model, n_ctx=llm.engine.n_ctx, kv_dtype=aheadlm.api.resolve_dtype(kv))
        for kv in kinds
    }
    ids = llm.tokenizer.encode(VARIED * (max(a.contexts) // 40 + 8))
    if len(ids) < max(a.contexts) + 8:
        raise SystemExit("the text is too short for the longest context")
    result = {"model": a.model, "kernels": kernel_build(), "threads": torch.get_num_threads()}
    for i, n in enumerate(a.contexts):
        for kv in kinds if i % 2 == 0 else kinds[::-1]:
            engine, tag = engines[kv], "" if kv is None else f"_{kv}"
            cache = engine.new_cache(n + 8)
            t = time.perf_counter()
            engine.prefill(cache, ids[:n])
            result[f"prefill_{n}_tok_per_s{tag}"] = n / (time.perf_counter() - t)

            def forward(rows: int, n=n, cache=cache, engine=engine):
                engine._forward(cache, ids[n : n + rows], 1 if rows == 1 else None)
                cache.trim(n)

            for rows in (1, 5, 7):
                result[f"ctx_{n}_rows_{rows}_ms{tag}"] = median_ms(lambda rows=rows: forward(rows), a.reps)
            decode = result[f"ctx_{n}_rows_1_ms{tag}"]
            for rows in (5, 7):
                result[f"ctx_{n}_rows_{rows}_vs_decode{tag}"] = result[f"ctx_{n}_rows_{rows}_ms{tag}"] / decode
            verify = result[f"ctx_{n}_rows_5_ms{tag}"]
            print(f"context {n}{tag}: decode {decode:.2f} ms, verify 5 {verify:.2f} ms", flush=True)
    report(result, a.json)


if __name__ == "__main__":
    main()
