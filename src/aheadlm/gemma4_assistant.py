"""Google's Gemma 4 assistant (MTP drafter) checkpoints <-> our MTPDrafter.

A `gemma4_assistant` folder (transformers' layout) holds Q-only Gemma 4 decoder layers, pre/post
projections and its own tied embedding table as the head, with an optional centroid ("masked
embedding") head. It maps one-to-one onto `MTPDrafter` with `head="own"`. `export_assistant`
writes the reverse, so a drafter trained here for a Gemma 4 target can be served by vLLM or run by
transformers; a drafter trained with the target's head (`head="target"`) is exported exactly by
folding the post-projection into its head: E_t @ W_post scores hd as E_t scores W_post @ hd.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import FULL, SLIDING, ModelConfig, gemma4_full_overrides, rope_from_hf
from .drafter import DrafterConfig, MTPDrafter
from .errors import DrafterMismatchError, UnsupportedModelError, WeightsError
from .packed import dense_state_dict

# transformers' assistant parameter names (after "model.layers.{i}.") -> ours (after "layers.{i}.")
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q.weight",
    "self_attn.q_norm.weight": "q_norm.weight",
    "self_attn.o_proj.weight": "o.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "mlp.gate_proj.weight": "gate.weight",
    "mlp.up_proj.weight": "up.weight",
    "mlp.down_proj.weight": "down.weight",
    "layer_scalar": "layer_scalar",
}
_TOP = {
    "model.norm.weight": "norm.weight",
    "model.embed_tokens.weight": "embed",
    "lm_head.weight": "embed",
    "pre_projection.weight": "pre_projection.weight",
    "post_projection.weight": "post_projection.weight",
    "masked_embedding.centroids.weight": "centroids.weight",
    "masked_embedding.token_ordering": "token_ordering",
}


MODEL_TYPE = "gemma4_assistant"


def is_assistant_folder(d: Path) -> bool:
    try:
        return json.loads((d / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def assistant_config(hf: dict[str, Any], target: ModelConfig) -> DrafterConfig:
    """Our drafter config for a `gemma4_assistant` config.json, checked against the target."""
    if target.arch != "gemma4":
        raise DrafterMismatchError(f"a Gemma 4 assistant needs a Gemma 4 target, not {target.arch}")
    tc = hf.get("text_config") or {}
    for key in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp"):
        if tc.get(key):
            raise UnsupportedModelError(f"Gemma 4 assistant with {key} is not supported")
    n = tc["num_hidden_layers"]
    types = tuple(SLIDING if t == "sliding_attention" else FULL for t in tc["layer_types"])
    head_dim_full, kv_full = gemma4_full_overrides(tc)
    rope = tc.get("rope_parameters") or {}
    ropes = {FULL: target.rope_full, SLIDING: target.rope_sliding}
    for t, key in ((FULL, "full_attention"), (SLIDING, "sliding_attention")):
        if t in types and rope.get(key) and rope_from_hf(rope[key], ropes[t].theta) != ropes[t]:
            raise DrafterMismatchError(f"assistant {key} RoPE differs from the target's")
    ordered = bool(hf.get("use_ordered_embeddings"))
    cfg = DrafterConfig(
        target_hidden=hf["backbone_hidden_size"],
        hidden_size=tc["hidden_size"],
        intermediate_size=tc["intermediate_size"],
        num_layers=n,
        num_heads=tc["num_attention_heads"],
        num_kv_heads=tc.get("num_key_value_heads") or tc["num_attention_heads"],
        head_dim=tc.get("head_dim") or 256,
        head_dim_full=head_dim_full,
        num_kv_heads_full=kv_full,
        vocab_size=tc["vocab_size"],
        layer_types=types,
        rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
        query_scale=1.0,
        head="own",
        num_centroids=hf.get("num_centroids", 2048) if ordered else 0,
        centroid_top_k=hf.get("centroid_intermediate_top_k", 32),
        target_arch="gemma4",
        # transformers' flipped bidirectional sliding mask shows the query window + 1 cached keys
        sliding_keys=tc.get("sliding_window", 512) + 1,
    )
    cfg.check_target(target)
    return cfg


def assistant_state(tensors, cfg: DrafterConfig) -> tuple[dict[str, torch.Tensor], bool]:
    """(our state dict, whether the weights were bf16) from (name, tensor) pairs."""
    state, bf16 = {}, False
    for name, t in tensors:
        ours = _TOP.get(name)
        if ours is None and name.startswith("model.layers."):
            i, _, rest = name[len("model.layers.") :].partition(".")
            ours = f"layers.{i}.{_LAYER[rest]}" if rest in _LAYER else None
        if ours is None:
            continue
        bf16 |= t.dtype == torch.bfloat16
        state[ours] = t.float() if t.is_floating_point() else t.long()
    if cfg.num_centroids and "token_ordering" in state:
        order = state["token_ordering"]
        if sorted(order.tolist()) != list(range(cfg.vocab_size)):
            raise WeightsError("assistant token_ordering is not a permutation of the vocabulary")
    return state, bf16


def export_assistant(drafter: MTPDrafter, target: ModelConfig, target_head: torch.Tensor, out: str | Path) -> Path:
    """Write `drafter` (trained for the Gemma 4 `target`) as a transformers `gemma4_assistant`
    folder. `target_head` [V, H_target] is the target's output head (needed for `head="target"`)."""
    from safetensors.torch import save_file

    c = drafter.config
    if target.arch != "gemma4":
        raise UnsupportedModelError("export-drafter writes Gemma 4 assistants: the target must be Gemma 4")
    if c.copy_head:
        raise UnsupportedModelError("a drafter with a copy head cannot be exported: Gemma 4 assistants have none")
    c.check_target(target)
    if c.activation != "gelu_tanh" or not c.qk_norm or c.query_scale != 1.0:
        raise UnsupportedModelError("only Gemma-4-shaped drafters (gelu, q-norm, query scale 1) can be exported")
    if c.window(target, SLIDING) != target.sliding_window + 2 and SLIDING in c.layer_types:
        raise UnsupportedModelError("the drafter's sliding window differs from a Gemma 4 assistant's")
    sd = {k: v.detach().float() for k, v in dense_state_dict(drafter).items()}
    w_post = sd["post_projection.weight"]  # [H_target, H_d]
    tensors = {
        "pre_projection.weight": sd["pre_projection.weight"],
        "post_projection.weight": w_post,
        "model.norm.weight": sd["norm.weight"],
        # the own head scores hd; a target head scored post_projection(hd)
        "model.embed_tokens.weight": sd["embed"] if c.head == "own" else target_head.float() @ w_post,
    }
    if c.num_centroids:
        cent = sd["centroids.weight"]
        tensors["masked_embedding.centroids.weight"] = cent if c.head == "own" else cent @ w_post
        tensors["masked_embedding.token_ordering"] = drafter.token_ordering.long()
    back = {v: k for k, v in _LAYER.items()}
    for name, t in sd.items():
        if name.startswith("layers."):
            i, _, rest = name[len("layers.") :].partition(".")
            tensors[f"model.layers.{i}.{back[rest]}"] = t
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(_hf_config(c, target), indent=2))
    return out


def _rope_dict(r) -> dict[str, Any]:
    d = {"rope_type": r.kind, "rope_theta": r.theta}
    if r.kind == "proportional":
        d["partial_rotary_factor"] = r.partial
    return d


def _hf_config(c: DrafterConfig, target: ModelConfig) -> dict[str, Any]:
    text = {
        "model_type": "gemma4_text",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "global_head_dim": c.type_head_dim(FULL),
        "attention_k_eq_v": target.k_eq_v,
        "num_global_key_value_heads": c.type_kv_heads(FULL) if target.k_eq_v else None,
        "layer_types": [("sliding_attention" if t == SLIDING else "full_attention") for t in c.layer_types],
        "sliding_window": target.sliding_window,
        "rope_parameters": {
            "full_attention": _rope_dict(target.rope_full),
            "sliding_attention": _rope_dict(target.rope_sliding),
        },
        "num_kv_shared_layers": c.num_layers,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "max_position_embeddings": target.max_position,
        "tie_word_embeddings": True,
    }
    return {
        "architectures": ["Gemma4AssistantForCausalLM"],
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": c.target_hidden,
        "use_ordered_embeddings": bool(c.num_centroids),
        "num_centroids": c.num_centroids or 2048,
        "centroid_intermediate_top_k": c.centroid_top_k,
        "tie_word_embeddings": True,
        "text_config": text,
    }
