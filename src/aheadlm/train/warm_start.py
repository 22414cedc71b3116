"""Warm start: begin a drafter from the target's own top layer instead of random weights.

Each drafter layer starts as a copy of the target's last layer of the type whose K/V it reads (its
queries were trained against exactly those keys and values), the drafter's output norm as the
target's final norm, the post-projection as the identity, and the pre-projection as the ridge
least-squares map from the drafter's inputs `(E(x_p) * scale, H[p-1])` to the residual stream
that target layer receives at position p. At step 0 the drafter is then a crude copy of the
target's last layer for the next position, and training starts from there.
"""

from __future__ import annotations

import torch

from ..drafter import MTPDrafter
from ..errors import InvalidRequestError
from ..kv_cache import KVCache
from ..model import Transformer
from ..packed import dense_state_dict


def _layer_weights(target: Transformer, layer: int) -> dict[str, torch.Tensor]:
    """A target block's weights under the drafter layer's names (fused projections split; the
    post-norms only where the target has them)."""
    cfg = target.config
    sd = dense_state_dict(target.layers[layer])
    nq = cfg.num_heads * cfg.type_head_dim(cfg.layer_types[layer])
    q = sd["attn.qkv.weight"][:nq] if "attn.qkv.weight" in sd else sd["attn.q.weight"]
    if "mlp.gate_up.weight" in sd:
        gate, up = sd["mlp.gate_up.weight"].chunk(2, 0)
    else:
        gate, up = sd["mlp.gate.weight"], sd["mlp.up.weight"]
    out = {"q.weight": q, "o.weight": sd["attn.o.weight"], "gate.weight": gate, "up.weight": up}
    out["down.weight"] = sd["mlp.down.weight"]
    for name in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"):
        if f"{name}.weight" in sd:
            out[f"{name}.weight"] = sd[f"{name}.weight"]
    if "attn.q_norm.weight" in sd:
        out["q_norm.weight"] = sd["attn.q_norm.weight"]
    out["layer_scalar"] = sd.get("layer_scalar", torch.ones(1))
    return out


def check_compatible(drafter: MTPDrafter, target: Transformer) -> None:
    c, t = drafter.config, target.config
    problems = []
    if c.head != "target":
        problems.append("the drafter has its own head")
    if c.hidden_size != t.hidden_size:
        problems.append(f"drafter width {c.hidden_size} != target width {t.hidden_size}")
    if c.num_heads != t.num_heads or any(c.type_head_dim(lt) != t.type_head_dim(lt) for lt in c.layer_types):
        problems.append("query heads differ from the target's")
    if t.num_experts or t.per_layer_dim or t.attention_bias or t.double_wide_mlp:
        problems.append("the target's layers are not plain dense layers")
    if c.sandwich_norm != t.sandwich_norm or c.qk_norm != t.qk_norm:
        problems.append("the drafter's norms differ from the target layer's")
    for lt in c.layer_types:
        if c.intermediate_size != t.layer_intermediate(t.last_layer_of(lt)):
            problems.append(f"drafter intermediate size {c.intermediate_size} != the target layer's")
            break
    if problems:
        raise InvalidRequestError("cannot warm-start from the target: " + "; ".join(problems))


@torch.inference_mode()
def capture(target: Transformer, sequences: list[list[int]], layer: int, max_positions: int):
    """Run the target over token sequences -> (X [N, 2H] drafter inputs, Y [N, H] residual input of
    `layer`) at up to `max_positions` positions."""
    cfg = target.config
    device = next(target.parameters()).device
    seen: list[torch.Tensor] = []
    hook = target.layers[layer].register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].float()))
    xs, ys, n = [], [], 0
    try:
        for toks in sequences:
            if n >= max_positions or len(toks) < 2:
                continue
            cache = KVCache(cfg, len(toks), dtype=target.embed_dtype(), device=device)
            seen.clear()
            hidden = []
            for i in range(0, len(toks), cache.max_step):
                chunk = toks[i : i + cache.max_step]
                pos = torch.arange(i, i + len(chunk), device=device)[None]
                _, h = target(torch.tensor([chunk], device=device), pos, cache, num_logits=0)
                hidden.append(h[0].float())
            H, resid = torch.cat(hidden), torch.cat(seen)
            emb = target.embed_tokens(torch.tensor(toks, device=device)).float()
            xs.append(torch.cat([emb[1:], H[:-1]], -1))
            ys.append(resid[1:])
            n += len(toks) - 1
    finally:
        hook.remove()
    if not xs:
        raise InvalidRequestError("warm start needs at least one sequence of two or more tokens")
    return torch.cat(xs)[:max_positions], torch.cat(ys)[:max_positions]


def ridge(X: torch.Tensor, Y: torch.Tensor, strength: float = 1e-4) -> torch.Tensor:
    """W [out, in] minimising |X W^T - Y|^2 + strength * N * |W|^2 (float64 for a stable solve)."""
    X64, Y64 = X.double(), Y.double()
    gram = X64.T @ X64 + strength * len(X) * torch.eye(X.shape[1], dtype=torch.float64, device=X.device)
    return torch.linalg.solve(gram, X64.T @ Y64).T.float()


def warm_start(drafter: MTPDrafter, target: Transformer, sequences: list[list[int]], max_positions: int = 16384):
    """Initialise `drafter` in place from `target` (see the module docstring). Returns the relative
    squared error of the pre-projection fit."""
    check_compatible(drafter, target)
    tcfg = target.config
    sources = [tcfg.last_layer_of(t) for t in drafter.config.layer_types]
    X, Y = capture(target, sequences, sources[0], max_positions)
    W = ridge(X, Y)
    with torch.no_grad():
        for layer, src in zip(drafter.layers, sources, strict=True):
            for name, w in _layer_weights(target, src).items():
                layer.get_parameter(name).copy_(w)
        drafter.norm.weight.copy_(target.norm.weight.float())
        drafter.post_projection.weight.copy_(torch.eye(tcfg.hidden_size))
        drafter.pre_projection.weight.copy_(W)
    return float(((X @ W.T - Y) ** 2).mean() / (Y**2).mean().clamp_min(1e-12))
