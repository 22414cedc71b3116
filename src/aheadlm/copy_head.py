"""A copy head for the MTP drafter: a pointer over the context mixed into the head's distribution
(not part of Gemma 4).

Why: the targets mostly repeat text from their context, and a drafter reading K/V barely learns
to copy (`benchmarks/copy_rounds.py`). At each draft depth the pointer proposes tokens of the known
sequence (never drafts), and a gate g weighs it against the head: q = (1 - g) q_head + g q_copy.

- Aiming (a fresh pointer): from u = (input token embedding, incoming hidden, outgoing hidden), two
  query heads score the target's cached keys of one or more layers (`copy_layers`, scores summed):
  head 0 proposes the token at the attended position, head 1 the token after it. One softmax spans
  both. With `copy_match` = n, an exact match of the 1..n tokens before a proposed position with
  the round's last input tokens adds a learned bonus per order (a learned n-gram lookup).
- Following (`copy_follow`): a copy goes on where it started, so from depth 2 on, the previous
  depth's entries whose token is this depth's input token move one position on and are
  renormalised; the gate also sees the share of the previous pointer's weight they kept. A row
  with no such entry aims afresh. This is what lookup does, and it saves the aiming's cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import fused
from .kernels import cpu_kernels
from .model import apply_rope

if TYPE_CHECKING:
    from .drafter import DrafterConfig, RoundContext

COPY_TOP = 32
"""Entries a draft round keeps of a fresh pointer (its heaviest): the rest carry little weight."""


@dataclass
class Pointer:
    """One draft depth's pointer for query rows [B, T]: the positions in the known sequence whose
    tokens it proposes (`src`, [B, T, N]), their weights (`w`, summing to 1 per row, or 0 where
    there is nothing to point at) and the gate `g` [B, T], the pointer's share of the mixture."""

    src: torch.Tensor
    w: torch.Tensor
    g: torch.Tensor

    def ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """The proposed token ids [B, T, N], given the known sequences `tokens` [B, L]."""
        B, T, N = self.src.shape
        index = self.src.reshape(B, -1).clamp(0, tokens.shape[1] - 1)  # unwritten slots carry no weight
        return tokens.gather(1, index).view(B, T, N)


class CopyHead(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.sources = tuple(cfg.copy_sources())
        """The round-context entries whose keys it scores."""
        t = cfg.key_type(self.sources[0])
        self.kv_heads, self.head_dim = cfg.type_kv_heads(t), cfg.type_head_dim(t)
        self.q = nn.Linear(3 * cfg.target_hidden, len(self.sources) * 2 * self.kv_heads * self.head_dim, bias=False)
        self.gate = nn.Linear(3 * cfg.target_hidden, 1)
        self.follow = nn.Parameter(torch.zeros(2)) if cfg.copy_follow else None
        """(weight of the kept share, bias) added to the gate's logit of a row that follows."""
        self.match = nn.Parameter(torch.zeros(cfg.copy_match)) if cfg.copy_match else None
        """Score bonus of an exact match of the 1, 2, ... tokens before a proposed position."""
        self.recent = max(1, cfg.copy_match)
        """How many of the round's last input tokens a caller passes (the last is this depth's)."""

    def reset(self) -> None:
        """Initial values for training: the gate starts nearly shut, so a warm-started drafter keeps
        its head; a follow that keeps all of its weight opens it."""
        nn.init.constant_(self.gate.bias, -3.0)
        if self.follow is not None:
            self.follow.data = torch.tensor([6.0, 0.0])
        if self.match is not None:
            nn.init.constant_(self.match, 2.0)

    def forward(self, emb, h_in, h_out, ctx: RoundContext, tokens, recent, prev: Pointer | None = None, top=None):
        """Rows [B, T, H] of one draft depth (query positions as in `ctx`); `tokens` [B, L] the known
        sequence of each row (the last one at its query position); `recent` [B, T, self.recent] the
        round's last input tokens (-1 where there are none); `prev` the previous depth's pointer.
        `top` keeps only each row's heaviest entries of a fresh pointer (the draft rounds do; the
        trainer keeps all of them) -> this depth's `Pointer`."""
        u = torch.cat([emb, h_in, h_out], dim=-1)
        logit = self.gate(u)[..., 0].float()
        follows = None
        if prev is not None and self.follow is not None:
            qpos = ctx.kv[self.sources[0]][2].qpos
            kept = (prev.ids(tokens) == recent[..., -1:]) & (prev.src + 1 <= qpos[..., None])
            wf = prev.w * kept
            mass = wf.sum(-1)
            follows = mass > 0
            share = mass / prev.w.sum(-1).clamp_min(1e-30)
            followed = Pointer(prev.src + 1, wf / mass.clamp_min(1e-30)[..., None], None)
            followed.g = torch.sigmoid(logit + self.follow[0] * share + self.follow[1])
            if bool(follows.all()):  # no row aims afresh: skip the aiming's cost
                return followed
        src, w = self.aim(u, ctx, tokens, recent, top)
        fresh = Pointer(src, w, torch.sigmoid(logit) * (w.sum(-1) > 0))
        if follows is None:
            return fresh
        f, n = follows[..., None], max(fresh.src.shape[-1], followed.src.shape[-1])
        return Pointer(
            torch.where(f, _pad(followed.src, n), _pad(fresh.src, n)),
            torch.where(f, _pad(followed.w, n), _pad(fresh.w, n)),
            torch.where(follows, followed.g, fresh.g),
        )

    def draft_step(self, emb, h_in, h_out, ctx: RoundContext, tokens: list[int], known, recent: list[int], prev):
        """`forward` with top=COPY_TOP for one sequence in a draft round (B = T = 1), with the
        following done on the at most COPY_TOP entries in Python, which costs a fraction of the
        tensor ops (tested equal): `tokens` the known sequence (and `known` the same as a [1, L]
        tensor), `recent` the round's last `self.recent` input tokens, `prev` the previous depth's
        entries or None -> ((positions, weights), gate) as Python numbers."""
        u = torch.cat([emb, h_in, h_out], dim=-1)
        logit = float(self.gate(u))
        if prev is not None and self.follow is not None:
            last, tok = len(tokens) - 1, recent[-1]
            kept = [(s + 1, x) for s, x in zip(*prev, strict=True) if x > 0.0 and s + 1 <= last and tokens[s] == tok]
            mass = sum(x for _, x in kept)
            if mass > 0.0:
                a, b = self.follow.tolist()
                g = 1.0 / (1.0 + math.exp(-(logit + a * mass / sum(prev[1]) + b)))
                return ([s for s, _ in kept], [x / mass for _, x in kept]), g
        src, w = self.aim(u, ctx, known, recent_tokens([recent], self.recent), COPY_TOP)
        src, w = src[0, 0].tolist(), w[0, 0].tolist()
        return (src, w), (1.0 / (1.0 + math.exp(-logit)) if sum(w) > 0.0 else 0.0)

    def aim(self, u, ctx: RoundContext, tokens, recent, top):
        """A fresh pointer: (positions [B, T, N], weights [B, T, N])."""
        (B, T, _), n, d = u.shape, self.kv_heads, self.head_dim
        qs = self.q(u).view(B, T, len(self.sources), 2 * n, d)
        view = ctx.kv[self.sources[0]][2]  # one attention type: every source has the same slots
        scale = (len(self.sources) * n * d) ** -0.5
        qr = []
        for i, key in enumerate(self.sources):
            k = ctx.kv[key][0]
            cos, sin = ctx.rope[key]
            dtype = torch.promote_types(qs.dtype, k.dtype)  # float32 queries over a bfloat16 cache
            qr.append(apply_rope(qs[:, :, i].transpose(1, 2).to(dtype).contiguous(), cos, sin).view(B, 2, n, T, d))
        kernels = cpu_kernels() if top is not None and B * T == 1 and fused.takes(u) else None
        if kernels is not None and fused.compiled_round_kv(ctx):  # a draft round's one row: one compiled call
            match = self.match.detach() if self.match is not None else torch.zeros(0)
            keys = [ctx.kv[key][0] for key in self.sources]
            q1 = torch.stack([q[0, :, :, 0] for q in qr])  # [sources, 2, n, d]
            src, w = kernels.copy_aim(q1, keys, view.kpos, int(view.qpos), tokens[0], recent[0, 0], match, scale, top)
            return src.view(1, 1, -1), w.view(1, 1, -1)
        s = 0.0
        for key, q in zip(self.sources, qr, strict=True):
            s = s + torch.einsum("bontd,bnsd->btos", q, ctx.kv[key][0].to(q.dtype))  # [B, T, 2, S]
        s = (s * scale).reshape(B, T, -1).float()
        kpos, qpos = view.kpos[:, None, None], view.qpos[:, :, None, None]  # [B, 1, 1, S], [B, T, 1, 1]
        src = torch.stack([kpos, kpos + 1], dim=2)[:, :, :, 0]  # [B, 1, 2, S] the position each head copies
        # written slots strictly before the query, proposing a known token (not a draft)
        ok = (((kpos >= 0) & (kpos < qpos)) & (src <= qpos)).reshape(B, T, -1)
        src = src.reshape(B, 1, -1).expand(B, T, -1)
        if self.match is not None:
            s = s + self.match_bonus(src, tokens, recent)
        # a finite fill keeps rows without a valid slot free of NaN (their weights are zeroed)
        w = torch.softmax(s.masked_fill(~ok, -1e30), -1) * ok
        if top is not None and top < w.shape[-1]:
            w, i = w.topk(top, -1)
            src = src.gather(-1, i)
        return src, w

    def match_bonus(self, src, tokens, recent):
        """[B, T, N]: sum over orders m = 1..n of match[m - 1] where the m tokens before `src`
        equal the round's last m input tokens."""
        B, T, N = src.shape
        bonus, run = 0.0, True
        for i in range(self.match.numel()):
            pos = src - 1 - i
            before = tokens.gather(1, pos.reshape(B, -1).clamp(0, tokens.shape[1] - 1)).view(B, T, N)
            run = run & (before == recent[..., -1 - i, None]) & (pos >= 0)
            bonus = bonus + self.match[i] * run
        return bonus


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """Entries padded to n with zeros (weight 0: they propose nothing)."""
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def recent_tokens(chains: list[list[int]], n: int) -> torch.Tensor:
    """[B, 1, n]: the last n tokens of each row's round so far (known tokens, then its drafts), -1
    before the start."""
    return torch.tensor([[([-1] * n + c)[-n:]] for c in chains])
