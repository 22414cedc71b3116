"""Choosing a trained drafter's confidence threshold on held-out rounds.

A round drafts only while the drafter's confidence stays at or above the threshold (see
`MTPProposer`). Greedy acceptance is a prefix, so cutting a recorded round's draft after n tokens
keeps min(accepted, n) of them: one pass of ungated rounds is enough to model every threshold. The
model counts tokens per round (accepted + 1) against cost in decode steps: 1 for the target's
forward, plus each draft step computed (the one that falls below the threshold included), plus
each extra verified row.
"""

from __future__ import annotations

import torch

from ..engine import Engine, GenerationStats
from ..proposers import MTPProposer, Proposer
from ..sampling import SamplingParams
from ..speculative import SpecConfig

DRAFT_STEP_COST = 0.1
"""One draft step, in decode steps (6-9% for the Gemma 3 and SmolLM2 drafters on CPU)."""
VERIFY_ROW_COST = 0.15
"""One more row in a verification (verifying 5 tokens costs 1.4-1.6 decode steps on CPU)."""
GRID = tuple(i / 20 for i in range(19))  # 0, 0.05, ..., 0.9

Round = tuple[list[float], int]
"""(confidence of each draft, drafts accepted), from a round drafted without a threshold."""


def modeled_speed(rounds: list[Round], threshold: float) -> float:
    """Modeled tokens per decode step's worth of time when drafting stops below `threshold`."""
    tokens = cost = 0.0
    for confs, accepted in rounds:
        n = 0
        while n < len(confs) and confs[n] >= threshold:
            n += 1
        tokens += 1 + min(accepted, n)
        cost += 1 + DRAFT_STEP_COST * min(n + 1, len(confs)) + VERIFY_ROW_COST * n
    return tokens / cost if cost else 1.0


def choose_threshold(rounds: list[Round]) -> float:
    """The grid threshold with the best modeled speed (the lowest one on a tie); 0 with no rounds."""
    if not rounds:
        return 0.0
    return max(GRID, key=lambda t: (modeled_speed(rounds, t), -t))


class _Recorder(Proposer):
    """Passes an MTP proposer through, keeping the confidences of its latest draft."""

    def __init__(self, inner: MTPProposer):
        self.inner, self.name, self.latest = inner, inner.name, []

    def begin(self, prompt):
        self.inner.begin(prompt)

    def propose(self, state, k, params, generator):
        draft = self.inner.propose(state, k, params, generator)
        self.latest = draft.confidences
        return draft

    def after_verify(self, state):
        self.inner.after_verify(state)


@torch.inference_mode()
def record_rounds(
    target,
    drafter,
    prompts: list[list[int]],
    stop_ids=(),
    k: int = 4,
    max_tokens: int = 64,
    params=None,
    stats: list[GenerationStats] | None = None,
) -> list[Round]:
    """Speculative decoding of `prompts` at fixed k with no threshold, one entry per round; greedy
    unless `params` (SamplingParams) say otherwise (the threshold model above assumes greedy).
    `stats`, when given, receives each prompt's GenerationStats."""
    recorder = _Recorder(MTPProposer(drafter, threshold=0.0))
    engine = Engine(target, proposer=recorder, spec=SpecConfig(k))
    rounds = []
    for p in prompts:
        st = GenerationStats()
        if stats is not None:
            stats.append(st)
        for step in engine.generate(p, params or SamplingParams(), max_tokens=max_tokens, stop_ids=stop_ids, stats=st):
            if step.drafted:
                rounds.append((recorder.latest[: step.drafted], step.accepted))
    return rounds
