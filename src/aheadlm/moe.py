"""Gemma 4's mixture-of-experts feed-forward (26B-A4B), which runs beside the dense MLP.

weights, experts = router(x)                 # softmax over experts, top-k, renormalised
y = sum_k weights_k * down_e(gelu(gate_e(x)) * up_e(x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.eps, self.top_k, self.root = cfg.rms_norm_eps, cfg.top_k_experts, h**-0.5
        self.scale = nn.Parameter(torch.ones(h))
        self.proj = nn.Linear(h, cfg.num_experts, bias=False)
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k], expert ids [N, k])."""
        x = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        probs = torch.softmax(self.proj(x * self.scale * self.root), dim=-1, dtype=torch.float32)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Expert weights stored as 3-D tensors, as in the checkpoints: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H]; each row goes through its k experts, outputs summed by weight."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[rows], self.gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e].to(x.dtype))
            out.index_add_(0, rows, y * weights[rows, slot, None].to(x.dtype))
        return out
