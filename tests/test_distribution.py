"""Speculative sampling preserves the target distribution exactly.

A tiny random target with a 12-token vocabulary, and drafters that are wrong part of the time (a
random MTP drafter sampling from its own distribution q, the same with a clustered head whose q
covers only its candidates, one whose copy head mixes a pointer over the context into q, the
first drafter gated by a confidence threshold so that about half its rounds verify no draft, and
a noisy oracle with point-mass q).
The empirical distribution of the first three sampled tokens is compared with the exact one,
computed from the target's processed probabilities (with penalties and a logit bias in one
setting). Per-token bounds are 4 standard errors; with
N = 40,000 (slow suite) that is at most 0.01 absolute, so a 1% bias fails.
"""

import dataclasses
import math

import pytest
import torch

from aheadlm.drafter import DrafterConfig, MTPDrafter
from aheadlm.engine import Engine
from aheadlm.guided import GuideTable, JsonGuide
from aheadlm.kv_cache import KVCache
from aheadlm.proposers import Draft, MTPProposer, Proposer
from aheadlm.sampling import SamplingParams, penalize, processed_probs
from aheadlm.speculative import SpecConfig
from aheadlm.train.calibrate import record_rounds
from aheadlm.verify import verify_sampled

from helpers import ours_from_hf, tiny_hf

V = 12
PROMPT = [1, 2, 3]
SETTINGS = {
    "t1.0": SamplingParams(temperature=1.0),
    "t0.7-topk-topp": SamplingParams(temperature=0.7, top_k=8, top_p=0.9),
    # Logits that depend on the sequence so far: each verify row sees its own context.
    "t1.0-penalties-bias": SamplingParams(
        temperature=1.0,
        repetition_penalty=1.3,
        presence_penalty=0.8,
        frequency_penalty=0.6,
        logit_bias={0: 2.0, 5: -1.5},
    ),
}


@pytest.fixture(scope="module")
def target():
    hf = tiny_hf("gemma3", seed=3, vocab_size=V, num_hidden_layers=2, hidden_size=32, intermediate_size=32)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(4.0)  # peakier, more varied distributions than at init
    return ours_from_hf(hf)


# JSON mode over a 12-token vocabulary (token 0 ends the text): each row's mask follows its context.
JSON_TABLE = GuideTable(
    [b"<eos>", b"{", b"}", b'"', b"a", b":", b"1", b",", b" ", b'"a":', b"[", b"]"], [True] + [False] * 11
)


def json_guide():
    return JsonGuide(JSON_TABLE, (0,))


def exact_joint(model, params, guide=None) -> torch.Tensor:
    """p(t1, t2, t3) [V, V, V] under plain sampling with `params` (and a fresh `guide()` if given)."""

    def dist(seq):
        with torch.no_grad():
            lg, _ = model(torch.tensor([seq]), torch.arange(len(seq))[None], KVCache(model.config, 16), num_logits=1)
        g = guide() if guide else None
        return processed_probs(penalize(lg[0], params, seq, len(PROMPT), g), params)[0]

    joint = torch.zeros(V, V, V, dtype=torch.float64)
    p1 = dist(PROMPT)
    for a in range(V):
        if p1[a] == 0:
            continue
        p2 = dist(PROMPT + [a])
        for b in range(V):
            if p2[b] == 0:
                continue
            joint[a, b] = p1[a] * p2[b] * dist(PROMPT + [a, b]).double()
    return joint


class NoisyGreedy(Proposer):
    """Point-mass drafts: the target's own argmax continuation, every third token wrong."""

    name = "noisy"

    def propose(self, state, k, params, generator):
        seq, out = list(state.tokens), []
        for i in range(k):
            with torch.no_grad():
                lg, _ = state.target(
                    torch.tensor([seq]), torch.arange(len(seq))[None], KVCache(state.target.config, 16), num_logits=1
                )
            t = int(lg[0, -1].argmax())
            t = (t + 1) % V if (len(seq) + i) % 3 == 0 else t
            out.append(t)
            seq.append(t)
        return Draft(out)


def drafters(target):
    cfg = DrafterConfig.for_target(target.config, hidden_size=16, intermediate_size=16, num_layers=1)
    mtp = MTPDrafter(cfg).init_weights(0.3, torch.Generator().manual_seed(1)).eval()
    # A clustered head drafts only among its candidates: q is zero outside them.
    cfg = DrafterConfig.for_target(
        target.config, hidden_size=16, intermediate_size=16, num_layers=1, num_centroids=4, centroid_top_k=2
    )
    clustered = MTPDrafter(cfg).init_weights(0.3, torch.Generator().manual_seed(2)).eval()
    # A copy head mixes a pointer over the context into the clustered head's q; from depth 2 it
    # follows the slots that agree with the draft, and it scores n-gram matches.
    cfg = DrafterConfig.for_target(
        target.config, hidden_size=16, intermediate_size=16, num_layers=1, num_centroids=4, centroid_top_k=2,
        copy_head=True, copy_follow=True, copy_match=2,
    )  # fmt: skip
    copying = MTPDrafter(cfg).init_weights(0.3, torch.Generator().manual_seed(3)).eval()
    torch.nn.init.zeros_(copying.copy.gate.bias)
    return {
        "mtp": MTPProposer(mtp),
        "mtp-clustered": MTPProposer(clustered),
        "mtp-copy": MTPProposer(copying),
        "point-mass": NoisyGreedy(),
    }


def gated(target, params) -> MTPProposer:
    """The random drafter, drafting only at or above its median confidence under `params`, so
    about half its rounds verify no draft at all."""
    proposer = drafters(target)["mtp"]
    seen = []
    for seed in range(50):
        p = dataclasses.replace(params, seed=seed)
        seen += [
            c
            for confs, _ in record_rounds(target, proposer.drafter, [PROMPT], k=2, max_tokens=3, params=p)
            for c in confs
        ]
    proposer.threshold = sorted(seen)[len(seen) // 2]
    return proposer


def check(target, proposer, params, n, guide=None):
    exact = exact_joint(target, params, guide)
    engine = Engine(target, proposer=proposer, spec=SpecConfig(num_draft=2))
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    for seed in range(n):
        p = dataclasses.replace(params, seed=seed)
        g = guide() if guide else None
        toks = [t for s in engine.generate(PROMPT, p, max_tokens=3, guide=g) for t in s.token_ids]
        counts[tuple(toks)] += 1
    emp = counts / n
    for dims in ((1, 2), (0, 2), (0, 1)):  # marginals of t1, t2, t3
        e, x = emp.sum(dims), exact.sum(dims)
        sigma = (x * (1 - x) / n).sqrt().clamp_min(1.0 / n)
        z = ((e - x).abs() / sigma).max().item()
        assert z < 4.0, (dims, z, (e - x).abs().max().item())
    # joint of (t1, t2): chi-square over cells expecting >= 5 samples (the rest merged)
    e, x = counts.sum(2).flatten(), exact.sum(2).flatten() * n
    big = x >= 5
    obs = torch.cat([e[big], e[~big].sum()[None]])
    exp = torch.cat([x[big], x[~big].sum()[None]])
    keep = exp > 0
    chi2 = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_speculative_sampling_distribution(target, setting):
    for proposer in [*drafters(target).values(), gated(target, SETTINGS[setting])]:
        check(target, proposer, SETTINGS[setting], n=3000)


def test_speculative_sampling_distribution_json_mode(target):
    """JSON mode forbids most tokens, differently at each position of a round."""
    params = SamplingParams(temperature=1.0)
    for proposer in drafters(target).values():
        check(target, proposer, params, n=3000, guide=json_guide)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_speculative_sampling_distribution_40k(target, setting):
    for proposer in [*drafters(target).values(), gated(target, SETTINGS[setting])]:
        check(target, proposer, SETTINGS[setting], n=40000)


@pytest.mark.parametrize("with_q", [False, True])
def test_verify_sampled_exact(with_q):
    """The rejection sampler alone, 50,000 trials: accepted/bonus output ~ p exactly."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 6, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(1, 6, generator=g) * 2, -1)
    n = 50_000
    counts = torch.zeros(6)
    draws = torch.multinomial(q[0], n, replacement=True, generator=g) if with_q else None
    for i in range(n):
        d = int(draws[i]) if with_q else 2  # point mass on token 2
        acc, bonus = verify_sampled(p, [d], q if with_q else None, g)
        counts[d if acc == 1 else bonus] += 1
    sigma = (p[0] * (1 - p[0]) / n).sqrt()
    assert ((counts / n - p[0]).abs() / sigma).max() < 4.0


def test_exact_joint_sums_to_one(target):
    for params in SETTINGS.values():
        assert abs(exact_joint(target, params).sum().item() - 1) < 1e-6


def test_inverse_transform_sampler():
    """`sample` draws each token with its probability (unnormalised rows, several rows at once),
    never a zero-probability token, including when the uniform draw lands at the very top."""
    from aheadlm.sampling import sample

    probs = torch.tensor([[0.0, 0.2, 0.0, 1.2, 0.6, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    n = 20_000
    draws = torch.stack([sample(probs, g) for _ in range(n)])  # [n, 2]
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=6).double() / n
        want = probs[row].double() / probs[row].sum()
        assert torch.all(freq[want == 0] == 0)
        se = (want * (1 - want) / n).sqrt()
        assert torch.all((freq - want).abs() <= 4 * se + 1e-12), (row, freq, want)

    # A draw at the very top (u * total rounding to the total) still picks a token with mass.
    top = torch.tensor([[0.25, 0.75, 0.0]])
    real_rand = torch.rand
    try:
        torch.rand = lambda *a, **kw: torch.ones(a[0], dtype=torch.float64)
        assert int(sample(top, g)[0]) == 1
    finally:
        torch.rand = real_rand


@pytest.mark.parametrize("vocab", [12, 1000, 5000])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_filter_matches_a_full_sort(vocab, top_p):
    """The top-p filter sorts only a growing prefix of the most likely tokens; it keeps exactly the
    tokens a sort of the whole vocabulary keeps, including flat rows that need the prefix to grow."""
    from aheadlm.sampling import top_p_filter

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g) * torch.tensor([[4.0], [1.0], [0.05]])  # peaked .. flat
    probs = torch.softmax(logits, -1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    drop[..., 0] = False
    want = probs.masked_fill(drop.scatter(-1, idx, drop), 0.0)
    got = top_p_filter(probs, top_p)
    assert torch.equal(got > 0, want > 0)
    assert torch.equal(got[got > 0], probs[got > 0])


def test_penalize_follows_openai_and_hf():
    """Bias first; the repetition penalty over prompt and output (HF); presence and frequency over
    the output only (OpenAI, vLLM)."""
    logits = torch.tensor([[0.5, 1.0, -1.0, 2.0, 0.0, 0.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 1.0})
    got = penalize(logits, params, [1, 1, 2, 2, 3, 3], n_prompt=3)  # output: 2 once, 3 twice
    assert torch.equal(got, torch.tensor([[0.5, 0.5, -2.75, 0.0, 1.0, 0.0]]))
    assert penalize(logits, SamplingParams(), [1, 2], 1) is logits  # nothing to adjust
