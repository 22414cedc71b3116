"""Shared test utilities: tiny random Hugging Face models and our copies of them."""

from __future__ import annotations

import torch

from aheadlm.checkpoint import build_model, hf_state_dict
from aheadlm.config import from_hf_config


def tiny_hf(arch: str, seed: int = 0, **overrides):
    """A small random transformers model (the oracle). Norm weights are randomised too."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gemma3":
        kw = dict(
            vocab_size=160,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            max_position_embeddings=512,
            query_pre_attn_scalar=24,
            final_logit_softcapping=None,
        )
        kw.update(overrides)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    else:
        kw = dict(
            vocab_size=160,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        kw.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def ours_from_hf(hf_model, dtype=torch.float32):
    config = from_hf_config(hf_model.config.to_dict())
    tensors = hf_state_dict(hf_model.state_dict().items(), config)
    return build_model(config, tensors, dtype=dtype)


@torch.no_grad()
def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """Reference logits `[T, V]` for a whole sequence in one forward."""
    return hf_model(torch.tensor([ids])).logits[0].float()


def hf_reference(name: str):
    """transformers' model + tokenizer for a registered GGUF, loaded from the GGUF itself once and
    cached as safetensors (a GGUF load takes about a minute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aheadlm.registry import cache_dir, resolve

    gguf = resolve(name)
    out = cache_dir() / "hf-reference" / name
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(out))
