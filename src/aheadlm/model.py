"""The target transformer (Gemma 3 and Llama families): network only, no sampling, no I/O.

    logits, hidden = model(tokens, positions, cache)

`hidden` is the post-final-norm state of every input position (the MTP drafter's input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .config import FULL, SLIDING, ModelConfig
from .kernels import cpu_kernels
from .kv_cache import AttnView, KVCache
from .moe import Experts, Router


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32. `weight` is the final multiplier (Gemma's 1 + w is
    folded in at load time)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            kernels = cpu_kernels()
            if kernels is not None:
                return kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x `[B, H, T, D]`; one kernel call on CPU at inference
    (bit-identical: the same products and sum, each rounded once)."""
    fast = x.dtype == cos.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
    kernels = cpu_kernels() if fast and x.stride(-1) == 1 and cos.shape[0] == x.shape[0] else None
    if kernels is not None:
        return kernels.rope(x, cos, sin)
    return x * cos + rotate_half(x) * sin


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin `[B, 1, T, head_dim]` for integer positions `[B, T]`."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attend(q, k, v, view: AttnView, scale: float) -> torch.Tensor:
    """Grouped-query attention of queries q `[B, Hq, T, D]` over cached k/v `[B, Hkv, S, D]`,
    visibility given by `view`'s positions -> `[B, Hq, T, D]`.

    Few float32 rows on CPU (decode, verification, drafting) go to the compiled kernel, which
    computes every row on its own; the rest to SDPA with queries sharing a KV head stacked."""
    B, Hq, T, D = q.shape
    fast = q.device.type == "cpu" and q.dtype == torch.float32 and T <= 64 and not torch.is_grad_enabled()
    kernels = cpu_kernels() if fast else None
    if kernels is not None:
        return kernels.attention(q, k, v, view.kpos, view.qpos, scale, view.window or 0, view.strict)
    if k.dtype != q.dtype:  # a bfloat16 cache under float32 queries
        k, v = k.to(q.dtype), v.to(q.dtype)
    Hkv = k.shape[1]
    g = Hq // Hkv
    mask = view.mask
    if g > 1:
        mask = mask.repeat(1, 1, g, 1)
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, g * T, D), k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, T, -1)


class Embedding(nn.Module):
    """Token embedding table that can also score hidden states against itself (tied head)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class Attention(nn.Module):
    """Grouped-query attention of one layer. Gemma 4 variants: a per-type head dim and KV head
    count, V normalised without scale, V = K projection (`k_eq_v`), and KV-shared layers that
    have queries only and attend over the K/V an earlier layer wrote to the cache."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        t = cfg.layer_types[layer] if cfg.layer_types else FULL
        h, d = cfg.hidden_size, cfg.type_head_dim(t)
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.type_kv_heads(t), d
        self.scale = cfg.query_scale
        self.shared = cfg.kv_source(layer) != layer
        self.k_eq_v = cfg.k_eq_v and t == FULL
        self.eps = cfg.rms_norm_eps
        self.q = nn.Linear(h, self.n_heads * d, bias=cfg.attention_bias)
        self.names = ["q"]
        if not self.shared:
            self.k = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
            self.names.append("k")
            if not self.k_eq_v:
                self.v = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
                self.names.append("v")
        self.o = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm and not self.shared else None
        self.value_norm = cfg.value_norm
        self.qkv = None

    def fuse(self, fuse_fn) -> None:
        """Replace the input projections by one fused projection (inference only)."""
        self.qkv = fuse_fn([getattr(self, n) for n in self.names]) if len(self.names) > 1 else None
        if self.qkv is not None:
            for n in self.names:
                delattr(self, n)

    def forward(self, x, rope, cache: KVCache, layer: int, view: AttnView):
        B, T, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if self.qkv is not None:
            parts = self.qkv(x).split([nq] + [nkv] * (len(self.names) - 1), dim=-1)
        else:
            parts = [getattr(self, n)(x) for n in self.names]
        q = parts[0].view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        cos, sin = rope
        q = apply_rope(q, cos, sin)
        if self.shared:
            k_all, v_all = cache.read(layer, view.end)
        else:
            k = parts[1].view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = parts[-1].view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # k again when k_eq_v
            if self.value_norm:
                v = F.rms_norm(v.float(), (self.head_dim,), None, self.eps).to(v.dtype)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = apply_rope(k, cos, sin)
            k_all, v_all = cache.write(layer, view, k, v)
        out = attend(q, k_all, v_all, view, self.scale)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate: int | None = None):
        super().__init__()
        i = intermediate or cfg.intermediate_size
        self.gate = nn.Linear(cfg.hidden_size, i, bias=False)
        self.up = nn.Linear(cfg.hidden_size, i, bias=False)
        self.down = nn.Linear(i, cfg.hidden_size, bias=False)
        self.gelu = cfg.activation == "gelu_tanh"
        self.gate_up = None

    def fuse(self, fuse_fn) -> None:
        self.gate_up = fuse_fn([self.gate, self.up])
        if self.gate_up is not None:
            del self.gate, self.up

    def forward(self, x):
        if self.gate_up is not None:
            g, u = self.gate_up(x).chunk(2, dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down(g * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        eps, h = cfg.rms_norm_eps, cfg.hidden_size
        self.attn_norm = RMSNorm(h, eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(h, eps)
        self.mlp = MLP(cfg, cfg.layer_intermediate(layer))
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.post_attn_norm = RMSNorm(h, eps)
            self.post_mlp_norm = RMSNorm(h, eps)
        self.moe = cfg.num_experts > 0
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_mlp_norm_1 = RMSNorm(h, eps)
            self.pre_moe_norm = RMSNorm(h, eps)
            self.post_moe_norm = RMSNorm(h, eps)
        self.per_layer = cfg.per_layer_dim > 0
        if self.per_layer:
            self.ple_gate = nn.Linear(h, cfg.per_layer_dim, bias=False)
            self.ple_proj = nn.Linear(cfg.per_layer_dim, h, bias=False)
            self.ple_norm = RMSNorm(h, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1)) if cfg.layer_scalar else None
        self.compiled = None
        """This layer as one compiled call (`fused.compile_block`), set by `Transformer.fuse`."""

    def forward(self, x, rope, cache, layer, view, per_layer_input=None):
        a = self.attn(self.attn_norm(x), rope, cache, layer, view)
        x = x + (self.post_attn_norm(a) if self.sandwich else a)
        m = self.mlp(self.mlp_norm(x))
        if self.moe:
            flat = x.reshape(-1, x.shape[-1])
            weights, idx = self.router(flat)
            e = self.experts(self.pre_moe_norm(flat), weights, idx).view_as(x)
            m = self.post_mlp_norm_1(m) + self.post_moe_norm(e)
        x = x + (self.post_mlp_norm(m) if self.sandwich else m)
        if self.per_layer:
            g = F.gelu(self.ple_gate(x), approximate="tanh") * per_layer_input
            x = x + self.ple_norm(self.ple_proj(g))
        return x if self.layer_scalar is None else x * self.layer_scalar


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.per_layer_dim:  # Gemma 4 per-layer embeddings: a token table plus a projection of x
            width = cfg.num_layers * cfg.per_layer_dim
            self.embed_per_layer = Embedding(cfg.per_layer_vocab, width)
            self.per_layer_proj = nn.Linear(cfg.hidden_size, width, bias=False)
            self.per_layer_norm = RMSNorm(cfg.per_layer_dim, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_rope()

    def init_rope(self, device=None) -> None:
        """(Re)compute RoPE frequencies; needed after building the module on the meta device."""
        cfg = self.config
        ropes = {FULL: cfg.rope_full, SLIDING: cfg.rope_sliding}
        for t in cfg.group_types:
            inv = ropes[t].inv_freq(cfg.type_head_dim(t))
            inv = inv if device is None else inv.to(device)
            self.register_buffer(f"inv_freq_{t}", inv, persistent=False)

    def fuse(self, fuse_fn) -> None:
        """Fuse q/k/v and gate/up projections in every block (inference only)."""
        for block in self.layers:
            block.attn.fuse(fuse_fn)
            block.mlp.fuse(fuse_fn)
            block.compiled = fused.compile_block(block)

    def set_rope_divisors(self, divisors: torch.Tensor) -> None:
        """GGUF `rope_freqs`: per-frequency divisors (how llama.cpp stores Llama 3.1 RoPE scaling)."""
        self.inv_freq_full = self.inv_freq_full / divisors.float()

    def embed_dtype(self) -> torch.dtype:
        """Activation dtype (packed weights compute in float32)."""
        return self.norm.weight.dtype

    def head_scores(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of tokens `ids` [n] only, for one post-norm state h [H] -> [n] float32."""
        head = self.embed if self.lm_head is None else self.lm_head
        rows_linear = getattr(head, "rows_linear", None)
        out = rows_linear(h, ids) if rows_linear else head.weight.index_select(0, ids).float() @ h.float()
        cap = self.config.final_logit_softcap
        return torch.tanh(out / cap) * cap if cap else out

    def head_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the output head's weight (a clustered draft head scores only these)."""
        if self.lm_head is None:
            return self.embed(ids)
        head = self.lm_head
        return head.rows(ids) if hasattr(head, "rows") else head.weight[ids]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled input embeddings (the drafter reuses this)."""
        x = self.embed(tokens)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4 per-layer inputs [B, T, layers, per_layer_dim]: (norm(proj(x) / sqrt(H)) + token
        table * sqrt(P)) / sqrt(2)."""
        cfg = self.config
        shape = (*tokens.shape, cfg.num_layers, cfg.per_layer_dim)
        table = self.embed_per_layer(tokens).to(x.dtype) * torch.tensor(cfg.per_layer_dim**0.5, dtype=x.dtype)
        proj = self.per_layer_norm((self.per_layer_proj(x) * cfg.hidden_size**-0.5).view(shape))
        return (proj + table.view(shape)) * 2.0**-0.5

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores from post-norm hidden states (softcapped when configured)."""
        out = self.lm_head(hidden) if self.lm_head is not None else self.embed.attend(hidden)
        cap = self.config.final_logit_softcap
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        num_logits: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """tokens, positions `[B, T]` -> (logits `[B, n, V]` for the last `n = num_logits` positions
        (all when None, none when 0), post-norm hidden `[B, T, H]`)."""
        views = cache.prepare(positions)
        x = self.embed_tokens(tokens)
        per_layer = self.per_layer_inputs(tokens, x) if self.config.per_layer_dim else None
        ropes = {t: rope_tables(getattr(self, f"inv_freq_{t}"), positions, x.dtype) for t in views}
        compiled = fused.takes(x) and fused.compiled_kv(cache.k[0])
        for i, block in enumerate(self.layers):
            t = self.config.layer_types[i]
            view = views[t]
            hooked = block._forward_pre_hooks or block._forward_hooks  # hooks need the module call
            if compiled and block.compiled is not None and not hooked:
                x = fused.run(block.compiled, x, ropes[t], cache.k[i], cache.v[i], view)
            else:
                x = block(x, ropes[t], cache, i, view, None if per_layer is None else per_layer[:, :, i])
        hidden = self.norm(x)
        if num_logits == 0:
            return None, hidden
        h = hidden if num_logits is None else hidden[:, -num_logits:]
        return self.logits(h), hidden
