"""Time to first token across the turns of a chat, with and without the prompt cache, in one process.

    python benchmarks/chat_turns.py --model smollm2-135m --json docs/results/chat_turns_smollm2.json

A conversation about a document (`--context-tokens` of varied text in the first message) runs for
`--turns` turns through two `LLM`s sharing one engine: one keeps its KV cache between requests
(the default), one keeps nothing. Each turn asks both the same messages (the order alternating
turn by turn) and records the prompt's length, the tokens reused, the prefill seconds and whether
the answers are identical; the conversation goes on with the answer.
"""

from __future__ import annotations

import argparse
import time

from draft_step import VARIED, report  # the same printer and text as the draft-step benchmark (this folder)

import aheadlm
from aheadlm.engine import GenerationStats
from aheadlm.kernels import kernel_build

QUESTIONS = [
    "Summarise the text above in two sentences.",
    "Which topics does it mention?",
    "What does it say about the harbour?",
    "Write a title for it.",
    "List three facts from it.",
    "What would you add to it?",
    "Rewrite its first sentence more simply.",
    "Is anything in it surprising?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--context-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    kept = aheadlm.load(a.model)
    fresh = aheadlm.LLM(kept.engine, kept.tokenizer, kept.name, prompt_cache=False)
    doc_ids = kept.tokenizer.encode(VARIED * (a.context_tokens // 40 + 2))[: a.context_tokens]
    document = kept.tokenizer.decode(doc_ids)
    messages = []
    result = {"model": a.model, "kernels": kernel_build(), "context_tokens": a.context_tokens, "turns": []}
    totals = {"kept": 0.0, "fresh": 0.0}
    for turn in range(a.turns):
        question = QUESTIONS[turn % len(QUESTIONS)]
        messages.append({"role": "user", "content": (document + "\n\n" + question) if turn == 0 else question})
        runs = {}
        for name in ("kept", "fresh") if turn % 2 == 0 else ("fresh", "kept"):
            llm = kept if name == "kept" else fresh
            stats = GenerationStats()
            t = time.perf_counter()
            out = llm.chat(messages, max_tokens=a.max_tokens, stats=stats)
            runs[name] = (out, stats, time.perf_counter() - t)
            totals[name] += stats.prefill_s
        (out, st, _), (ref, st_fresh, _) = runs["kept"], runs["fresh"]
        row = {
            "prompt_tokens": st.prompt_tokens,
            "cached_tokens": st.cached_tokens,
            "prefill_s_kept": st.prefill_s,
            "prefill_s_fresh": st_fresh.prefill_s,
            "identical": out.token_ids == ref.token_ids,
        }
        result["turns"].append(row)
        print(
            f"turn {turn + 1}: prompt {row['prompt_tokens']}, reused {row['cached_tokens']}, prefill "
            f"{row['prefill_s_kept']:.3f} s against {row['prefill_s_fresh']:.3f} s, identical {row['identical']}",
            flush=True,
        )
        messages.append({"role": "assistant", "content": out.text})
    result["prefill_s_total_kept"] = totals["kept"]
    result["prefill_s_total_fresh"] = totals["fresh"]
    result["all_identical"] = all(t["identical"] for t in result["turns"])
    report(result, a.json)


if __name__ == "__main__":
    main()
