"""Shared test utilities: tiny random Hugging Face models and our copies of them."""

from __future__ import annotations

import torch

from aheadlm.checkpoint import build_model, hf_state_dict
from aheadlm.config import from_hf_config
from aheadlm.guided import GuideTable


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


def packed_tiny(arch: str, fmt: str):
    """A tiny model with every matrix packed (bf16, or blocks of 32 with int8 or 4-bit values)."""
    from aheadlm.packed import quantize_q8

    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    hf = tiny_hf(arch, **shape)
    config = from_hf_config(hf.config.to_dict())
    tensors = []
    for name, t in hf_state_dict(hf.state_dict().items(), config):
        if t.dim() == 2 and name.endswith(".weight"):
            t = t.bfloat16() if fmt == "bf16" else quantize_q8(t)
            if fmt == "q4":  # values -8..7, kept two to a byte
                t.q = (t.q // 16).clamp(-8, 7)
        tensors.append((name, t))
    return config, build_model(config, tensors, packed=True)


def prefill_and_decode(engine, ids: list[int]):
    """The same tokens through `engine` prefilled in chunks and decoded one at a time: two caches
    and, for each, the last position's (logits, hidden)."""
    with torch.inference_mode():
        chunked = engine.new_cache(len(ids) + 10)
        logits, hidden = engine.prefill(chunked, ids)
        single = engine.new_cache(len(ids) + 10)
        for t in ids:
            last, h = engine._forward(single, [t], 1)
    return (chunked, (logits, hidden)), (single, (last[0, -1], h[0, -1]))


def assert_same_cache_and_output(a, b) -> None:
    """Two results of `prefill_and_decode`'s kind agree bit for bit: logits, hidden, every K/V."""
    (ca, (la, ha)), (cb, (lb, hb)) = a, b
    assert torch.equal(la, lb) and torch.equal(ha, hb)
    assert all(torch.equal(x, y) for x, y in zip(ca.k + ca.v, cb.k + cb.v, strict=True))


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


GEMMA4_FAMILIES = {
    # E2B-like: per-layer embeddings, KV sharing, double-wide MLP in shared layers, 2:1 pattern
    "e2b": dict(
        num_hidden_layers=6,
        num_key_value_heads=1,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=3,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=256,
        use_double_wide_mlp=True,
    ),
    # 31B-like: V = K on full layers with fewer global KV heads
    "31b": dict(
        num_hidden_layers=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    # 26B-A4B-like: mixture of experts beside the dense MLP, k_eq_v
    "moe": dict(
        num_hidden_layers=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
}


def tiny_gemma4_text_config(family: str):
    from transformers import Gemma4TextConfig

    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        max_position_embeddings=512,
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
    )
    kw.update(GEMMA4_FAMILIES[family])
    return Gemma4TextConfig(**kw)


def _randomize(model, std: float | None = None):
    """Noisy norms and layer scalars (and, with `std`, larger matrices) so every weight matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif std is not None and p.dim() == 2:
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model.float().eval()


def tiny_gemma4(family: str, seed: int = 0):
    """A small random Gemma 4 text model of one family (the oracle)."""
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    return _randomize(Gemma4ForCausalLM(tiny_gemma4_text_config(family)))


def tiny_gemma4_assistant(target_config, seed: int = 0, ordered: bool = True):
    """A random `gemma4_assistant` shaped to read `target_config`'s K/V (2 Q-only layers)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    t = target_config
    sliding, full = t.per_layer_config["sliding_attention"], t.per_layer_config["full_attention"]
    text = Gemma4TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=sliding.num_key_value_heads,
        num_global_key_value_heads=full.num_key_value_heads,
        attention_k_eq_v=t.attention_k_eq_v,
        head_dim=sliding.head_dim,
        global_head_dim=full.head_dim,
        sliding_window=t.sliding_window,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
    )
    cfg = Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=t.hidden_size,
        use_ordered_embeddings=ordered,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )
    model = Gemma4AssistantForCausalLM(cfg)
    if ordered:
        model.masked_embedding.token_ordering.copy_(torch.randperm(t.vocab_size))
    return _randomize(model, std=0.3)


@torch.no_grad()
def reference_drafts(hf_target, assistant, ids: list[int], k: int) -> list[int]:
    """transformers' assistant round, as its MTP candidate generator runs it, from the state where
    the target has processed ids[:-1] and ids[-1] is the newest token (position len(ids) - 1)."""
    x = torch.tensor([ids])
    out = hf_target(x[:, :-1], output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    h, kv = out.hidden_states[-1][:, -1:], dict(out.shared_kv_states)
    tok, pos = x[:, -1:], torch.tensor([[len(ids) - 1]])
    embed = hf_target.get_input_embeddings()
    drafts = []
    for _ in range(k):
        o = assistant(
            inputs_embeds=torch.cat([embed(tok), h], -1),
            position_ids=pos,
            shared_kv_states=kv,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            use_cache=False,
        )
        tok, h = o.logits.argmax(-1), o.last_hidden_state
        drafts.append(int(tok))
    return drafts


FRAGMENTS = [
    b"<eos>", b"", b"{", b"}", b"[", b"]", b'"', b":", b",", b" ", b"\n", b"    ", b'"a"', b'": ', b'", "',
    b"true", b"fal", b"se", b"null", b"0", b"1", b"23", b"-", b".", b"e", b"+", b"\\", b"n", b"u", b"00e9",
    b"}}", b"]}", b"}]", b'"}', b'":"', b"x", b"hello", b" world", b"\t", b"}\n", b'{"', b'"b', b"1,", b"[1",
    b"}}}}", b"]]]", b'\\"', b"\x01", b"\xc3", b"\xa9", b" {", b' "', b"\n  ", b"e-", b"<special>",
    *(bytes([c]) for c in b"abcdfghijklmopqrstvwyz"),  # with "e", "n", "u", "x" above: every letter alone
]  # fmt: skip


def toy_table(n=160):
    """A JSON-mode `GuideTable` for the tiny models' 160 ids: JSON fragments, then filler words;
    id 0 is a special end token."""
    words = [bytes([97 + i % 26, 97 + (i * 7) % 26]) * (1 + i % 3) for i in range(n)]
    vocab = (FRAGMENTS + words)[:n]
    special = [t in (b"<eos>", b"<special>") for t in vocab]
    return GuideTable(vocab, special)


def default_and_plain(name: str):
    """A registered model decoding as it does by default (speculatively), and an `LLM` decoding the
    same weights plainly: one load, not two."""
    import aheadlm
    from aheadlm.engine import Engine

    spec = aheadlm.load(name)
    plain = Engine(spec.engine.model, n_ctx=spec.engine.n_ctx)
    return spec, aheadlm.LLM(plain, spec.tokenizer, spec.name)
