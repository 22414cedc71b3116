"""The confidence threshold `train-drafter` would choose for an existing drafter folder.

    python benchmarks/calibrate_threshold.py --model gemma3-270m --drafter src/aheadlm/drafters/gemma3-270m

Decodes held-out ShareGPT prompts (the last `--prompts` conversations after train-drafter's seeded
shuffle, which its runs here did not reach) with the drafter at k = 4 and no threshold, and prints
the modeled speed at each threshold of the grid and the one chosen (aheadlm/train/calibrate.py).
Spec-Bench is not used: the threshold must not be tuned on the evaluation prompts.
"""

from __future__ import annotations

import argparse
import json
import random

import aheadlm
from aheadlm.drafter import load_drafter
from aheadlm.train.calibrate import GRID, choose_threshold, modeled_speed, record_rounds
from aheadlm.train.data import build_prompts, load_conversations


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0, help="train-drafter's --seed (its shuffle)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    llm = aheadlm.load(a.model, drafter="none")
    target = llm.engine.model
    items = load_conversations(None)
    random.Random(a.seed).shuffle(items)
    prompts = build_prompts(llm.tokenizer, items[-a.prompts :], max_prompt_tokens=256, seed=a.seed)
    drafter = load_drafter(a.drafter, target.config)
    rounds = record_rounds(target, drafter, prompts, llm.tokenizer.stop_ids, max_tokens=a.max_tokens)
    result = {
        "model": a.model,
        "drafter": a.drafter,
        "prompts": len(prompts),
        "rounds": len(rounds),
        "modeled_speed": {f"{t:g}": round(modeled_speed(rounds, t), 4) for t in GRID},
        "chosen": choose_threshold(rounds),
        "configured": drafter.config.draft_threshold,
    }
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
