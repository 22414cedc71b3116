"""Model configuration: one typed dataclass for every supported decoder, built from a Hugging Face
`config.json` or from GGUF metadata."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedModelError, WeightsError

FULL = "full"
SLIDING = "sliding"
ARCHITECTURES = ("gemma3", "gemma4", "llama")


def per_type(layer_type: str, value: int, full_value: int) -> int:
    """A shape that full-attention layers may override (Gemma 4): `full_value` when set there."""
    return full_value if layer_type == FULL and full_value else value


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type."""

    theta: float = 10000.0
    """Base wavelength."""
    kind: str = "default"
    """default | linear | llama3 | proportional (Gemma 4: only the first `partial` of the angles rotate)."""
    factor: float = 1.0
    """Position divisor (linear) or low-frequency divisor (llama3)."""
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    partial: float = 1.0
    """proportional: fraction of head_dim that rotates; the other frequencies are 0."""

    def inv_freq(self, head_dim: int):
        """Inverse frequencies `[head_dim // 2]` (float32) after scaling."""
        import torch

        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (self.theta**exps)
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "llama3":
            low_wavelen = self.original_max_position / self.low_freq_factor
            high_wavelen = self.original_max_position / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, smoothed, scaled)
        if self.kind == "proportional":
            angles = int(self.partial * head_dim // 2)
            rotated = 1.0 / (self.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
            return torch.cat([rotated, torch.zeros(head_dim // 2 - angles)]) / self.factor
        if self.kind != "default":
            raise UnsupportedModelError(f"RoPE scaling type {self.kind!r} is not supported")
        return inv


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only target model."""

    arch: str
    """gemma3 | llama."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    """Context length the model was trained for."""
    rms_norm_eps: float = 1e-6
    layer_types: tuple[str, ...] = ()
    """Per layer: "full" or "sliding"."""
    sliding_window: int | None = None
    """Sliding layers see the last `sliding_window` positions, their own included."""
    rope_full: RopeConfig = field(default_factory=RopeConfig)
    rope_sliding: RopeConfig = field(default_factory=RopeConfig)
    tie_embeddings: bool = True
    embed_scale: float = 1.0
    """Input embeddings are multiplied by this (Gemma: sqrt(hidden))."""
    query_scale: float = 0.0
    """Attention score scale; 0 means 1/sqrt(head_dim)."""
    qk_norm: bool = False
    sandwich_norm: bool = False
    """Gemma's extra norms after attention and after the MLP."""
    activation: str = "silu"
    """silu | gelu_tanh."""
    final_logit_softcap: float | None = None
    attention_bias: bool = False
    # Gemma 4 (all defaults leave Gemma 3 / Llama unchanged)
    head_dim_full: int = 0
    """Head dim of full-attention layers (Gemma 4: global_head_dim); 0 = head_dim."""
    num_kv_heads_full: int = 0
    """KV heads of full-attention layers (Gemma 4 with k_eq_v); 0 = num_kv_heads."""
    value_norm: bool = False
    """V goes through an RMSNorm without scale."""
    k_eq_v: bool = False
    """Full-attention layers have no v projection: V is the k projection's output."""
    num_kv_shared_layers: int = 0
    """The last n layers compute no K/V: they read those of the last earlier layer of their type."""
    per_layer_dim: int = 0
    """Per-layer embeddings (Gemma 4 E2B/E4B): width of each layer's extra input; 0 = none."""
    per_layer_vocab: int = 0
    double_wide_mlp: bool = False
    """KV-shared layers have twice the intermediate size."""
    num_experts: int = 0
    """Mixture-of-experts feed-forward beside the dense MLP (Gemma 4 26B-A4B); 0 = none."""
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    layer_scalar: bool = False
    """Each layer's output is multiplied by a stored scalar."""

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        # A hand-edited or damaged config must fail here, not as a shape error deep in torch.
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise WeightsError(f"config {name} must be a positive integer, got {v!r}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError("layer_types must list every layer")
        if self.query_scale == 0.0:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)
        if any(self.num_heads % self.type_kv_heads(t) for t in self.group_types):
            raise UnsupportedModelError("num_heads must be a multiple of num_kv_heads")
        first_shared = self.num_layers - self.num_kv_shared_layers
        if self.num_kv_shared_layers and not set(self.layer_types[first_shared:]) <= set(
            self.layer_types[:first_shared]
        ):
            raise UnsupportedModelError("KV-shared layers need an earlier layer of their type that computes K/V")

    @property
    def group_types(self) -> tuple[str, ...]:
        """Layer types present, in a fixed order (full first)."""
        return tuple(t for t in (FULL, SLIDING) if t in self.layer_types)

    def last_layer_of(self, layer_type: str) -> int:
        """Index of the last layer of a type that computes K/V (the MTP drafter reads its K/V; with
        KV sharing, later layers of that type read it too)."""
        first_shared = self.num_layers - self.num_kv_shared_layers
        return max(i for i, t in enumerate(self.layer_types[:first_shared]) if t == layer_type)

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V `layer` attends over (itself unless KV-shared)."""
        if layer < self.num_layers - self.num_kv_shared_layers:
            return layer
        return self.last_layer_of(self.layer_types[layer])

    def type_head_dim(self, layer_type: str) -> int:
        return per_type(layer_type, self.head_dim, self.head_dim_full)

    def type_kv_heads(self, layer_type: str) -> int:
        return per_type(layer_type, self.num_kv_heads, self.num_kv_heads_full)

    def layer_intermediate(self, layer: int) -> int:
        shared = self.kv_source(layer) != layer
        return self.intermediate_size * (2 if self.double_wide_mlp and shared else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in ("rope_full", "rope_sliding"):
            if isinstance(d.get(key), dict):
                d[key] = RopeConfig(**d[key])
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h = self.hidden_size
        total = self.vocab_size * h * (1 if self.tie_embeddings else 2) + h  # + final norm
        for layer, t in enumerate(self.layer_types):
            d = self.type_head_dim(t)
            total += 2 * h * self.num_heads * d + 3 * h * self.layer_intermediate(layer)
            total += (4 * h + (d if self.qk_norm else 0)) if self.sandwich_norm else 2 * h  # norms
            if self.kv_source(layer) == layer:
                total += h * self.type_kv_heads(t) * d * (1 if self.k_eq_v and t == FULL else 2)
                total += d if self.qk_norm else 0
            if self.num_experts:
                e = self.num_experts
                total += e * 3 * h * self.moe_intermediate_size + h * e + e + 4 * h
            if self.per_layer_dim:
                total += 2 * h * self.per_layer_dim + h
            total += 1 if self.layer_scalar else 0
        if self.per_layer_dim:
            total += (self.per_layer_vocab + h) * self.num_layers * self.per_layer_dim + self.per_layer_dim
        return total


def rope_from_hf(params: dict[str, Any] | None, theta: float) -> RopeConfig:
    if not params:
        return RopeConfig(theta=theta)
    kind = params.get("rope_type", params.get("type", "default"))
    return RopeConfig(
        theta=float(params.get("rope_theta", theta)),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        partial=float(params.get("partial_rotary_factor", 1.0)),
    )


def _gemma3_layer_types(n: int, pattern: int = 6) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))


def gemma4_full_overrides(cfg: dict[str, Any]) -> tuple[int, int]:
    """(head dim, KV heads) of Gemma 4 full-attention layers, from Google's `global_head_dim` /
    `num_global_key_value_heads` keys or from transformers' `per_layer_config` overrides."""
    per_layer = cfg.get("per_layer_config")
    if per_layer:
        types = cfg["layer_types"]
        overrides = {int(i): o for i, o in per_layer.items() if str(i).isdigit()}
        if any(types[i] != "full_attention" for i in overrides):
            raise UnsupportedModelError("per-layer overrides on sliding layers are not supported")
        distinct = {tuple(sorted(o.items())) for o in overrides.values()}
        if len(distinct) > 1:
            raise UnsupportedModelError("full-attention layers with different shapes are not supported")
        o = overrides[min(overrides)] if overrides else {}
        extra = set(o) - {"head_dim", "num_key_value_heads"}
        if extra:
            raise UnsupportedModelError(f"per-layer overrides of {sorted(extra)} are not supported")
        return o.get("head_dim", cfg["head_dim"]), o.get("num_key_value_heads", 0)
    kv = cfg.get("num_global_key_value_heads") if cfg.get("attention_k_eq_v") else None
    return cfg.get("global_head_dim", 512), kv or 0


def _gemma4_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError("Gemma 4 with bidirectional attention is not a decoder; not supported")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("Gemma 4 with attention biases is not supported")
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"Gemma 4 activation {act!r} is not supported")
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    types = list(cfg.get("layer_types") or _gemma3_layer_types(n))
    types[-1] = "full_attention"  # as transformers forces it
    cfg = {**cfg, "layer_types": types}
    head_dim_full, kv_full = gemma4_full_overrides(cfg)
    rope = cfg.get("rope_parameters") or {}
    default_full = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    moe = bool(cfg.get("enable_moe_block"))
    return ModelConfig(
        arch="gemma4",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=n,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or 256,
        max_position=cfg.get("max_position_embeddings", 131072),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        layer_types=tuple(SLIDING if t == "sliding_attention" else FULL for t in types),
        sliding_window=cfg.get("sliding_window", 512),
        rope_full=rope_from_hf(rope.get("full_attention") or default_full, 1e6),
        rope_sliding=rope_from_hf(rope.get("sliding_attention"), 1e4),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        embed_scale=cfg["hidden_size"] ** 0.5,
        query_scale=1.0,
        qk_norm=True,
        sandwich_norm=True,
        activation="gelu_tanh",
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        head_dim_full=head_dim_full,
        num_kv_heads_full=kv_full,
        value_norm=True,
        k_eq_v=bool(cfg.get("attention_k_eq_v")),
        num_kv_shared_layers=cfg.get("num_kv_shared_layers") or 0,
        per_layer_dim=cfg.get("hidden_size_per_layer_input") or 0,
        per_layer_vocab=cfg.get("vocab_size_per_layer_input") or 0,
        double_wide_mlp=bool(cfg.get("use_double_wide_mlp")),
        num_experts=(cfg.get("num_experts") or 0) if moe else 0,
        top_k_experts=(cfg.get("top_k_experts") or 0) if moe else 0,
        moe_intermediate_size=(cfg.get("moe_intermediate_size") or 0) if moe else 0,
        layer_scalar=True,
    )


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` (transformers 4.x or 5.x layout)."""
    model_type = cfg.get("model_type", "")
    if model_type == "gemma4" and "text_config" in cfg:
        cfg, model_type = cfg["text_config"], "gemma4_text"  # vision/audio towers are not loaded
    if model_type == "gemma4_text":
        return _gemma4_from_hf(cfg)
    if model_type == "gemma4_assistant" or "target_hidden" in cfg:  # target_hidden: our drafter folders
        kind = "a Gemma 4 assistant" if model_type else "a drafter folder from train-drafter"
        raise UnsupportedModelError(f"this is {kind} (MTP drafter), not a target model: pass it with --drafter")
    if model_type == "gemma3" and "text_config" in cfg:
        cfg, model_type = cfg["text_config"], "gemma3_text"
    if model_type not in ("gemma3_text", "gemma3", "llama", "mistral"):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: gemma3, gemma3_text, gemma4, gemma4_text, llama)"
        )
    heads = cfg["num_attention_heads"]
    common = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
    )
    rope_params = cfg.get("rope_parameters") or {}
    if model_type in ("gemma3_text", "gemma3"):
        n = common["num_layers"]
        types = cfg.get("layer_types")
        layer_types = (
            tuple(SLIDING if t == "sliding_attention" else FULL for t in types)
            if types
            else _gemma3_layer_types(n, cfg.get("sliding_window_pattern", 6))
        )
        if "full_attention" in rope_params:  # transformers 5 layout
            rope_full = rope_from_hf(rope_params["full_attention"], 1e6)
            rope_sliding = rope_from_hf(rope_params.get("sliding_attention"), 1e4)
        else:
            rope_full = rope_from_hf(cfg.get("rope_scaling"), cfg.get("rope_theta", 1e6))
            rope_sliding = RopeConfig(theta=cfg.get("rope_local_base_freq", 1e4))
        return ModelConfig(
            arch="gemma3",
            **common,
            max_position=cfg.get("max_position_embeddings", 32768),
            layer_types=layer_types,
            sliding_window=cfg.get("sliding_window", 4096),
            rope_full=rope_full,
            rope_sliding=rope_sliding,
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            embed_scale=common["hidden_size"] ** 0.5,
            query_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5,
            qk_norm=True,
            sandwich_norm=True,
            activation="gelu_tanh",
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            attention_bias=cfg.get("attention_bias", False),
        )
    if model_type in ("llama", "mistral"):
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("llama models with mlp_bias are not supported")
        if cfg.get("sliding_window"):
            raise UnsupportedModelError("llama/mistral models with a sliding window are not supported")
        rope = rope_params if "rope_theta" in rope_params else cfg.get("rope_scaling")
        return ModelConfig(
            arch="llama",
            **common,
            max_position=cfg.get("max_position_embeddings", 4096),
            rope_full=rope_from_hf(rope, cfg.get("rope_theta", 1e4)),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
        )
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported (supported: gemma3, gemma3_text, llama)")


def from_gguf_metadata(md: dict[str, Any], has_output_tensor: bool) -> ModelConfig:
    """Build a ModelConfig from GGUF key/value metadata (llama.cpp's key names)."""
    arch = md.get("general.architecture")
    if arch not in ("gemma3", "llama"):
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: gemma3, llama; Gemma 4 loads from"
            " Hugging Face folders)"
        )

    def get(key, default=None):
        return md.get(f"{arch}.{key}", default)

    for key in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length"):
        if get(key) is None:
            raise KeyError(f"{arch}.{key}")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    vocab = get("vocab_size") or len(md["tokenizer.ggml.tokens"])
    scaling = get("rope.scaling.type")
    rope_full = RopeConfig(
        theta=float(get("rope.freq_base", 1e4 if arch == "llama" else 1e6)),
        kind="linear" if scaling == "linear" else "default",
        factor=float(get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
    )
    if scaling not in (None, "none", "linear"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv") or heads,
        head_dim=head_dim,
        max_position=get("context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_full=rope_full,
        tie_embeddings=not has_output_tensor,
    )
    if arch == "gemma3":
        n = common["num_layers"]
        # llama.cpp: Gemma 3 27B (62 layers) scales queries by hidden/heads, the others by head_dim.
        qpas = hidden // heads if n == 62 else head_dim
        return ModelConfig(
            arch="gemma3",
            **common,
            layer_types=_gemma3_layer_types(n),
            sliding_window=get("attention.sliding_window", 4096),
            rope_sliding=RopeConfig(theta=10000.0),
            embed_scale=hidden**0.5,
            query_scale=qpas**-0.5,
            qk_norm=True,
            sandwich_norm=True,
            activation="gelu_tanh",
            final_logit_softcap=get("final_logit_softcapping"),
        )
    return ModelConfig(arch="llama", **common)
