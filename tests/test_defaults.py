"""Each registered model's default speculative configuration (what runs with no --drafter flag)
is lossless and reaches a floor of mean accepted length on fixed chat prompts, so that a default
that silently stops drafting, or drafts badly, cannot ship. Plain decoding has tau = 1.0; the
floors sit well below the values measured in docs/benchmarks.md."""

import pytest

import aheadlm
from aheadlm.registry import REGISTRY, default_drafter_dir

pytestmark = pytest.mark.realmodel

MESSAGES = [
    "Explain how a hash map works.",
    "Write a short story about a robot who learns to paint.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for writing clean Python code.",
]
FLOORS = {"gemma3-270m": 1.8, "smollm2-135m": 1.1}
MTP_FLOORS = {"gemma3-270m": 2.7}
"""The shipped MTP drafter on its own, k = 4, drafting whatever its confidence (threshold 0):
behind lookup a broken drafter would barely show. Measured on MESSAGES: 2.84 for the drafter
shipped now (with its copy head), 2.62 for the one before it (no copy head), so a copy head that
stops pointing fails too."""


def lossless_tau(llm, plain) -> float:
    """Tokens per target forward over MESSAGES, asserting each reply equals plain decoding's."""
    tokens = forwards = 0
    for m in MESSAGES:
        msgs = [{"role": "user", "content": m}]
        out = llm.chat(msgs, max_tokens=96)
        assert out.token_ids == plain.chat(msgs, max_tokens=96).token_ids, m
        tokens += out.stats.completion_tokens - 1  # the first token comes from the prefill
        forwards += out.stats.target_forwards
    return tokens / forwards


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_default_proposer_is_lossless_and_accepts(name):
    llm = aheadlm.load(name)
    assert llm.engine.proposer is not None and llm.engine.proposer.name == REGISTRY[name].default_proposer
    assert llm.engine.spec.adaptive == REGISTRY[name].default_adaptive
    assert llm.engine.spec.num_draft == REGISTRY[name].default_draft_tokens
    named = aheadlm.load(name, drafter="ngram").engine.spec
    assert not named.adaptive and named.num_draft == 4  # a named drafter keeps fixed k, 4 by default
    assert aheadlm.load(name, draft_tokens=3).engine.spec.num_draft == 3
    tau = lossless_tau(llm, aheadlm.load(name, drafter="none"))
    print(f"{name}: tau {tau:.2f}")
    assert tau >= FLOORS[name], f"{name}: tau {tau:.2f} below the floor {FLOORS[name]}"


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if default_drafter_dir(n)))
def test_shipped_drafter_alone_is_lossless_and_accepts(name):
    llm = aheadlm.load(name, drafter="mtp", draft_tokens=4, threshold=0.0)
    tau = lossless_tau(llm, aheadlm.load(name, drafter="none"))
    print(f"{name} shipped drafter: tau {tau:.2f}")
    assert tau >= MTP_FLOORS[name], f"{name}: shipped drafter tau {tau:.2f} below the floor {MTP_FLOORS[name]}"


def test_shipped_pair_uses_the_measured_fallback_cap():
    """`ngram+mtp`, by default or named, caps the drafter at the registry's measured fallback k;
    an explicit fallback_k wins."""
    from aheadlm.proposers import HybridProposer

    reg = REGISTRY["gemma3-270m"]
    for kw, want in (({}, reg.default_fallback_k), ({"drafter": "ngram+mtp"}, reg.default_fallback_k)):
        prop = aheadlm.load("gemma3-270m", **kw).engine.proposer
        assert isinstance(prop, HybridProposer) and prop.fallback_k == want == 2
    assert aheadlm.load("gemma3-270m", drafter="ngram+mtp", fallback_k=3).engine.proposer.fallback_k == 3


def test_shipped_drafter_alone_uses_the_measured_threshold():
    """`--drafter mtp` gates drafts at the threshold measured for the shipped drafter (its config's
    `draft_threshold`, 0.25); behind lookup (the default) the drafter drafts ungated; an explicit
    threshold wins in both."""
    prop = aheadlm.load("gemma3-270m", drafter="mtp").engine.proposer
    assert prop.threshold == prop.drafter.config.draft_threshold == 0.25
    assert aheadlm.load("gemma3-270m").engine.proposer.fallback.threshold == 0.0
    assert aheadlm.load("gemma3-270m", drafter="mtp", threshold=0.4).engine.proposer.threshold == 0.4
    assert aheadlm.load("gemma3-270m", drafter="ngram+mtp", threshold=0.4).engine.proposer.fallback.threshold == 0.4
    with pytest.raises(aheadlm.errors.InvalidRequestError, match="threshold"):
        aheadlm.load("gemma3-270m", threshold=1.5)


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if default_drafter_dir(n)))
def test_shipped_drafter_fits_the_package_cap(name):
    """Each shipped drafter folder stays within 25 MB (the package and git history carry it)."""
    size = sum(p.stat().st_size for p in default_drafter_dir(name).iterdir() if p.is_file())
    assert size <= 25_000_000, f"{name}: shipped drafter is {size / 1e6:.1f} MB"
