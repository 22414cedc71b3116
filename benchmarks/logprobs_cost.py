"""What asking for log-probabilities costs: tokens/s of the same greedy requests with and without
`logprobs`, alternating request by request in one process, and whether outputs stay identical.

    python benchmarks/logprobs_cost.py --model gemma3-270m --json docs/results/logprobs_cost_gemma3.json

Each token's log-probability is read from logits the engine computes anyway (the verify forward),
so the cost is a log-softmax over the vocabulary and a top-k per emitted token; Gemma 3's 262k
vocabulary makes it the dearest case.
"""

from __future__ import annotations

import argparse

from draft_step import report  # the same printer as the draft-step benchmark (this folder)

import aheadlm
from aheadlm.engine import GenerationStats
from aheadlm.kernels import kernel_build

PROMPTS = [
    "The history of the printing press begins",
    "def merge_sort(items):\n    ",
    "Three tips for a first marathon:",
    "Photosynthesis is the process by which",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=5, help="alternatives per token")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    loaded = aheadlm.load(a.model)
    llm = aheadlm.LLM(loaded.engine, loaded.tokenizer, loaded.name, prompt_cache=False)
    seconds = {"none": 0.0, "logprobs": 0.0}
    tokens = {"none": 0, "logprobs": 0}
    identical = True
    for r in range(a.rounds):
        for i, prompt in enumerate(PROMPTS):
            order = ("none", "logprobs") if (r + i) % 2 == 0 else ("logprobs", "none")
            outs = {}
            for name in order:
                stats = GenerationStats()
                outs[name] = llm.generate(
                    prompt, max_tokens=a.max_tokens, stats=stats, logprobs=a.top if name == "logprobs" else None
                )
                seconds[name] += stats.decode_s
                tokens[name] += stats.completion_tokens
            identical &= outs["none"].token_ids == outs["logprobs"].token_ids
    tps = {k: tokens[k] / seconds[k] for k in seconds}
    report(
        {
            "model": a.model,
            "kernels": kernel_build(),
            "max_tokens": a.max_tokens,
            "top": a.top,
            "requests_each": a.rounds * len(PROMPTS),
            "tokens_per_s_none": tps["none"],
            "tokens_per_s_logprobs": tps["logprobs"],
            "ratio": tps["logprobs"] / tps["none"],
            "identical": identical,
        },
        a.json,
    )


if __name__ == "__main__":
    main()
