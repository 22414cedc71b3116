"""Cost of one MTP draft step (dense vs clustered head) against one target decode step.

    python benchmarks/draft_step.py --model gemma3-270m --drafter runs/gemma3-drafter --json out.json

Builds the cache state of a 200-token context, then times (median of `--reps`) one target forward
of one token, one verification forward of k + 1 tokens, and one drafter step with its clustered head
and with a dense head over the whole vocabulary (the same drafter with its clusters removed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import aheadlm
from aheadlm.drafter import load_drafter
from aheadlm.kv_cache import KVCache


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--drafter", required=True, help="an MTP drafter folder with a clustered head")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    llm = aheadlm.load(a.model, drafter="none")
    t = llm.engine.model
    ids = (llm.tokenizer.encode("The history of the printing press begins with movable type. ") * 30)[:200]
    cache = KVCache(t.config, 512)
    _, hidden = t(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    n = len(ids)

    def decode():
        t(torch.tensor([[ids[-1]]]), torch.tensor([[n]]), cache)
        cache.trim(n)

    def verify():
        t(torch.tensor([ids[-a.k - 1 :]]), torch.arange(n, n + a.k + 1)[None], cache)
        cache.trim(n)

    clustered = load_drafter(a.drafter, t.config)
    dense = load_drafter(a.drafter, t.config)
    dense.centroids = None  # scores then run the target's head over the whole vocabulary
    ctx = clustered.round_context(t, cache, torch.tensor([n - 1]))
    h = hidden[:, -2]
    tok = torch.tensor([ids[-1]])

    def step(d):
        def run():
            head_in, _ = d.step(t, tok, h, ctx)
            d.scores(t, head_in[0])

        return run

    rows = {
        "target_decode_ms": median_ms(decode, a.reps),
        f"target_verify_{a.k + 1}_tokens_ms": median_ms(verify, a.reps),
        "draft_step_clustered_ms": median_ms(step(clustered), a.reps),
        "draft_step_dense_ms": median_ms(step(dense), a.reps),
    }
    rows["clustered_vs_decode"] = rows["draft_step_clustered_ms"] / rows["target_decode_ms"]
    rows["dense_vs_decode"] = rows["draft_step_dense_ms"] / rows["target_decode_ms"]
    out = {"model": a.model, "drafter": a.drafter, "threads": torch.get_num_threads(), **rows}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
