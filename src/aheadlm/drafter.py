"""The MTP drafter (Gemma 4 assistant architecture): Q-only transformer layers that read the
target's KV cache, fed with `concat(scaled target embedding of the last token, target post-norm
hidden)`.

One draft round (query position fixed at the position of the last accepted token `tok`):

    h = target hidden of the row that produced tok
    for step in range(k):
        x  = pre_projection(cat(E_target(tok) * embed_scale, h))
        x  = layers(x, K/V of the target's last sliding and last full layer)   # no drafter KV cache
        hd = norm(x);  h = post_projection(hd)                                   # h feeds the next step
        tok = argmax(head(hd or h))

The network only: proposing, sampling and verification live in `speculative.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .config import FULL, SLIDING, ModelConfig, per_type
from .copy_head import CopyHead
from .errors import DrafterMismatchError, WeightsError
from .kv_cache import AttnView
from .model import RMSNorm, apply_rope, attend, rope_tables


@dataclass(frozen=True)
class DrafterConfig:
    target_hidden: int
    """Width of the target's hidden state (Gemma 4: backbone_hidden_size)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Must equal the target's (the drafter attends over the target's K/V)."""
    head_dim: int
    vocab_size: int
    layer_types: tuple[str, ...] = ()
    """Per drafter layer: which target layer type's K/V it reads ("sliding" or "full")."""
    rms_norm_eps: float = 1e-6
    activation: str = "gelu_tanh"
    query_scale: float = 0.0
    """0 means 1/sqrt(head_dim)."""
    qk_norm: bool = True
    sandwich_norm: bool = True
    """Norms after attention and MLP too (Gemma); False = pre-norm only (Llama), so a drafter
    layer can start as an exact copy of a Llama target's layer."""
    head: str = "target"
    """"target": score post_projection output with the target's output head (shares its table);
    "own": score the drafter's normed state with its own embedding table (Gemma 4 assistants)."""
    num_centroids: int = 0
    """0 = dense head; else clustered head: score centroids, keep `centroid_top_k` clusters."""
    centroid_top_k: int = 32
    draft_threshold: float = 0.0
    """Confidence below which drafting stops when the user gives no threshold: chosen on held-out
    rounds at the end of training (train/calibrate.py), or measured; 0 drafts always."""
    target_arch: str = ""
    target_layer_types: tuple[str, ...] = ()
    """The target's layer types, recorded to refuse a drafter built for another model."""
    head_dim_full: int = 0
    """Head dim of layers reading full-attention K/V (Gemma 4: 512); 0 = head_dim."""
    num_kv_heads_full: int = 0
    """KV heads of the target's full-attention layers; 0 = num_kv_heads."""
    sliding_keys: int = 0
    """How many cached positions before the query a sliding layer sees; 0 = the target's window
    minus one (the query's own position is not cached). Gemma 4 assistants see window + 1."""
    copy_head: bool = False
    """Add a pointer over the context (`CopyHead`, not part of Gemma 4) mixed into the head's
    distribution by a learned gate."""
    copy_layers: tuple[int, ...] = ()
    """Target layers whose cached keys the copy head reads, their scores summed (layers of one
    attention type); empty: the layer the drafter's last layer reads."""
    copy_follow: bool = False
    """From depth 2 on, the copy head follows its previous depth's slots that agree with the draft."""
    copy_match: int = 0
    """n > 0: the copy head's aim also scores exact matches of the last 1..n input tokens."""

    def __post_init__(self):
        for name in ("target_hidden", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            v = getattr(self, name)  # a damaged config.json must fail here, not inside torch
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "target_layer_types", tuple(self.target_layer_types))
        object.__setattr__(self, "copy_layers", tuple(self.copy_layers))
        if self.query_scale == 0.0:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)
        if not isinstance(self.copy_match, int) or not 0 <= self.copy_match <= 8:
            raise ValueError(f"copy_match must be an integer in 0..8, got {self.copy_match!r}")
        if not isinstance(self.draft_threshold, int | float) or not 0.0 <= self.draft_threshold <= 1.0:
            raise ValueError(f"draft_threshold must be a number in 0..1, got {self.draft_threshold!r}")

    @classmethod
    def for_target(cls, target: ModelConfig, **kw: Any) -> DrafterConfig:
        """A drafter shaped to read `target`'s cache: heads and head_dim follow the target; the
        last layer reads the full-attention K/V, earlier ones the sliding K/V when there is one."""
        n = kw.pop("num_layers", 2)
        last = FULL if FULL in target.layer_types else SLIDING
        types = tuple(SLIDING if (i < n - 1 and SLIDING in target.layer_types) else last for i in range(n))
        base = dict(
            target_hidden=target.hidden_size,
            hidden_size=target.hidden_size,
            intermediate_size=target.intermediate_size,
            num_layers=n,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            head_dim_full=target.head_dim_full,
            num_kv_heads_full=target.num_kv_heads_full,
            # Gemma 4 targets get the reference assistant's window, so exported drafters match it
            sliding_keys=target.sliding_window + 1 if target.arch == "gemma4" and target.sliding_window else 0,
            vocab_size=target.vocab_size,
            layer_types=types,
            rms_norm_eps=target.rms_norm_eps,
            activation=target.activation,
            query_scale=target.query_scale,
            # the target's own layer style, so a warm start can copy its last layer unchanged
            qk_norm=target.qk_norm,
            sandwich_norm=target.sandwich_norm,
            target_arch=target.arch,
            target_layer_types=target.layer_types,
        )
        base.update(kw)
        return cls(**base)

    def copy_sources(self) -> dict[str, int]:
        """Round-context entry -> target layer of each K/V the copy head reads (by default the
        entry of the drafter's last layer, -1: it is in the round context anyway)."""
        if not self.copy_layers:
            return {self.layer_types[-1]: -1}
        return {copy_key(layer, self.target_layer_types): layer for layer in self.copy_layers}

    def key_type(self, key: str) -> str:
        """Layer type of a round-context entry."""
        return self.target_layer_types[int(key[len(COPY) :])] if key.startswith(COPY) else key

    def type_head_dim(self, layer_type: str) -> int:
        return per_type(layer_type, self.head_dim, self.head_dim_full)

    def type_kv_heads(self, layer_type: str) -> int:
        return per_type(layer_type, self.num_kv_heads, self.num_kv_heads_full)

    def window(self, target: ModelConfig, layer_type: str) -> int | None:
        """Window of the read view (keys strictly before the query and within it) of a layer type."""
        if layer_type != SLIDING:
            return None
        return self.sliding_keys + 1 if self.sliding_keys else target.sliding_window

    def check_target(self, target: ModelConfig) -> None:
        """Refuse a drafter that was trained for a different target."""
        problems = []
        if self.target_hidden != target.hidden_size:
            problems.append(f"hidden size {self.target_hidden} != {target.hidden_size}")
        if self.vocab_size != target.vocab_size:
            problems.append(f"vocabulary {self.vocab_size} != {target.vocab_size}")
        if self.target_layer_types and self.target_layer_types != target.layer_types:
            problems.append("layer types differ")
        if any(t not in target.layer_types for t in self.layer_types):
            problems.append("reads a layer type the target does not have")
        elif any(
            self.type_kv_heads(t) != target.type_kv_heads(t) or self.type_head_dim(t) != target.type_head_dim(t)
            for t in set(self.layer_types)
        ):
            problems.append("KV heads/head_dim differ from the target's")
        n = len(target.layer_types)
        if self.copy_head and any(not 0 <= i < n for i in self.copy_layers):
            problems.append(f"its copy head reads layers {list(self.copy_layers)}, the target has {n}")
        elif self.copy_head and len({target.layer_types[i] for i in self.copy_layers}) > 1:
            problems.append("its copy head reads layers of different attention types")
        if problems:
            raise DrafterMismatchError("drafter does not belong to this target: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrafterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class DraftLayer(nn.Module):
    """Gemma-4-style decoder layer whose attention has queries only."""

    def __init__(self, cfg: DrafterConfig, layer_type: str):
        super().__init__()
        h, d = cfg.hidden_size, cfg.type_head_dim(layer_type)
        eps = cfg.rms_norm_eps
        self.layer_type = layer_type
        self.n_heads, self.head_dim, self.scale = cfg.num_heads, d, cfg.query_scale
        self.attn_norm = RMSNorm(h, eps)
        self.q = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.q_norm = RMSNorm(d, eps) if cfg.qk_norm else None
        self.o = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attn_norm = RMSNorm(h, eps) if cfg.sandwich_norm else None
        self.mlp_norm = RMSNorm(h, eps)
        self.gate = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)
        self.post_mlp_norm = RMSNorm(h, eps) if cfg.sandwich_norm else None
        self.gelu = cfg.activation == "gelu_tanh"
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.compiled = None
        """This layer as one compiled call (`fused.compile_draft_layer`), set by `load_drafter`."""

    def forward(self, x, ctx: RoundContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(self.attn_norm(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        cos, sin = ctx.rope[self.layer_type]
        q = apply_rope(q, cos, sin)
        k, v, view = ctx.kv[self.layer_type]
        a = attend(q.to(torch.promote_types(q.dtype, k.dtype)), k, v, view, self.scale).to(x.dtype)
        a = self.o(a.transpose(1, 2).reshape(B, T, -1))
        x = x + (a if self.post_attn_norm is None else self.post_attn_norm(a))
        y = self.mlp_norm(x)
        g = self.gate(y)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        m = self.down(g * self.up(y))
        x = x + (m if self.post_mlp_norm is None else self.post_mlp_norm(m))
        return x * self.layer_scalar


COPY = "copy"
"""Prefix of the round-context entry (and shard key) of a K/V only a copy head reads."""


def copy_key(layer: int, target_layer_types: tuple[str, ...]) -> str:
    """Round-context entry and shard key of target layer `layer`'s K/V for a copy head: its type
    when it is the last layer of that type (which every shard stores), else `copy<layer>`."""
    t = target_layer_types[layer]
    last = max(i for i, x in enumerate(target_layer_types) if x == t)
    return t if layer == last else f"{COPY}{layer}"


@dataclass
class RoundContext:
    """What stays fixed within a draft round: RoPE at the query position, and the target's K/V of
    each layer type with its mask (views into the target cache, no copies)."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    kv: dict[str, tuple[torch.Tensor, torch.Tensor, AttnView]]


class MTPDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.config = cfg
        self.pre_projection = nn.Linear(2 * cfg.target_hidden, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList(DraftLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_projection = nn.Linear(cfg.hidden_size, cfg.target_hidden, bias=False)
        head_dim = cfg.hidden_size if cfg.head == "own" else cfg.target_hidden
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size)) if cfg.head == "own" else None
        if cfg.num_centroids:
            self.centroids = nn.Linear(head_dim, cfg.num_centroids, bias=False)
            self.register_buffer("token_ordering", torch.arange(cfg.vocab_size, dtype=torch.long))
        else:
            self.centroids = None
        self.copy = CopyHead(cfg) if cfg.copy_head else None

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype: packed projections keep bf16 weights but take and return this."""
        return self.norm.weight.dtype

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> MTPDrafter:
        """Random initialisation for training (norms and layer scalars start at 1)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layer_scalar"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)
        if self.centroids is not None:
            self.token_ordering = torch.arange(self.config.vocab_size, dtype=torch.long)
        if self.copy is not None:
            self.copy.reset()
        return self

    # -- one round --------------------------------------------------------------------------------
    def round_context(self, target, cache, position: torch.Tensor) -> RoundContext:
        """Build the per-round context for query positions `position` [B] (the positions of the
        last accepted tokens). Reads the K/V of the target's last layer of each type in place."""
        tcfg = target.config
        pos = position[:, None]  # [B, 1]
        rope, kv = {}, {}
        for t in set(self.config.layer_types):
            inv = getattr(target, f"inv_freq_{t}")
            rope[t] = rope_tables(inv, pos, target.embed_dtype())
            view = cache.read_view(t, pos, strict=True, window=self.config.window(tcfg, t))
            k, v = cache.read(tcfg.last_layer_of(t), view.end)
            kv[t] = (k, v, view)
        c = self.config
        for key, layer in (c.copy_sources() if self.copy is not None else {}).items():
            if key not in kv:  # a layer only the copy head reads
                t = c.key_type(key)
                view = cache.read_view(t, pos, strict=True, window=c.window(tcfg, t))
                kv[key] = (*cache.read(layer, view.end), view)
                rope[key] = rope_tables(getattr(target, f"inv_freq_{t}"), pos, target.embed_dtype())
        return RoundContext(rope, kv)

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, ctx: RoundContext):
        """One draft step for every query row: emb, hidden [B, T, H_target] (scaled target
        embeddings of the input tokens, incoming hidden states) -> (head input, next hidden)."""
        x = self.pre_projection(torch.cat([emb, hidden], dim=-1))
        compiled = fused.takes(x) and fused.compiled_round_kv(ctx)
        for layer in self.layers:
            if compiled and layer.compiled is not None:
                k, v, view = ctx.kv[layer.layer_type]
                x = fused.run(layer.compiled, x, ctx.rope[layer.layer_type], k, v, view)
            else:
                x = layer(x, ctx)
        hd = self.norm(x)
        h_next = self.post_projection(hd)
        return (hd if self.config.head == "own" else h_next), h_next

    def step(self, target, tokens: torch.Tensor, hidden: torch.Tensor, ctx: RoundContext):
        """tokens [B], hidden [B, H_target] -> (head input [B, H_head], next hidden [B, H_target])."""
        emb = target.embed_tokens(tokens[:, None]).to(hidden.dtype)
        head_in, h_next = self(emb, hidden[:, None], ctx)
        return head_in[:, 0], h_next[:, 0]

    def scores(self, target, head_in: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Scores for one draft row head_in [H_head] -> (token ids [n] or None for all, scores [n])."""
        if self.centroids is None:
            if self.embed is not None:
                return None, (self.embed.to(head_in.dtype) @ head_in).float()
            return None, target.logits(head_in[None, None].to(target.embed_dtype()))[0, 0].float()
        ids = self.candidates(head_in[None])[0]
        if self.embed is not None:
            return ids, (self.embed.index_select(0, ids).to(head_in.dtype) @ head_in).float()
        return ids, target.head_scores(head_in, ids)

    def logits(self, target, head_in: torch.Tensor) -> torch.Tensor:
        """Dense scores [B, V] (clustered heads: -inf outside the kept clusters)."""
        rows = []
        for h in head_in:
            ids, s = self.scores(target, h)
            if ids is not None:
                s = torch.full((self.config.vocab_size,), float("-inf")).scatter(0, ids, s)
            rows.append(s)
        return torch.stack(rows)

    def candidates(self, head_in: torch.Tensor) -> torch.Tensor:
        """Token ids of the top `centroid_top_k` clusters [B, k * cluster_size]."""
        c = self.config
        top = self.centroids(head_in.to(self.dtype)).topk(c.centroid_top_k, dim=-1).indices
        per = self.token_ordering.view(c.num_centroids, -1)
        return per[top].flatten(1)


def load_drafter(directory: str | Path, target_config: ModelConfig, device="cpu") -> MTPDrafter:
    """Load a drafter folder (config.json + model.safetensors) and check it fits the target."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import gemma4_assistant as g4
    from .packed import QTensor

    d = Path(directory)
    try:
        raw = json.loads((d / "config.json").read_text())
        assistant = raw.get("model_type") == g4.MODEL_TYPE
        cfg = g4.assistant_config(raw, target_config) if assistant else DrafterConfig.from_dict(raw)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{d}: not a drafter folder ({e})") from None
    cfg.check_target(target_config)
    with torch.device("meta"):
        drafter = MTPDrafter(cfg)
    try:
        state = load_file(str(d / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{d}/model.safetensors: corrupt or missing ({e})") from None
    # our own folders ship bf16 or int8 matrices; an assistant's weights are packed to bf16 only
    # when stored so
    bf16 = True
    if assistant:
        state, bf16 = g4.assistant_state(state.items(), cfg)
    try:
        grouped = QTensor.collect(state)
    except KeyError as e:
        raise WeightsError(f"{d}: int8 drafter weights lack their scales ({e})") from None
    int8 = {k: v for k, v in grouped.items() if isinstance(v, QTensor)}
    state = {k: v for k, v in grouped.items() if not isinstance(v, QTensor)}
    state |= {f"{k}.weight": v.dequantize() for k, v in int8.items()}
    state = {k: (v.float() if v.is_floating_point() else v.long()).to(device) for k, v in state.items()}
    shapes = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    missing = set(shapes) - set(state)
    if missing:
        raise WeightsError(f"{d}: drafter weights lack {sorted(missing)[:3]}")
    unexpected = set(state) - set(shapes)
    if unexpected:
        raise WeightsError(f"{d}: unexpected drafter weights {sorted(unexpected)[:3]}")
    bad = [k for k, v in state.items() if tuple(v.shape) != shapes[k]]
    if bad:
        k = bad[0]
        raise WeightsError(f"{d}: drafter tensor {k} has shape {tuple(state[k].shape)}, expected {shapes[k]}")
    drafter.load_state_dict(state, assign=True, strict=True)
    if str(device) == "cpu" and bf16:
        pack_linears(drafter, int8)
        for layer in drafter.layers:
            layer.compiled = fused.compile_draft_layer(layer)
    return drafter.eval()


def pack_linears(module: nn.Module, int8: dict | None = None) -> None:
    """Run the drafter's projections through the CPU kernels in the form they were stored in:
    bf16, or the int8 blocks of `int8` (by module name). This changes no value, only the speed of
    one-row products."""
    from .packed import PackedLinear, packable

    int8 = int8 or {}
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear or child.bias is not None:
            continue
        weight = int8[name] if name in int8 else child.weight.to(torch.bfloat16)
        if packable(weight):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, PackedLinear(weight))


def save_drafter(drafter: MTPDrafter, directory: str | Path, record: dict | None = None, int8: bool = False) -> None:
    """Write a drafter folder. Matrices are stored in bf16, or with `int8` as block-scaled int8
    (Q8_0's layout, about half the size; the CPU runs them through the int8 kernel)."""
    from safetensors.torch import save_file

    from .packed import dense_state_dict, quantize_q8

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in dense_state_dict(drafter).items():
        if int8 and k.endswith(".weight") and v.dim() == 2 and v.shape[1] % 32 == 0:
            state |= quantize_q8(v).tensors(k.removesuffix(".weight"))
        else:
            # bf16 weights and int32 token ids halve the shipped size; loading widens them again
            state[k] = v.to(torch.bfloat16) if v.is_floating_point() else v.to(torch.int32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(drafter.config.to_dict(), indent=1))
    if record is not None:
        (d / "training.json").write_text(json.dumps(record, indent=1))
