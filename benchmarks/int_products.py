"""Integer against float32 products (`aheadlm.packed.int_products`) on one model, in one process.

    python benchmarks/int_products.py --model gemma3-270m --json docs/results/int_products_gemma3.json

Loads the model twice, once with AHEADLM_INT_PRODUCTS=0 (every product in float32) and once with
the integer products, builds the cache of a 200-token context in each, and times (median of
`--reps`, the two forms alternating rep by rep) one decode step and one verification forward of
2..8 tokens. Also reports how far the integer form's logits move from the float32 ones over that
context (largest difference over the largest logit), whether the next-token argmax agrees, and,
for 8 fixed prompts, where the two forms' greedy continuations of `--tokens` tokens first differ
(the length when they never do).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch
from draft_step import report  # the same printer as the draft-step benchmark (this folder)

import aheadlm
from aheadlm.kernels import kernel_build
from aheadlm.kv_cache import KVCache
from aheadlm.packed import int_products

PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(arr):\n",
    "Question: What is the capital of France?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about photosynthesis are",
    "Rain had fallen on the harbour all night, and by morning the fishing boats",
    "Write a story about a dragon.",
    "import numpy as np\n",
]


def load(name: str, integer: bool):
    with mock.patch.dict(os.environ, {"AHEADLM_INT_PRODUCTS": "1" if integer else "0"}):
        return aheadlm.load(name, drafter="none")


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not int_products():
        raise SystemExit("this build has no integer products (they need AVX-512 VNNI)")
    forms = {"float32": load(a.model, False), "integer": load(a.model, True)}
    ids = (forms["float32"].tokenizer.encode("The history of the printing press begins with movable type. ") * 30)[:200]
    n = len(ids)
    state, logits = {}, {}
    for label, llm in forms.items():
        model = llm.engine.model
        cache = KVCache(model.config, 512)
        out, _ = model(torch.tensor([ids]), torch.arange(n)[None], cache)
        state[label], logits[label] = (model, cache), out[0]

    def forward(label: str, rows: int):
        model, cache = state[label]
        model(torch.tensor([ids[-rows:]]), torch.arange(n, n + rows)[None], cache)
        cache.trim(n)

    times = {(label, rows): [] for label in forms for rows in range(1, 9)}
    for rows in range(1, 9):
        for label in forms:
            forward(label, rows)  # warm
        for _ in range(a.reps):
            for label in forms:
                t = time.perf_counter()
                forward(label, rows)
                times[label, rows].append(time.perf_counter() - t)
    result = {"model": a.model, "threads": torch.get_num_threads(), "kernels": kernel_build(), "context": n}
    for label in forms:
        decode = statistics.median(times[label, 1])
        for rows in range(1, 9):
            ms = 1000 * statistics.median(times[label, rows])
            result[f"{label}_{rows}_rows_ms"] = ms
            if rows > 1:
                result[f"{label}_{rows}_rows_vs_decode"] = ms / (1000 * decode)
    for rows in range(1, 9):
        result[f"integer_vs_float32_{rows}_rows"] = (
            result[f"integer_{rows}_rows_ms"] / result[f"float32_{rows}_rows_ms"]
        )
    diff = (logits["integer"] - logits["float32"]).abs().amax(-1) / logits["float32"].abs().amax(-1)
    result["logit_difference_max"] = diff.max().item()
    result["logit_difference_median"] = diff.median().item()
    result["argmax_agreement"] = (logits["integer"].argmax(-1) == logits["float32"].argmax(-1)).float().mean().item()
    first_difference = []
    for prompt in PROMPTS:
        pids = forms["float32"].tokenizer.encode(prompt)
        a_ids, b_ids = (llm.generate(pids, max_tokens=a.tokens, ignore_eos=True).token_ids for llm in forms.values())
        pairs = zip(a_ids, b_ids, strict=False)
        first_difference.append(next((j for j, (x, y) in enumerate(pairs) if x != y), min(len(a_ids), len(b_ids))))
    result["greedy_first_difference"] = first_difference
    result["greedy_identical"] = f"{sum(d == a.tokens for d in first_difference)} of {len(PROMPTS)}"
    report(result, a.json, digits=4)


if __name__ == "__main__":
    main()
