"""Cost of a draft step inside real speculative rounds, against a plain decode step.

    python benchmarks/draft_in_rounds.py --model gemma3-270m --drafter src/aheadlm/drafters/gemma3-270m --json out.json

`draft_step.py` times the drafter in isolation; in real rounds each verification streams the
target's weights through the CPU caches first, so the drafter's first step of a round starts cold.
This script decodes the first prompt of each Spec-Bench category (up to `--prompts` of them) with
the drafter alone at fixed k and no threshold, and times, per round, the proposer's whole work
(`propose_ms`, divided by k for `per_draft_ms`), the drafter's first and later steps, and the
choice of a token from the candidates' scores (`choose_ms`). A compiled draft step
(`fused.compile_drafter`, the default where the kernels run) scores the candidates inside the
step; the per-op path (`--per-op`, which also turns off the target's compiled layers) scores them
between the two, so only `per_draft_ms` compares across paths. The same prompts are decoded plainly
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
from aheadlm import fused, proposers
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
    ap.add_argument("--per-op", action="store_true", help="no compiled layers or draft step")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    plain = aheadlm.load(a.model, drafter="none")
    spec = aheadlm.load(a.model, drafter=a.drafter, draft_tokens=a.k, threshold=0.0)
    if a.per_op:
        for llm in (plain, spec):
            for layer in llm.engine.model.layers:
                layer.compiled = None
        for layer in spec.engine.proposer.drafter.layers:
            layer.compiled = None
    prompts = read_prompts(a.prompts_file, None, 1)[: a.prompts]

    times = collections.defaultdict(list)
    steps_in_round = [0]

    def step_key():
        steps_in_round[0] += 1
        return "step_first" if steps_in_round[0] == 1 else "step_later"

    def propose_key():
        steps_in_round[0] = 0
        return "propose"

    class TimedStep:  # the compiled draft step, timed like MTPDrafter.step
        def __init__(self, compiled):
            self.step = timed(compiled.step, times, step_key)

    def compile_drafter(drafter, target):
        compiled = originals[3](drafter, target)
        return None if compiled is None or a.per_op else TimedStep(compiled)

    originals = (
        drafter_module.MTPDrafter.step,
        proposers.choose_candidate,
        proposers.MTPProposer.propose,
        fused.compile_drafter,
    )
    decode = []
    try:
        drafter_module.MTPDrafter.step = timed(originals[0], times, step_key)
        proposers.choose_candidate = timed(originals[1], times, lambda: "choose")
        # The round counter resets when propose returns, before the next round's first step.
        proposers.MTPProposer.propose = timed(originals[2], times, propose_key)
        fused.compile_drafter = compile_drafter
        for llm in (plain, spec):  # warm-up (the proposer builds its compiled step here)
            llm.chat([{"role": "user", "content": "Hello"}], max_tokens=8)
        times.clear()
        for p in prompts:
            msgs = [{"role": "user", "content": p.text}]
            stats = GenerationStats()
            out = plain.chat(msgs, max_tokens=a.max_tokens, stats=stats)
            decode.append(stats.decode_s / max(1, len(out.token_ids) - 1))
            spec.chat(msgs, max_tokens=a.max_tokens)
    finally:
        drafter_module.MTPDrafter.step, proposers.choose_candidate = originals[:2]
        proposers.MTPProposer.propose, fused.compile_drafter = originals[2:]

    decode_ms = 1000 * statistics.median(decode)
    result = {"model": a.model, "drafter": a.drafter, "k": a.k, "prompts": len(prompts), "kernels": kernel_build()}
    result["path"] = "per-op" if a.per_op else "compiled"
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
