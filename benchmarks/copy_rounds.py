"""Where an MTP drafter's drafts are lost: each round of greedy speculative decoding with the
drafter alone, set beside what n-gram lookup would have drafted from the same state.

    python benchmarks/copy_rounds.py --model gemma3-270m --drafter mtp --limit 2 --json out.json

Greedy output is the target's own, so every round's correct continuation is known once a prompt is
decoded, and both drafts are scored against it as the verifier would score them (the accepted
prefix). Rounds are split by whether lookup finds a match and whether its draft is right; the
rounds where lookup is right (the target copying earlier text) are split again by how far back the
copied text is and by context length. A drafter that copies as well as lookup would accept as much
as lookup in those rounds.
"""

from __future__ import annotations

import argparse
import collections
import json

import aheadlm
from aheadlm.bench import read_prompts
from aheadlm.proposers import NgramProposer


def accepted(draft: list[int], truth: list[int]) -> int:
    """The verifier's accepted count: the length of the draft's prefix that matches the target."""
    n = 0
    for a, b in zip(draft, truth, strict=False):  # truth may end first
        if a != b:
            break
        n += 1
    return n


def bucket(value: int, edges: tuple[int, ...], name: str) -> str:
    for e in edges:
        if value <= e:
            return f"{name}<={e}"
    return f"{name}>{edges[-1]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--drafter", default="mtp", help="an MTP drafter folder, or mtp for the shipped one")
    ap.add_argument("--prompts-file", default="../shared/prompts/spec_bench_dev.jsonl")
    ap.add_argument("--limit", type=int, default=2, help="prompts per category")
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    llm = aheadlm.load(a.model, drafter=a.drafter, draft_tokens=a.k, threshold=0.0)
    proposer, lookup = llm.engine.proposer, NgramProposer()
    propose = proposer.propose
    rounds: list[tuple[int, list[int], list[int], int | None]] = []

    def recording(state, k, params, generator):
        draft = propose(state, k, params, generator)
        lookup.begin(state.tokens)
        copy = lookup.propose(state, k, params, generator).tokens
        found = lookup.match(state.tokens)
        distance = None if found is None else len(state.tokens) - 1 - found[0]  # how far back the copy is
        rounds.append((len(state.tokens), draft.tokens, copy, distance))
        return draft

    proposer.propose = recording  # an instance attribute: this engine only
    splits = collections.defaultdict(lambda: [0, 0, 0])  # rounds, drafter accepted, lookup accepted
    for p in read_prompts(a.prompts_file, None, a.limit, a.skip):
        rounds.clear()
        out = llm.chat([{"role": "user", "content": p.text}], max_tokens=a.max_tokens)
        if not rounds:
            continue
        start = rounds[0][0] - 1  # the first round's state holds the prompt and one output token
        for length, draft, copy, dist in rounds:
            truth = out.token_ids[length - start :]
            m, c = accepted(draft, truth), accepted(copy, truth)
            keys = ["all", f"category {p.category}"]
            if c:
                keys.append("lookup right")
                keys += [bucket(dist, (32, 128, 512), "copied from"), bucket(length, (384, 768), "context")]
            else:
                keys.append("lookup wrong" if copy else "lookup no match")
            for key in keys:
                s = splits[key]
                s[0], s[1], s[2] = s[0] + 1, s[1] + m, s[2] + c
    result = {"model": a.model, "drafter": a.drafter, "k": a.k, "max_tokens": a.max_tokens, "splits": {}}
    for key in sorted(splits, key=lambda x: (x.startswith("category"), x)):
        n, m, c = splits[key]
        result["splits"][key] = {"rounds": n, "drafter_accepted": m / n, "lookup_accepted": c / n}
        print(f"{key:28s} rounds {n:5d}  drafter accepts {m / n:.2f}  lookup accepts {c / n:.2f} per round")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
