"""Our model vs transformers on tiny random configs: prefill, warm-cache multi-token forwards,
rollback, and sequences longer than the sliding window (the ring cache wraps)."""

import pytest
import torch

from aheadlm.kv_cache import KVCache

from helpers import hf_logits, ours_from_hf, tiny_hf

ATOL = 2e-4

CONFIGS = {
    "gemma3": dict(arch="gemma3"),
    "gemma3-softcap": dict(arch="gemma3", final_logit_softcapping=30.0),
    "gemma3-linear-rope": dict(
        arch="gemma3",
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama3-rope": dict(
        arch="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


def run(model, cache, ids, start):
    x = torch.tensor([ids])
    pos = torch.arange(start, start + len(ids))[None]
    with torch.no_grad():
        logits, hidden = model(x, pos, cache)
    return logits[0], hidden[0]


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request):
    kw = dict(CONFIGS[request.param])
    hf = tiny_hf(kw.pop("arch"), **kw)
    return hf, ours_from_hf(hf)


def test_prefill_matches(pair):
    hf, ours = pair
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, ids)
    cache = KVCache(ours.config, 64)
    logits, _ = run(ours, cache, ids, 0)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


def test_incremental_rollback_and_window(pair):
    """Chunks of 1..5 tokens on a warm cache, a rollback in between, past the 8-token window with a
    ring of 8 + max_step slots."""
    hf, ours = pair
    ids = torch.randint(0, 160, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = hf_logits(hf, ids)
    cache = KVCache(ours.config, 64, max_step=6)
    assert any(g.ring for g in cache.groups.values()) == (ours.config.arch == "gemma3")
    n = 0
    sizes = [6, 1, 3, 5, 2, 4, 1, 6, 3, 2, 5, 1, 6, 4, 5, 6]
    for i, size in enumerate(sizes):
        chunk = ids[n : n + size]
        if not chunk:
            break
        logits, _ = run(ours, cache, chunk, n)
        torch.testing.assert_close(logits, ref[n : n + len(chunk)], atol=ATOL, rtol=0)
        n += len(chunk)
        if i % 3 == 2 and len(chunk) > 1:
            # Speculative-style rollback: forget the last tokens and run them again.
            n -= len(chunk) - 1
            cache.trim(n)
    assert n > 40


def test_decode_past_window_without_ring(pair):
    """One token at a time with a cache too small for a ring: sliding layers must still mask."""
    hf, ours = pair
    ids = torch.randint(0, 160, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = hf_logits(hf, ids)
    cache = KVCache(ours.config, 32)  # window 8 + max_step 256 > 32: full-size sliding cache
    assert not any(g.ring for g in cache.groups.values())
    run(ours, cache, ids[:3], 0)
    for i in range(3, 30):
        logits, _ = run(ours, cache, ids[i : i + 1], i)
        torch.testing.assert_close(logits[0], ref[i], atol=ATOL, rtol=0)


def test_draft_garbage_then_rollback(pair):
    """Wrong tokens written then rolled back must leave no trace."""
    hf, ours = pair
    ids = torch.randint(0, 160, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = hf_logits(hf, ids)
    cache = KVCache(ours.config, 64, max_step=6)
    for s in range(0, 18, 6):
        run(ours, cache, ids[s : s + 6], s)
    run(ours, cache, [7, 7, 7, 7, 7], 18)  # rejected drafts
    cache.trim(18)
    logits, _ = run(ours, cache, ids[18:24], 18)
    torch.testing.assert_close(logits, ref[18:24], atol=ATOL, rtol=0)


def test_trim_beyond_ring_refused():
    hf = tiny_hf("gemma3")
    ours = ours_from_hf(hf)
    cache = KVCache(ours.config, 64, max_step=4)
    for s in range(0, 20, 4):
        run(ours, cache, [1, 2, 3, 4], s)
    with pytest.raises(ValueError, match="overwritten"):
        cache.trim(10)
    cache.trim(17)
    assert cache.length == 17


def test_hidden_is_post_norm(pair):
    hf, ours = pair
    ids = [3, 5, 7, 11, 13]
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    cache = KVCache(ours.config, 16)
    _, hidden = run(ours, cache, ids, 0)
    torch.testing.assert_close(hidden, out.hidden_states[-1][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_embed_pools_the_final_hidden_states(arch):
    """Mean pooling over a text longer than one prefill chunk equals the mean of one whole
    forward's final-norm states (first left out with skip_first); `last` is the last state; both
    unit length; bad input is a clear error."""
    from aheadlm.engine import Engine
    from aheadlm.errors import ContextLengthError, InvalidRequestError

    model = ours_from_hf(tiny_hf(arch, seed=2))
    engine = Engine(model, n_ctx=256)
    tokens = [(7 * i) % 150 + 3 for i in range(150)]
    with torch.no_grad():
        _, hidden = model(torch.tensor([tokens]), torch.arange(150)[None], KVCache(model.config, 256), num_logits=0)
    h = hidden[0].double()
    for got, want in [
        (engine.embed(tokens), h.mean(0)),
        (engine.embed(tokens, skip_first=True), h[1:].mean(0)),
        (engine.embed(tokens, "last"), h[-1]),
    ]:
        assert torch.allclose(got.double(), want / want.norm(), atol=1e-5)
    for bad, error in [([], InvalidRequestError), ([1] * 300, ContextLengthError), ([10**6], InvalidRequestError)]:
        with pytest.raises(error):
            engine.embed(bad)
    with pytest.raises(InvalidRequestError):
        engine.embed(tokens, "cls")
