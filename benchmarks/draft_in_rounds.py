"""Cost of a draft step inside real speculative rounds, against a plain decode step.

    python benchmarks/draft_in_rounds.py --model gemma3-270m --drafter src/aheadlm/drafters/gemma3-270m --json out.json

`draft_step.py` times the drafter in isolation; in real rounds each verification streams the
target's weights through the CPU caches first, so the drafter's first step of a round starts cold.
This script decodes the first prompt of each Spec-Bench category (up to `--prompts` of them) with
the drafter alone at fixed k and no threshold, and times, per round, the proposer's whole work
(`propose_ms`, divided by k for `per_draft_ms`), the drafter's first and later steps, and the
scoring of candidates plus the choice of a token (`choose_ms`). The same prompts are decoded plainly
in the same run for `decode_ms`, the median seconds per plain decode step.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import aheadlm
from aheadlm import drafter as drafter_module
from aheadlm import proposers
from aheadlm.bench import read_prompts
from aheadlm.engine import GenerationStats
from aheadlm.kernels import kernel_build


def timed(fn, times: list, key):
    """Wraps fn so each call's seconds go to times[key()]."""

    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times[key()].append(time.perf_counter() - t)
        return out

    return wrapper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--drafter", required=True, help="an MTP drafter folder")
    ap.add_argument("--prompts-file", default="../shared/prompts/spec_bench_dev.jsonl")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    plain = aheadlm.load(a.model, drafter="none")
    spec = aheadlm.load(a.model, drafter=a.drafter, draft_tokens=a.k, threshold=0.0)
    prompts = read_prompts(a.prompts_file, None, 1)[: a.prompts]
    for llm in (plain, spec):  # warm-up
        llm.chat([{"role": "user", "content": "Hello"}], max_tokens=8)

    times = collections.defaultdict(list)
    steps_in_round = [0]

    def step_key():
        steps_in_round[0] += 1
        return "step_first" if steps_in_round[0] == 1 else "step_later"

    def propose_key():
        steps_in_round[0] = 0
        return "propose"

    originals = (drafter_module.MTPDrafter.step, proposers.choose_draft, proposers.MTPProposer.propose)
    decode = []
    try:
        drafter_module.MTPDrafter.step = timed(originals[0], times, step_key)
        proposers.choose_draft = timed(originals[1], times, lambda: "choose")
        # The round counter resets when propose returns, before the next round's first step.
        proposers.MTPProposer.propose = timed(originals[2], times, propose_key)
        for p in prompts:
            msgs = [{"role": "user", "content": p.text}]
            stats = GenerationStats()
            out = plain.chat(msgs, max_tokens=a.max_tokens, stats=stats)
            decode.append(stats.decode_s / max(1, len(out.token_ids) - 1))
            spec.chat(msgs, max_tokens=a.max_tokens)
    finally:
        drafter_module.MTPDrafter.step, proposers.choose_draft, proposers.MTPProposer.propose = originals

    decode_ms = 1000 * statistics.median(decode)
    result = {"model": a.model, "drafter": a.drafter, "k": a.k, "prompts": len(prompts), "kernels": kernel_build()}
    result["decode_ms"] = decode_ms
    for key, v in sorted(times.items()):
        result[f"{key}_ms"] = 1000 * statistics.mean(v)
    result["per_draft_ms"] = result["propose_ms"] / a.k
    result["per_draft_share_of_decode"] = result["per_draft_ms"] / decode_ms
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
