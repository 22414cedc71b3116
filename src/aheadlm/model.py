"""The target transformer (Gemma 3 and Llama families): network only, no sampling, no I/O.

    logits, hidden = model(tokens, positions, cache)

`hidden` is the post-final-norm state of every input position (the MTP drafter's input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FULL, SLIDING, ModelConfig
from .kernels import cpu_kernels
from .kv_cache import AttnView, KVCache


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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale = cfg.query_scale
        self.q = nn.Linear(h, self.n_heads * d, bias=cfg.attention_bias)
        self.k = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.v = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.o = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.qkv = None

    def fuse(self, fuse_fn) -> None:
        """Replace q/k/v by one fused projection (inference only)."""
        self.qkv = fuse_fn([self.q, self.k, self.v])
        if self.qkv is not None:
            del self.q, self.k, self.v

    def forward(self, x, rope, cache: KVCache, layer: int, view: AttnView):
        B, T, _ = x.shape
        if self.qkv is not None:
            nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, v = self.qkv(x).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_all, v_all = cache.write(layer, view, k, v)
        out = attend(q, k_all, v_all, view, self.scale)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.hidden_size, eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norm
        if self.sandwich:
            self.post_attn_norm = RMSNorm(cfg.hidden_size, eps)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, rope, cache, layer, view):
        a = self.attn(self.attn_norm(x), rope, cache, layer, view)
        x = x + (self.post_attn_norm(a) if self.sandwich else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(m) if self.sandwich else m)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_rope()

    def init_rope(self, device=None) -> None:
        """(Re)compute RoPE frequencies; needed after building the module on the meta device."""
        cfg = self.config
        ropes = {FULL: cfg.rope_full, SLIDING: cfg.rope_sliding}
        for t in cfg.group_types:
            inv = ropes[t].inv_freq(cfg.head_dim)
            inv = inv if device is None else inv.to(device)
            self.register_buffer(f"inv_freq_{t}", inv, persistent=False)

    def fuse(self, fuse_fn) -> None:
        """Fuse q/k/v and gate/up projections in every block (inference only)."""
        for block in self.layers:
            block.attn.fuse(fuse_fn)
            block.mlp.fuse(fuse_fn)

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
        out = rows_linear(h, ids) if rows_linear else head.weight[ids].float() @ h.float()
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
        ropes = {t: rope_tables(getattr(self, f"inv_freq_{t}"), positions, x.dtype) for t in views}
        for i, block in enumerate(self.layers):
            t = self.config.layer_types[i]
            x = block(x, ropes[t], cache, i, views[t])
        hidden = self.norm(x)
        if num_logits == 0:
            return None, hidden
        h = hidden if num_logits is None else hidden[:, -num_logits:]
        return self.logits(h), hidden
