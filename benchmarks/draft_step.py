"""Cost of one MTP draft step (dense vs clustered head) against one target decode step.

    python benchmarks/draft_step.py --model gemma3-270m --drafter runs/gemma3-drafter --json out.json

Builds the cache state of a 200-token context, then times (median of `--reps`) one target forward
of one token, one verification forward of k + 1 tokens, and one drafter step with its clustered head
and with a dense head over the whole vocabulary (the same drafter with its clusters removed).
With several `--drafter` folders, each one's clustered step is timed in the same run (the dense
head only for the first).

The clustered step is timed twice: `draft_step_X_ms` repeats one input, so its candidate rows stay
in the CPU caches; `draft_step_X_varied_ms` feeds a different (token, hidden state) pair,
taken from a varied paragraph, each time, so candidate rows come from memory as in real rounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

import aheadlm
from aheadlm.drafter import load_drafter
from aheadlm.kernels import kernel_build
from aheadlm.kv_cache import KVCache


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def report(result: dict, json_path: str | None, digits: int = 3) -> None:
    """Print a result with rounded floats; write it unrounded to `json_path` when given."""
    print(json.dumps({k: round(v, digits) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)


VARIED = (
    "Rain had fallen on the harbour all night, and by morning the fishing boats stayed tied up while "
    "their crews argued about engines, prices and the new quota rules. Meanwhile a student in Lisbon "
    "was debugging a Python script that parsed JSON logs; the bug turned out to be a timezone offset. "
    "Photosynthesis converts light into chemical energy: chlorophyll absorbs red and blue wavelengths. "
    "In 1969 the Apollo 11 crew landed in the Sea of Tranquility, and 600 million people watched. "
    "To make a quick tomato sauce, soften garlic in olive oil, add crushed tomatoes, salt and basil. "
)


def time_steps(
    target, cache, ids, hidden, drafters: dict, k: int, reps: int, draft_reps: int, inputs: list | None = None
) -> dict:
    """Median ms of one decode step, one verification of k + 1 tokens (both after the cached
    `ids`, rolled back after each run) and one step of each drafter (label -> drafter) at the
    last token, and each draft step as a fraction of a decode step. With `inputs` (a list of
    (token [1], hidden [1, H]) pairs), each clustered drafter is also timed cycling through them."""
    n = len(ids)

    def decode():
        target(torch.tensor([[ids[-1]]]), torch.tensor([[n]]), cache)
        cache.trim(n)

    def verify():
        target(torch.tensor([ids[-k - 1 :]]), torch.arange(n, n + k + 1)[None], cache)
        cache.trim(n)

    h, tok = hidden[:, -2], torch.tensor([ids[-1]])

    def step(d, pairs=((tok, h),)):
        ctx = d.round_context(target, cache, torch.tensor([n - 1]))  # per drafter: its layer types
        turns = itertools.cycle(pairs)

        def run():
            x, hx = next(turns)
            head_in, _ = d.step(target, x, hx, ctx)
            d.scores(target, head_in[0])

        return run

    rows = {"target_decode_ms": median_ms(decode, reps), f"target_verify_{k + 1}_tokens_ms": median_ms(verify, reps)}
    for label, d in drafters.items():
        rows[f"draft_step_{label}_ms"] = median_ms(step(d), draft_reps)
        if inputs and d.centroids is not None:
            rows[f"draft_step_{label}_varied_ms"] = median_ms(step(d, inputs), draft_reps)
    for key in [key for key in rows if key.startswith("draft_step_")]:
        label = key[len("draft_step_") : -len("_ms")]
        rows[f"{label}_vs_decode"] = rows[key] / rows["target_decode_ms"]
    return rows


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--drafter", required=True, nargs="+", help="MTP drafter folders with a clustered head")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    llm = aheadlm.load(a.model, drafter="none")
    t = llm.engine.model
    ids = (llm.tokenizer.encode("The history of the printing press begins with movable type. ") * 30)[:200]
    cache = KVCache(t.config, 512)
    _, hidden = t(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    drafters = {"clustered": load_drafter(a.drafter[0], t.config), "dense": load_drafter(a.drafter[0], t.config)}
    drafters["dense"].centroids = None  # scores then run the target's head over the whole vocabulary
    drafters |= {f"clustered_{i}": load_drafter(p, t.config) for i, p in enumerate(a.drafter[1:], 2)}
    var = llm.tokenizer.encode(VARIED)
    _, var_hidden = t(torch.tensor([var]), torch.arange(len(var))[None], KVCache(t.config, len(var)))
    inputs = [(torch.tensor([var[p]]), var_hidden[:, p - 1]) for p in range(1, len(var))]
    rows = time_steps(t, cache, ids, hidden, drafters, a.k, a.reps, a.reps, inputs)
    setup = {"model": a.model, "drafter": a.drafter, "threads": torch.get_num_threads(), "kernels": kernel_build()}
    report(setup | rows, a.json)


if __name__ == "__main__":
    main()
