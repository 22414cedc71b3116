"""What JSON mode costs: the same prompts decoded with the model's default speculative decoding,
free and in JSON mode, alternating, in one process; and how much of JSON mode's time goes to the
masks (timed around `JsonGuide.mask`, and apart from it the first computation of each state's
mask, which later requests on the same vocabulary do not pay).

    python benchmarks/json_mode.py --model gemma3-270m --json docs/results/json_mode_gemma3.json

The two modes write different text, so their tokens/s differ by acceptance as well as by the
masks; the mask share is the constraint's own cost. The table of token bytes is built once per
vocabulary (timed), and each recogniser state's mask once (counted).
"""

from __future__ import annotations

import argparse
import json
import time

from draft_step import report  # the same printer as the draft-step benchmark (this folder)

import aheadlm
from aheadlm import guided
from aheadlm.engine import GenerationStats
from aheadlm.kernels import kernel_build

PROMPTS = [
    "A JSON object describing a city, with name, country and population:",
    "The user's profile as JSON (name, email, interests):",
    "An inventory record in JSON with item, quantity, price and tags:",
    "Three tips for a first marathon, as a JSON object:",
]


def timed(fn, total: list[float]):
    """`fn`, adding the seconds each call takes to total[0]."""

    def wrapper(*args):
        start = time.perf_counter()
        out = fn(*args)
        total[0] += time.perf_counter() - start
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    loaded = aheadlm.load(a.model)
    llm = aheadlm.LLM(loaded.engine, loaded.tokenizer, loaded.name, prompt_cache=False)
    t = time.perf_counter()
    llm.json_guide()
    table_s = time.perf_counter() - t

    masking, computing = [0.0], [0.0]
    guided.JsonGuide.mask = timed(guided.JsonGuide.mask, masking)
    guided.GuideTable._compute = timed(guided.GuideTable._compute, computing)
    seconds, tokens, valid, accepted, rounds = {}, {}, 0, {}, {}
    for r in range(a.rounds):
        for i, prompt in enumerate(PROMPTS):
            for mode in (False, True) if (r + i) % 2 == 0 else (True, False):
                st = GenerationStats()
                out = llm.generate(prompt, max_tokens=a.max_tokens, json_mode=mode, stats=st)
                key = "json" if mode else "free"
                seconds[key] = seconds.get(key, 0.0) + st.prefill_s + st.decode_s
                tokens[key] = tokens.get(key, 0) + len(out.token_ids)
                accepted[key] = accepted.get(key, 0) + st.accepted + st.target_forwards
                rounds[key] = rounds.get(key, 0) + st.target_forwards
                if mode and out.finish_reason == "stop":
                    json.loads(out.text)  # raises if JSON mode let invalid text through
                    valid += 1
    result = {"model": a.model, "kernels": kernel_build(), "table_build_s": table_s}
    for key in ("free", "json"):
        result[f"{key}_tok_per_s"] = tokens[key] / seconds[key]
        result[f"{key}_tokens"] = tokens[key]
        result[f"{key}_tokens_per_forward"] = accepted[key] / max(rounds[key], 1)
    result["json_over_free_tok_per_s"] = result["json_tok_per_s"] / result["free_tok_per_s"]
    result["mask_share_of_json_time"] = masking[0] / seconds["json"]
    result["new_state_masks_s"] = computing[0]  # inside the masking time, once per state and vocabulary
    result["cached_mask_share_of_json_time"] = (masking[0] - computing[0]) / seconds["json"]
    result["json_finished_and_parsed"] = valid
    result["json_runs"] = a.rounds * len(PROMPTS)
    result["mask_states_cached"] = len(llm._guide_table.masks)
    report(result, a.json)


if __name__ == "__main__":
    main()
