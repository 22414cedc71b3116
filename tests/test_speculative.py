"""Speculative decoding on tiny random models: greedy output identical to plain decoding for every
proposer and draft length, rounds cut by stop tokens / max tokens / the context end, a drafter that
always agrees gets everything accepted, and adaptive drafting stays lossless."""

import random
from types import SimpleNamespace

import pytest
import torch

from aheadlm.drafter import DrafterConfig, MTPDrafter
from aheadlm.engine import Engine, GenerationStats
from aheadlm.proposers import Draft, DraftModelProposer, HybridProposer, MTPProposer, NgramProposer, Proposer
from aheadlm.sampling import SamplingParams
from aheadlm.speculative import AdaptiveK, SpecConfig
from aheadlm.train.calibrate import record_rounds

from helpers import ours_from_hf, tiny_hf


class NoisyOracle(Proposer):
    """Proposes the true greedy continuation with a fraction of tokens replaced: partial
    acceptance at every depth."""

    name = "oracle"

    def __init__(self, reference: list[int], error_rate: float, seed: int = 0):
        self.reference, self.error_rate = reference, error_rate
        self.rng = random.Random(seed)

    def propose(self, state, k, params, generator):
        out = []
        for i in range(k):
            j = len(state.tokens) + i
            if j >= len(self.reference):
                break
            t = self.reference[j]
            out.append((t + 1) % 160 if self.rng.random() < self.error_rate else t)
        return Draft(out)


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def target(request):
    return ours_from_hf(tiny_hf(request.param, seed=5))


def random_drafter(target_model, seed=0, **kw):
    cfg = DrafterConfig.for_target(target_model.config, hidden_size=32, intermediate_size=48, **kw)
    return MTPDrafter(cfg).init_weights(0.2, torch.Generator().manual_seed(seed)).eval()


def copying_drafter(target_model, seed=0):
    """A random clustered drafter with a copy head (following its slots, scoring n-gram matches)
    whose gate starts half open."""
    kw = dict(copy_head=True, copy_follow=True, copy_match=2)
    d = random_drafter(target_model, seed, num_centroids=16, centroid_top_k=4, **kw)
    torch.nn.init.zeros_(d.copy.gate.bias)
    return d


def run(engine, prompt, params=None, **kw):
    stats = GenerationStats()
    toks, reason = [], None
    for step in engine.generate(prompt, params, stats=stats, **kw):
        toks += step.token_ids
        reason = step.finish_reason
    return toks, reason, stats


PROMPTS = [[1, 5, 9, 14, 3], [3, 100, 101, 102, 100, 101, 102, 100], [9] * 20]


def proposers_for(target):
    draft = ours_from_hf(tiny_hf(target.config.arch, seed=11))
    return {
        "mtp": MTPProposer(random_drafter(target)),
        "mtp-centroid": MTPProposer(random_drafter(target, num_centroids=16, centroid_top_k=4)),
        "mtp-copy": MTPProposer(copying_drafter(target)),
        "ngram": NgramProposer(),
        "ngram+mtp": HybridProposer(NgramProposer(), MTPProposer(random_drafter(target, seed=1)), fallback_k=2),
        "draft": DraftModelProposer(draft, n_ctx=512),
        "self": DraftModelProposer(target, n_ctx=512),
    }


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_identity_all_proposers(target, k):
    plain = Engine(target)
    for name, prop in proposers_for(target).items():
        spec = Engine(target, proposer=prop, spec=SpecConfig(num_draft=k))
        for prompt in PROMPTS:
            ref, _, _ = run(plain, prompt, max_tokens=30)
            got, _, stats = run(spec, prompt, max_tokens=30)
            assert got == ref, (name, k, prompt)
            if name == "self":  # the target as its own drafter: every draft accepted
                assert stats.accepted == stats.drafted > 0


@pytest.mark.parametrize("error_rate", [0.1, 0.4])
def test_partial_acceptance_cut_by_limits(target, error_rate):
    """Stop tokens, max_tokens and the context end falling inside a round."""
    plain = Engine(target, n_ctx=64)
    for prompt in PROMPTS:
        ref, _, _ = run(plain, prompt, max_tokens=200)  # runs to the 64-token context end
        for k in (3, 8):
            # context end
            oracle = NoisyOracle(prompt + ref, error_rate, seed=k)
            got, reason, stats = run(
                Engine(target, proposer=oracle, spec=SpecConfig(k), n_ctx=64), prompt, max_tokens=200
            )
            assert got == ref and reason == "length" and len(prompt) + len(got) == 64
            assert 0 < stats.accepted < stats.drafted
            # max tokens at every offset
            for m in (1, 2, 5, 13):
                got, reason, _ = run(Engine(target, proposer=oracle, spec=SpecConfig(k)), prompt, max_tokens=m)
                assert got == ref[:m] and reason == "length"
            # a stop token: the first occurrence of some generated token
            stop = ref[7]
            cut = ref.index(stop)
            ref_stop, reason_ref, _ = run(plain, prompt, max_tokens=200, stop_ids=(stop,))
            got, reason, _ = run(
                Engine(target, proposer=oracle, spec=SpecConfig(k)), prompt, max_tokens=200, stop_ids=(stop,)
            )
            assert got == ref_stop == ref[:cut] and reason == reason_ref == "stop"


def test_adaptive_and_threshold_stay_lossless(target):
    plain = Engine(target)
    for prompt in PROMPTS:
        ref, _, _ = run(plain, prompt, max_tokens=50)
        oracle = NoisyOracle(prompt + ref, 0.2)
        got, _, _ = run(Engine(target, proposer=oracle, spec=SpecConfig(6, adaptive=True)), prompt, max_tokens=50)
        assert got == ref
        mtp = MTPProposer(random_drafter(target), threshold=0.5)
        got, _, _ = run(Engine(target, proposer=mtp, spec=SpecConfig(6, adaptive=True)), prompt, max_tokens=50)
        assert got == ref


def test_threshold_gates_whole_rounds_and_stays_lossless(target):
    drafter = random_drafter(target, seed=3)
    seen = sorted(c for confs, _ in record_rounds(target, drafter, PROMPTS, max_tokens=30) for c in confs)
    mid = seen[len(seen) // 2]  # the median confidence of its drafts
    plain = Engine(target)
    gated = Engine(target, proposer=MTPProposer(drafter, threshold=mid), spec=SpecConfig(3))
    sources = {}
    for prompt in PROMPTS:
        ref, _, _ = run(plain, prompt, max_tokens=30)
        got, _, stats = run(gated, prompt, max_tokens=30)
        assert got == ref
        for src, counts in stats.by_source.items():
            sources[src] = sources.get(src, 0) + counts[0]
    # Some rounds drafted, and some drafted nothing because the first draft fell below the threshold.
    assert sources.get("mtp", 0) > 0 and sources.get("", 0) > 0
    never = Engine(target, proposer=MTPProposer(drafter, threshold=1.0 + 1e-6), spec=SpecConfig(3))
    _, _, stats = run(never, PROMPTS[0], max_tokens=10)
    assert stats.drafted == 0


ADJUSTED = {
    "repetition": SamplingParams(repetition_penalty=1.3),
    "presence-frequency": SamplingParams(presence_penalty=1.5, frequency_penalty=1.0),
    "negative-frequency": SamplingParams(frequency_penalty=-2.0),
    "bias": SamplingParams(logit_bias={7: 100.0, 8: 3.0, 11: -100.0}),
    "all": SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={9: 2.0}),
}


@pytest.mark.parametrize("name", list(ADJUSTED))
def test_penalties_and_logit_bias_greedy_identity(target, name):
    """Each verify row is adjusted for its own context (the output so far plus the drafts before
    it), so speculative output equals plain decoding's; and the adjustment changes that output."""
    params = ADJUSTED[name]
    plain = Engine(target)
    changed = False
    for prompt in PROMPTS:
        ref, _, _ = run(plain, prompt, params, max_tokens=30)
        changed |= ref != run(plain, prompt, max_tokens=30)[0]
        for proposer in (NoisyOracle(prompt + ref, 0.2), NgramProposer()):
            got, _, _ = run(Engine(target, proposer=proposer, spec=SpecConfig(4)), prompt, params, max_tokens=30)
            assert got == ref
    assert changed


def test_adaptive_k_prefers_long_drafts_when_accepted():
    c = AdaptiveK(8)
    for _ in range(60):
        k = c.choose()
        c.update(k, k, 1.0 + 0.05 * k)  # everything accepted, drafts cheap
    assert c.choose() >= 7
    c = AdaptiveK(8)
    for _ in range(60):
        k = c.choose()
        c.update(k, 0, 1.0 + 0.3 * k)  # nothing accepted, drafts costly
    assert c.choose() <= 2


class Recorder(Proposer):
    """Always drafts k copies of the last token and records each k it was asked for."""

    name = "recorder"

    def __init__(self):
        self.asked: list[int] = []

    def propose(self, state, k, params, generator):
        self.asked.append(k)
        return Draft([state.tokens[-1]] * k, source=self.name)


def test_hybrid_caps_fallback_drafts_and_counts_rounds_by_source(target):
    """Lookup drafts use the full k; the fallback is asked for at most fallback_k; every round is
    counted under the proposer that drafted it."""
    prompt = list(range(20, 40)) * 2 + [20]  # the first lookup copies 6 tokens
    ref, _, _ = run(Engine(target), prompt, max_tokens=40)
    lookup_lengths = []

    class Lookup(NgramProposer):
        def propose(self, state, k, params, generator):
            draft = super().propose(state, k, params, generator)
            lookup_lengths.append(len(draft.tokens))
            return draft

    rec = Recorder()
    hybrid = HybridProposer(Lookup(), rec, fallback_k=2)
    got, _, stats = run(Engine(target, proposer=hybrid, spec=SpecConfig(6)), prompt, max_tokens=40)
    assert got == ref
    assert max(lookup_lengths) == 6  # not capped
    assert rec.asked and max(rec.asked) <= 2
    by = stats.by_source
    assert set(by) <= {"ngram", "recorder", ""} and "ngram" in by and "recorder" in by
    assert sum(c[0] for c in by.values()) == stats.target_forwards
    assert by["recorder"][1] == sum(rec.asked) <= 2 * by["recorder"][0]
    assert sum(c[1] for c in by.values()) == stats.drafted and sum(c[2] for c in by.values()) == stats.accepted


def test_ngram_match_takes_the_longest_latest_suffix():
    """Lookup's match: the longest suffix n-gram (max_n down to min_n) that occurred before, at its
    latest occurrence, never the suffix itself; the proposal is what followed it."""
    lookup = NgramProposer(max_n=3, min_n=1)
    assert lookup.match([5, 6, 7]) is None
    lookup.begin([])  # a new sequence
    assert lookup.match([1, 2, 3, 9, 4, 2, 3, 8, 1, 2, 3]) == (2, 3)  # [1, 2, 3], not the later [2, 3]
    lookup.begin([])
    assert lookup.match([4, 2, 3, 8, 2, 3]) == (2, 2)
    lookup.begin([])
    assert lookup.match([7, 1, 7, 2, 7]) == (2, 1)  # the latest 7 before the last one
    state = SimpleNamespace(tokens=[7, 1, 7, 2, 7])
    assert lookup.propose(state, 4, None, None).tokens == [2, 7]


@pytest.mark.parametrize("ngram,copy", [(False, False), (True, False), (False, True)])
def test_batch_engine_rows_match_single_runs(target, ngram, copy):
    """The server's batch engine with batched MTP drafting (alone or behind n-gram lookup, with or
    without a copy head): every request gets the tokens plain decoding gives it alone, with rows
    joining and finishing at different times and only the busy rows computed."""
    from aheadlm.server.batching import BatchEngine, Request

    plain = Engine(target)
    expected = [run(plain, p, max_tokens=12 + 3 * i)[0] for i, p in enumerate(PROMPTS)]
    engine = BatchEngine(
        target,
        drafter=copying_drafter(target, seed=3) if copy else random_drafter(target, seed=3),
        ngram=ngram,
        num_draft=3,
        slots=4,
        n_ctx=64,
        draft_max_batch=4,
        fallback_k=2 if ngram else None,
    )
    got = [[] for _ in PROMPTS]
    pending = [
        Request(p, SamplingParams(), 12 + 3 * i, (), emit=lambda toks, *_, i=i: got[i].extend(toks))
        for i, p in enumerate(PROMPTS)
    ]
    engine.admit(pending.pop(0))
    while engine.active or pending:
        if pending and engine.has_free_slot():
            engine.admit(pending.pop(0))  # joins while the first request is mid-generation
        engine.step()
    assert got == expected
