"""Clustered draft head: scoring candidate rows of the int8 head in place against copying them out
with `index_select` first (the method before 2026-11-30), on the real Gemma 3 270M head.

    python benchmarks/head_rows.py --candidates 4096 --rounds 5

Prints the median ms of each method per round (rounds alternate the two); the scores must be
bit-identical.
"""

from __future__ import annotations

import argparse

import torch
from draft_step import median_ms  # the same timer as the draft-step benchmark (this folder)

import aheadlm


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--candidates", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    table = aheadlm.load(a.model, drafter="none").engine.model.embed.table
    if not table.block:
        raise SystemExit("the model's head is not int8-packed on this machine")
    ids = torch.randperm(table.out_features, generator=torch.Generator().manual_seed(0))[: a.candidates]
    x = torch.randn(table.in_features)

    def gathered():
        rows = lambda t: t.index_select(0, ids)  # noqa: E731
        off = rows(table.offset) if table.offset.numel() else table.offset
        gathered = table.kernels.Linear(rows(table.q), rows(table.scale), off, table.block, table.bits, table.zero)
        return gathered(x[None])[0]

    def in_place():
        return table.rows_linear(x, ids)

    assert torch.equal(gathered(), in_place())
    times = {"index_select_then_product": [], "in_place": []}
    for _ in range(a.rounds):
        times["index_select_then_product"].append(median_ms(gathered, a.reps))
        times["in_place"].append(median_ms(in_place, a.reps))
    print({k: [round(v, 3) for v in vs] for k, vs in times.items()})


if __name__ == "__main__":
    main()
