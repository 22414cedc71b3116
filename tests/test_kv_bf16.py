"""A bfloat16 KV cache (`kv_dtype="bfloat16"`): the kernels widen each stored value exactly and
round new K/V as torch does, so every exactness property of the float32 cache holds for it:
attention equals attention over the rounded values in float32, compiled layers equal the per-op
path, prefill equals decoding, and speculative decoding (every proposer, the server's batch
engine) gives plain decoding's tokens and log-probabilities."""

import pytest
import torch

import aheadlm
from aheadlm.engine import Engine
from aheadlm.errors import InvalidRequestError
from aheadlm.kernels import cpu_kernels
from aheadlm.kv_cache import KVCache
from aheadlm.proposers import HybridProposer, MTPProposer, NgramProposer
from aheadlm.speculative import SpecConfig
from test_speculative import PROMPTS, copying_drafter, random_drafter

from helpers import assert_same_cache_and_output, packed_tiny, prefill_and_decode

BF16 = torch.bfloat16


@pytest.mark.parametrize("d", [8, 64, 80, 256])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (9, 3)])
@pytest.mark.parametrize("window,strict", [(0, False), (7, False), (0, True)])
def test_attention_over_bfloat16_equals_float32_over_the_rounded_values(d, heads, kv_heads, window, strict):
    """Bit for bit, and still row by row: each row alone gives the batch's bits."""
    K, g = cpu_kernels(), torch.Generator().manual_seed(0)
    B, S, T = 2, 37, 5
    q = torch.randn(B, heads, T, d, generator=g)
    k, v = torch.randn(B, kv_heads, S, d, generator=g).to(BF16), torch.randn(B, kv_heads, S, d, generator=g).to(BF16)
    kpos = torch.arange(S).repeat(B, 1)
    kpos[1, 30:], kpos[0, 5] = -1, -1
    qpos = torch.stack([torch.arange(S - T, S), torch.arange(30 - T, 30)])
    out = K.attention(q, k, v, kpos, qpos, 0.3, window, strict)
    assert torch.equal(out, K.attention(q, k.float(), v.float(), kpos, qpos, 0.3, window, strict))
    for b in range(B):
        alone = K.attention(
            q[b : b + 1, :, 2:3], k[b : b + 1], v[b : b + 1], kpos[b : b + 1], qpos[b : b + 1, 2:3], 0.3, window, strict
        )
        assert torch.equal(alone[0, :, 0], out[b, :, 2])
    with pytest.raises(RuntimeError, match="bfloat16"):
        K.attention(q, k, v.float(), kpos, qpos, 0.3, window, strict)  # K and V of one type


@pytest.mark.parametrize("arch,fmt", [("llama", "q8"), ("gemma3", "q4")])
def test_compiled_layers_round_like_torch_and_equal_the_per_op_path(arch, fmt):
    """The first layer's stored K/V are the float32 cache's rounded by torch; the compiled layers
    and the per-op path give the same logits and caches over a bfloat16 cache."""
    config, model = packed_tiny(arch, fmt)
    ids = torch.randint(0, 160, (1, 40), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(40)[None]

    def run(dtype, compiled=True):
        saved = [b.compiled for b in model.layers]
        if not compiled:
            for b in model.layers:
                b.compiled = None
        cache = KVCache(config, 64, dtype=dtype, max_step=64)
        with torch.inference_mode():
            logits, _ = model(ids, pos, cache)
        for b, c in zip(model.layers, saved, strict=True):
            b.compiled = c
        return logits, cache

    _, wide = run(torch.float32)
    logits, narrow = run(BF16)
    assert narrow.k[0].dtype == BF16
    assert torch.equal(narrow.k[0], wide.k[0].to(BF16)) and torch.equal(narrow.v[0], wide.v[0].to(BF16))
    per_op_logits, per_op = run(BF16, compiled=False)
    assert torch.equal(logits, per_op_logits)
    assert all(torch.equal(a, b) for a, b in zip(narrow.k + narrow.v, per_op.k + per_op.v, strict=True))


@pytest.mark.parametrize("arch,fmt", [("llama", "q4"), ("gemma3", "q8")])
def test_bfloat16_cache_keeps_decoding_exact(arch, fmt):
    """Prefill equals decoding token by token; every proposer (with a copy head too) gives plain
    decoding's tokens and log-probabilities; so does the server's batch engine."""
    from aheadlm.sampling import SamplingParams
    from aheadlm.server.batching import BatchEngine, Request

    _, model = packed_tiny(arch, fmt)
    plain = Engine(model, kv_dtype=BF16, max_step=64)
    assert plain.exact_prefill
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    chunked, single = prefill_and_decode(plain, ids)
    assert chunked[0].k[0].dtype == BF16
    assert_same_cache_and_output(chunked, single)

    def run(engine, prompt):
        steps = list(engine.generate(prompt, max_tokens=24, logprobs=2))
        return [t for s in steps for t in s.token_ids], [
            (x.token_id, x.logprob, x.top) for s in steps for x in s.logprobs
        ]

    proposers = {
        "ngram": NgramProposer(),
        "mtp": MTPProposer(random_drafter(model)),
        "ngram+mtp-copy": HybridProposer(NgramProposer(), MTPProposer(copying_drafter(model)), fallback_k=2),
    }
    want = [run(plain, p) for p in PROMPTS]
    for name, prop in proposers.items():
        spec = Engine(model, proposer=prop, spec=SpecConfig(4), kv_dtype=BF16)
        assert [run(spec, p) for p in PROMPTS] == want, name

    batch = BatchEngine(
        model, drafter=random_drafter(model, seed=3), ngram=True, num_draft=3, slots=4, n_ctx=64, kv_dtype=BF16
    )
    assert batch.cache.k[0].dtype == BF16
    got = [[] for _ in PROMPTS]
    for i, p in enumerate(PROMPTS):
        batch.admit(Request(p, SamplingParams(), 24, (), emit=lambda t, *_, i=i: got[i].extend(t)))
    while batch.active:
        batch.step()
    assert got == [w[0] for w in want]


@pytest.mark.realmodel
def test_real_model_with_bfloat16_cache():
    """SmolLM2 with a bfloat16 cache: its default (lookup) gives plain decoding's tokens, a kept
    prompt cache gives the same answer again, and a bad `kv_dtype` is a clear error."""
    llm = aheadlm.load("smollm2-135m", kv_dtype="bfloat16")
    plain = aheadlm.load("smollm2-135m", drafter="none", kv_dtype="bfloat16")
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    first = llm.chat(msgs, max_tokens=48)
    assert first.token_ids == plain.chat(msgs, max_tokens=48).token_ids
    again = llm.chat(msgs, max_tokens=48)
    assert again.stats.cached_tokens > 0 and again.token_ids == first.token_ids
    for bad in ("int8", "float16x"):
        with pytest.raises(InvalidRequestError):
            aheadlm.load("smollm2-135m", kv_dtype=bad)
    with pytest.raises(InvalidRequestError, match="KV cache"):
        Engine(plain.engine.model, kv_dtype=torch.float16)
