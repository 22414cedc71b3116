"""Model configuration: one typed dataclass for every supported decoder, built from a Hugging Face
`config.json` or from GGUF metadata."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedModelError

FULL = "full"
SLIDING = "sliding"
ARCHITECTURES = ("gemma3", "llama")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type."""

    theta: float = 10000.0
    """Base wavelength."""
    kind: str = "default"
    """default | linear | llama3."""
    factor: float = 1.0
    """Position divisor (linear) or low-frequency divisor (llama3)."""
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

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

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError("layer_types must list every layer")
        if self.query_scale == 0.0:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError("num_heads must be a multiple of num_kv_heads")

    @property
    def group_types(self) -> tuple[str, ...]:
        """Layer types present, in a fixed order (full first)."""
        return tuple(t for t in (FULL, SLIDING) if t in self.layer_types)

    def last_layer_of(self, layer_type: str) -> int:
        """Index of the last layer of a type (the MTP drafter reads its K/V)."""
        return max(i for i, t in enumerate(self.layer_types) if t == layer_type)

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
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * q * 2 + h * kv * 2 + 3 * h * i
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return emb + self.num_layers * per_layer


def _rope_from_hf(params: dict[str, Any] | None, theta: float) -> RopeConfig:
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
    )


def _gemma3_layer_types(n: int, pattern: int = 6) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` (transformers 4.x or 5.x layout)."""
    model_type = cfg.get("model_type", "")
    if model_type == "gemma3" and "text_config" in cfg:
        cfg, model_type = cfg["text_config"], "gemma3_text"
    if model_type not in ("gemma3_text", "gemma3", "llama", "mistral"):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: gemma3, gemma3_text, llama)"
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
            rope_full = _rope_from_hf(rope_params["full_attention"], 1e6)
            rope_sliding = _rope_from_hf(rope_params.get("sliding_attention"), 1e4)
        else:
            rope_full = _rope_from_hf(cfg.get("rope_scaling"), cfg.get("rope_theta", 1e6))
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
            rope_full=_rope_from_hf(rope, cfg.get("rope_theta", 1e4)),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
        )
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported (supported: gemma3, gemma3_text, llama)")


def from_gguf_metadata(md: dict[str, Any], has_output_tensor: bool) -> ModelConfig:
    """Build a ModelConfig from GGUF key/value metadata (llama.cpp's key names)."""
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )

    def get(key, default=None):
        return md.get(f"{arch}.{key}", default)

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
