"""Verification of drafted tokens: pure functions, no model calls.

Terms (as in vLLM's rejection sampler):
- drafts `d_1..d_k`: tokens proposed by a proposer for the positions after the last token;
- accepted: the longest prefix of drafts the target agrees with (greedy: each equals the target's
  argmax; sampling: each passes the rejection test `u < p(d) / q(d)`);
- bonus: the one token the target always contributes. After a rejection at position i it is drawn
  from the residual `norm(max(0, p_i - q_i))` (the correction); after full acceptance it is a plain
  sample from `p_{k+1}`.
A round emits `accepted + 1` tokens for one target forward over `[last token, d_1..d_k]`, and the
emitted tokens are distributed exactly as plain decoding from the target would produce them.
"""

from __future__ import annotations

import torch

from .sampling import sample_one


def verify_greedy(target_logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """target_logits `[k+1, V]` (already penalised) -> (accepted, bonus)."""
    best = target_logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    return accepted, best[accepted]


def verify_sampled(
    p: torch.Tensor,
    drafts: list[int],
    q: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Rejection sampling.

    p `[k+1, V]`: the target's processed distributions (temperature, top-k/p, min-p applied);
    q `[k, V]`: the drafter's processed distributions the drafts were sampled from, or None when
    the drafts were chosen deterministically (point mass: accept d with probability p(d)).
    """
    k = len(drafts)
    if k:
        u = torch.rand(k, generator=generator, device=p.device)
        idx = torch.tensor(drafts, device=p.device)
        px = p[torch.arange(k, device=p.device), idx]
        qx = torch.ones_like(px) if q is None else q[torch.arange(k, device=p.device), idx]
        ok = (u * qx < px).tolist()  # accept with probability min(1, p/q)
        for i in range(k):
            if not ok[i]:
                if q is None:
                    residual = p[i].clone()
                    residual[drafts[i]] = 0.0
                else:
                    residual = (p[i] - q[i]).clamp_min(0.0)
                total = residual.sum()
                dist = residual / total if total > 0 else p[i]
                return i, sample_one(dist, generator)
    return k, sample_one(p[k], generator)
