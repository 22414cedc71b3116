"""The prompt cache: a prompt that shares a prefix with the last sequence prefills only the rest,
and what is generated is the same, token for token, as with nothing kept (plain and speculative
decoding, greedy and sampled), also after a request stopped early or failed mid-forward."""

import pytest
import torch

import aheadlm
from aheadlm.drafter import DrafterConfig, MTPDrafter
from aheadlm.engine import Engine, GenerationStats
from aheadlm.kernels import cpu_kernels
from aheadlm.prompt_cache import PromptCache, cache_size, common_prefix
from aheadlm.proposers import HybridProposer, MTPProposer, NgramProposer
from aheadlm.sampling import SamplingParams

from helpers import packed_tiny

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="exact prefill needs the compiled kernels")


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def target(request):
    return packed_tiny(request.param, "q8")[1]


def make_engine(target, kind: str, **kw) -> Engine:
    if kind == "plain":
        return Engine(target, **kw)
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=48)
    mtp = MTPProposer(MTPDrafter(cfg).init_weights(0.2, torch.Generator().manual_seed(0)).eval())
    proposer = NgramProposer() if kind == "ngram" else HybridProposer(NgramProposer(), mtp, fallback_k=2)
    return Engine(target, proposer=proposer, **kw)


def run(engine, prompt, kept=None, max_tokens=24, params=None):
    stats = GenerationStats()
    out = [t for step in engine.generate(prompt, params, max_tokens=max_tokens, stats=stats, prompt_cache=kept)
           for t in step.token_ids]  # fmt: skip
    return out, stats


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", ["plain", "ngram", "ngram+mtp"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kept_cache_changes_nothing(target, kind, temperature):
    engine = make_engine(target, kind)
    assert engine.exact_prefill
    params = SamplingParams(temperature=temperature, seed=7)
    kept = PromptCache()
    first = ids(40, 1)
    out1, st = run(engine, first, kept, params=params)
    assert st.cached_tokens == 0 and out1 == run(engine, first, params=params)[0]
    held = len(kept.tokens)
    assert kept.tokens == (first + out1)[:held] and held >= len(first)
    turns = [
        (first + out1 + ids(10, 2), held),  # the next turn of a conversation
        (first + out1 + ids(10, 2), None),  # the same prompt again (regenerate)
        (first[:30] + ids(12, 3), 30),  # an edit in the middle
        (ids(20, 4), 0),  # something unrelated
    ]
    for i, (prompt, cached) in enumerate(turns):
        before = list(kept.tokens)
        got, st = run(engine, prompt, kept, params=params)
        if i == 0:  # the kept K/V (mostly decoded) are those a fresh prefill computes, bit for bit
            seq = list(kept.tokens)
            with torch.inference_mode():
                reused = engine.prefill(kept.cache, [5])[0]
                fresh = engine.prefill(engine.new_cache(len(seq) + 1), seq + [5])[0]
                kept.keep(kept.cache, seq)
            assert len(seq) > 64 and torch.equal(reused, fresh)
        assert got == run(engine, prompt, params=params)[0]
        want = common_prefix(prompt[:-1], before) if cached is None else cached
        assert st.cached_tokens == want and st.prompt_tokens == len(prompt)
        if kind == "plain":
            assert kept.tokens == (prompt + got)[: len(prompt) + len(got) - 1]


def test_stopped_or_failed_requests_keep_only_what_completed(target):
    engine = make_engine(target, "plain")
    kept = PromptCache()
    prompt = ids(30, 5)
    want = run(engine, prompt, max_tokens=20)[0]
    steps = engine.generate(prompt, max_tokens=20, prompt_cache=kept)
    early = [next(steps).token_ids[0] for _ in range(5)]
    steps.close()
    assert early == want[:5] and kept.tokens == prompt + early[:4]
    got, st = run(engine, prompt + early, kept, max_tokens=15)
    assert st.cached_tokens == len(prompt) + 4 and got == want[5:]

    calls = 0

    def fail_late(module, args):  # a forward that dies after some layers wrote their K/V
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("boom")

    layer = target.layers[len(target.layers) // 2]
    handle = layer.register_forward_pre_hook(fail_late)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run(engine, prompt, kept, max_tokens=20)
    finally:
        handle.remove()
    assert kept.tokens == prompt + want[:2]  # the third output's forward failed: not kept
    got, st = run(engine, prompt + want[:5], kept, max_tokens=15)
    assert st.cached_tokens == len(prompt) + 2 and got == want[5:]


def test_sliding_window_ring_limits_how_far_back_a_cache_can_serve():
    """Gemma 3's sliding layers keep a ring of window + max_step slots: a prompt that leaves the
    kept sequence further back than that is prefilled in full, and still decodes the same."""
    target = packed_tiny("gemma3", "q8")[1]
    engine = make_engine(target, "plain", max_step=16)
    kept = PromptCache()
    prompt = ids(20, 6)
    out, _ = run(engine, prompt, kept, max_tokens=100)
    assert any(g.ring for g in kept.cache.groups.values()) and kept.cache.min_length() > 10
    early = prompt[:10] + ids(5, 7)
    got, st = run(engine, early, kept)
    assert st.cached_tokens == 0 and got == run(engine, early)[0]
    run(engine, prompt, kept, max_tokens=100)
    later = prompt + out + ids(4, 8)
    got, st = run(engine, later, kept)
    assert st.cached_tokens == len(prompt) + len(out) - 1 and got == run(engine, later)[0]


def test_cache_sizes_grow_by_powers_of_two():
    assert [cache_size(n, 8192) for n in (1, 1024, 1025, 5000, 9000)] == [1024, 1024, 2048, 8192, 8192]
    assert cache_size(300, 256) == 256


@pytest.mark.realmodel
def test_chat_turns_reuse_the_cache_and_answer_the_same():
    """A three-turn chat through the API prefills only each turn's new tokens and answers exactly
    as an LLM that keeps nothing."""
    llm = aheadlm.load("smollm2-135m")
    fresh = aheadlm.LLM(llm.engine, llm.tokenizer, llm.name, prompt_cache=False)
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    for turn in range(3):
        stats = GenerationStats()
        out = llm.chat(messages, max_tokens=24, stats=stats)
        assert out.token_ids == fresh.chat(messages, max_tokens=24).token_ids
        assert (stats.cached_tokens > 0) == (turn > 0)
        messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": "And three more?"}]
    llm.clear_cache()
    stats = GenerationStats()
    llm.chat(messages, max_tokens=4, stats=stats)
    assert stats.cached_tokens == 0


@pytest.mark.parametrize("ngram", [False, True])
def test_server_rows_keep_their_prefix_for_the_next_request(target, ngram):
    """The batch engine gives a new request the free row that holds the longest prefix of its
    prompt and prefills only the rest; outputs equal a lone plain decode. A failed request's row
    keeps nothing."""
    from aheadlm.server.batching import BatchEngine, Request

    engine = BatchEngine(target, ngram=ngram, num_draft=3, slots=3, n_ctx=256)
    plain = Engine(target)

    def serve(prompts):
        got = [[] for _ in prompts]
        reqs = [
            Request(p, SamplingParams(), 16, (), emit=lambda t, *_, i=i: got[i].extend(t))
            for i, p in enumerate(prompts)
        ]
        pending = list(reqs)
        while engine.active or pending:
            if pending and engine.has_free_slot():
                engine.admit(pending.pop(0))
            engine.step()
        return got, reqs

    first, other = ids(30, 9), ids(25, 10)
    (out_a, out_b), (a, b) = serve([first, other])
    row_a = a.row
    assert a.stats.cached_tokens == 0 and engine.kept[row_a] == (first + out_a)[: len(engine.kept[row_a])]
    held = len(engine.kept[row_a])
    assert held >= len(first) + len(out_a) - 4  # all but the tokens of the last round
    follow = first + out_a + ids(6, 11)
    (out_c, out_d), (c, d) = serve([ids(12, 12), follow])  # the unrelated one takes a stale row
    assert c.row != row_a and c.stats.cached_tokens == 0
    assert d.row == row_a and d.stats.cached_tokens == held
    for prompt, out in ((first, out_a), (other, out_b), (follow, out_d)):
        assert out == run(plain, prompt, max_tokens=16)[0]
    engine.admit(e := Request(follow, SamplingParams(), 16, (), emit=lambda *_: None))
    engine.release(e, keep=False)
    assert engine.kept[e.row] == [] and engine.cache.lengths[e.row] == 0


def test_two_threads_never_share_a_kept_cache(target):
    """Requests from several threads on one engine each get the kept cache or a fresh one, never
    the same one at once, and answer as alone."""
    import threading

    engine = make_engine(target, "plain")
    kept = PromptCache()
    prompt = ids(30, 13)
    want = run(engine, prompt, max_tokens=12)[0]
    run(engine, prompt, kept, max_tokens=12)
    results = []

    def worker():
        for _ in range(3):
            results.append(run(engine, prompt, kept, max_tokens=12)[0])

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 9
