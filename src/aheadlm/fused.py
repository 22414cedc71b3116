"""Decoder layers as one compiled call each (`kernels/block.h`), for few-row float32 CPU inference:
the target's layers and the MTP drafter's query-only ones.

A compiled layer runs the same kernels in the same order as the module's per-op path, so the two
give bit-identical outputs and caches (checked in `tests/test_packed.py`). What it removes is the
Python and PyTorch dispatch between the kernels, about a quarter of a SmolLM2 decode step. Layers
that use a feature the kernel lacks (Gemma 4's extras, biases, unpacked weights) keep the per-op
path.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import cpu_kernels
from .packed import PackedEmbedding, PackedLinear, fuse

MAX_ROWS = 64
"""Most tokens per sequence a compiled layer takes (the attention kernel's limit; prefill chunks
beyond it use the per-op path with SDPA; `Engine.prefill` stays within it)."""


def takes(x: torch.Tensor) -> bool:
    """Whether compiled layers can run on activations x [B, T, H] (float32 CPU inference)."""
    few_cpu_rows = x.device.type == "cpu" and x.shape[1] <= MAX_ROWS
    return few_cpu_rows and x.dtype == torch.float32 and not torch.is_grad_enabled()


def compiled_kv(k: torch.Tensor) -> bool:
    """Whether compiled layers read a cache of this K (or V) tensor: float32, or bfloat16."""
    return k.dtype in (torch.float32, torch.bfloat16)


def compiled_round_kv(ctx) -> bool:
    """Whether a draft round's target K/V (`drafter.RoundContext`) are ones compiled layers read
    (float32, or a bfloat16 cache under a float32 model)."""
    return all(compiled_kv(k) for k, _, _ in ctx.kv.values())


def run(layer, x: torch.Tensor, rope, k: torch.Tensor, v: torch.Tensor, view) -> torch.Tensor:
    """One compiled layer on x with RoPE tables `rope` over cached k, v as `view` (an `AttnView`)
    shows them; its new keys and values go to `view.slots` unless the layer is query-only."""
    cos, sin = rope
    return layer.forward(x, cos, sin, k, v, view.slots, view.kpos, view.qpos, view.window or 0, view.end, view.strict)


def _linear(m: nn.Module | None):
    """The kernels' form of a packed projection without bias, or None."""
    return m.kernel if isinstance(m, PackedLinear) and m.bias is None else None


def _rows(m: nn.Module | None):
    """The kernels' row-readable form of a packed table or head without bias, or None."""
    return m.linear if isinstance(m, PackedLinear) and m.bias is None else None


def _weight(norm: nn.Module | None):
    return None if norm is None else norm.weight.detach()


def _one_eps(norms) -> float | None:
    """The common epsilon of float32 norms (the compiled layer takes one), or None."""
    norms = [n for n in norms if n is not None]
    if len({n.eps for n in norms}) != 1 or any(n.weight.dtype != torch.float32 for n in norms):
        return None
    return norms[0].eps


def compile_block(block: nn.Module):
    """`block` (a `model.Block`) as a compiled layer, or None when it cannot be one."""
    kernels = cpu_kernels()
    attn, mlp = block.attn, block.mlp
    if kernels is None or block.moe or block.per_layer or block.layer_scalar is not None:
        return None
    if attn.shared or attn.k_eq_v or attn.value_norm or attn.qkv is None or mlp.gate_up is None:
        return None
    post = (block.post_attn_norm, block.post_mlp_norm) if block.sandwich else (None, None)
    eps = _one_eps((block.attn_norm, block.mlp_norm, attn.q_norm, attn.k_norm, *post))
    linears = [_linear(m) for m in (attn.qkv, attn.o, mlp.gate_up, mlp.down)]
    if eps is None or any(lin is None for lin in linears):
        return None
    qkv, o, gate_up, down = linears
    return kernels.Block(
        attn_norm=_weight(block.attn_norm),
        qkv=qkv,
        heads=attn.n_heads,
        kv_heads=attn.n_kv,
        head_dim=attn.head_dim,
        query_only=False,
        q_norm=_weight(attn.q_norm),
        k_norm=_weight(attn.k_norm),
        query_scale=attn.scale,
        o=o,
        post_attn_norm=_weight(post[0]),
        mlp_norm=_weight(block.mlp_norm),
        gate_up=gate_up,
        gelu=mlp.gelu,
        down=down,
        post_mlp_norm=_weight(post[1]),
        layer_scalar=None,
        eps=eps,
    )


def compile_draft_layer(layer: nn.Module):
    """`layer` (a `drafter.DraftLayer`, queries only) as a compiled layer, or None. Its gate and up
    projections are combined into one product for the compiled layer only."""
    kernels = cpu_kernels()
    if kernels is None:
        return None
    eps = _one_eps((layer.attn_norm, layer.mlp_norm, layer.q_norm, layer.post_attn_norm, layer.post_mlp_norm))
    gate_up = fuse([layer.gate, layer.up]) if isinstance(layer.gate, PackedLinear) else None
    linears = [_linear(m) for m in (layer.q, layer.o, gate_up, layer.down)]
    if eps is None or any(lin is None for lin in linears):
        return None
    q, o, gate_up, down = linears
    return kernels.Block(
        attn_norm=_weight(layer.attn_norm),
        qkv=q,
        heads=layer.n_heads,
        kv_heads=0,
        head_dim=layer.head_dim,
        query_only=True,
        q_norm=_weight(layer.q_norm),
        k_norm=None,
        query_scale=layer.scale,
        o=o,
        post_attn_norm=_weight(layer.post_attn_norm),
        mlp_norm=_weight(layer.mlp_norm),
        gate_up=gate_up,
        gelu=layer.gelu,
        down=down,
        post_mlp_norm=_weight(layer.post_mlp_norm),
        layer_scalar=layer.layer_scalar.detach().float(),
        eps=eps,
    )


def compile_drafter(drafter: nn.Module, target: nn.Module):
    """A whole draft step of `drafter` (an `MTPDrafter`) reading `target`, as one compiled call:
    `step(token, hidden, round)` -> (next hidden, candidate ids, their scores), as
    `MTPDrafter.step` then `MTPDrafter.scores` compute them. None unless the drafter's layers are
    compiled and it scores the clustered candidates with the target's packed head."""
    kernels = cpu_kernels()
    cfg = drafter.config
    if kernels is None or cfg.head != "target" or drafter.centroids is None:
        return None
    if any(layer.compiled is None for layer in drafter.layers) or not isinstance(target.embed, PackedEmbedding):
        return None
    head = target.embed.table if target.lm_head is None else target.lm_head
    parts = [_rows(target.embed.table), _linear(drafter.pre_projection), _linear(drafter.post_projection)]
    parts += [_linear(drafter.centroids), _rows(head)]
    if any(p is None for p in parts):
        return None
    embed, pre, post, centroids, head = parts
    return kernels.Drafter(
        embed=embed,
        embed_scale=target.config.embed_scale,
        pre=pre,
        layers=[layer.compiled for layer in drafter.layers],
        norm=drafter.norm.weight.detach(),
        eps=drafter.norm.eps,
        post=post,
        centroids=centroids,
        ordering=drafter.token_ordering,
        top_k=cfg.centroid_top_k,
        head=head,
        softcap=target.config.final_logit_softcap or 0.0,
    )


def draft_round(drafter: nn.Module, ctx) -> list:
    """The per-layer inputs of a compiled draft step for one round (`drafter.RoundContext`)."""
    kernels = cpu_kernels()
    out = []
    for layer in drafter.layers:
        (cos, sin), (k, v, view) = ctx.rope[layer.layer_type], ctx.kv[layer.layer_type]
        out.append(kernels.LayerRound(cos, sin, k, v, view.kpos, view.qpos, view.window or 0, view.end, view.strict))
    return out
