"""Static-batch generation: many prompts through the target at once (rows padded with position -1).
Used to write self-distillation data, optionally capturing each row's post-norm hidden states and
the K/V of chosen layers for every position.

Rows are computed independently by the kernels, so each row's tokens equal what generating it
alone would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, processed_probs, sample_one


@dataclass
class RowResult:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    """Generated tokens (a stop token, if hit, included)."""
    finish_reason: str = "length"
    hidden: torch.Tensor | None = None
    """[len(prompt) + len(tokens) - 1, H] post-norm hidden states (the last token is never run)."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """layer -> (K, V) [positions, kv_heads * head_dim] for the same positions as `hidden`."""


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_tokens: int,
    temperatures: list[float] | None = None,
    stop_ids: tuple[int, ...] = (),
    seed: int = 0,
    capture_layers: tuple[int, ...] | None = None,
    chunk: int = 128,
) -> list[RowResult]:
    """Generate for every prompt. With `capture_layers`, also return hidden states and those
    layers' K/V (the cache is then allocated without rings so no position is overwritten)."""
    B = len(prompts)
    temps = temperatures or [0.0] * B
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts) + max_tokens
    capture = capture_layers is not None
    cache = KVCache(
        model.config,
        longest,
        batch_size=B,
        dtype=model.embed_dtype(),
        device=device,
        max_step=longest if capture else chunk,
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = [RowResult(list(p)) for p in prompts]
    hiddens: list[list[torch.Tensor]] = [[] for _ in range(B)]
    last_logits: list[torch.Tensor | None] = [None] * B

    # Prefill in chunks; padding where a prompt has ended.
    longest_prompt = max(len(p) for p in prompts)
    for start in range(0, longest_prompt, chunk):
        width = min(chunk, longest_prompt - start)
        toks = torch.zeros(B, width, dtype=torch.long)
        pos = torch.full((B, width), -1, dtype=torch.long)
        for b, p in enumerate(prompts):
            piece = p[start : start + width]
            toks[b, : len(piece)] = torch.tensor(piece, dtype=torch.long)
            pos[b, : len(piece)] = torch.arange(start, start + len(piece))
        _, hidden = model(toks.to(device), pos.to(device), cache, num_logits=0)
        for b, p in enumerate(prompts):
            n = max(0, min(width, len(p) - start))
            if n:
                hiddens[b].append(hidden[b, :n].float())
            if start <= len(p) - 1 < start + width:
                last_logits[b] = model.logits(hidden[b : b + 1, len(p) - 1 - start][None])[0, 0]

    logits = torch.stack(last_logits)  # [B, V]
    active = [True] * B
    for _ in range(max_tokens):
        nxt = []
        for b in range(B):
            if not active[b]:
                nxt.append(0)
                continue
            if temps[b] == 0:
                t = int(logits[b].argmax())
            else:
                probs = processed_probs(logits[b : b + 1], SamplingParams(temperature=temps[b]))
                t = sample_one(probs[0], gen)
            rows[b].tokens.append(t)
            nxt.append(t)
            if t in stop_ids:
                active[b] = False
                rows[b].finish_reason = "stop"
            elif len(rows[b].tokens) >= max_tokens:
                active[b] = False
        if not any(active):
            break
        pos = torch.tensor([[cache.lengths[b] if active[b] else -1] for b in range(B)])
        out, hidden = model(torch.tensor(nxt)[:, None].to(device), pos.to(device), cache)
        logits = out[:, 0]
        for b in range(B):
            if active[b]:
                hiddens[b].append(hidden[b].float())

    for b, r in enumerate(rows):
        if capture:
            r.hidden = torch.cat(hiddens[b])
            n = r.hidden.shape[0]
            r.kv = {}
            for layer in capture_layers:
                k = cache.k[layer][b, :, :n].transpose(0, 1).reshape(n, -1)
                v = cache.v[layer][b, :, :n].transpose(0, 1).reshape(n, -1)
                r.kv[layer] = (k.clone(), v.clone())
    return rows
