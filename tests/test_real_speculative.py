"""Greedy speculative decoding on the real models is token-identical to plain greedy decoding, for
every proposer and draft length, including rounds cut by EOS, stop strings, max tokens and the
context end. The default suite runs a small sweep; `-m slow` runs 20 prompts x 128 tokens x k in
{1, 2, 4, 8}."""

import pytest
import torch

import aheadlm
from aheadlm.api import LLM
from aheadlm.drafter import DrafterConfig, MTPDrafter
from aheadlm.engine import Engine
from aheadlm.proposers import DraftModelProposer, MTPProposer, NgramProposer
from aheadlm.speculative import SpecConfig

pytestmark = pytest.mark.realmodel

PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(arr):\n",
    "Question: What is the capital of France?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about photosynthesis are",
    "List the first ten prime numbers: 2, 3, 5,",
    "import numpy as np\n\ndef normalize(x):\n    ",
    "Dear team,\n\nI wanted to follow up on",
    "Translate to French: 'The cat sleeps on the sofa.'\nFrench:",
    "Recipe for pancakes:\n1.",
    "The mitochondria is the powerhouse of the cell. The mitochondria is",
    "SELECT name, age FROM users WHERE",
    "In 1969, the Apollo 11 mission",
    "A haiku about autumn:\n",
    "Q: How do I reverse a list in Python?\nA:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Chapter 1\n\nIt was a cold morning when",
    "Pros and cons of remote work:\nPros:",
    "1, 1, 2, 3, 5, 8, 13,",
    "<html>\n<head>\n<title>",
]


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def plain(request):
    return aheadlm.load(request.param, drafter="none", dtype="float32", device="cpu")


def proposers(llm):
    target = llm.engine.model
    cfg = DrafterConfig.for_target(target.config, hidden_size=128, intermediate_size=256, num_layers=2)
    mtp = MTPDrafter(cfg).init_weights(0.05, torch.Generator().manual_seed(0)).eval()
    ccfg = DrafterConfig.for_target(
        target.config, hidden_size=128, intermediate_size=256, num_layers=1, num_centroids=64, centroid_top_k=4
    )
    clustered = MTPDrafter(ccfg).init_weights(0.05, torch.Generator().manual_seed(1)).eval()
    return {
        "mtp-random": MTPProposer(mtp),
        "mtp-random-clustered": MTPProposer(clustered),
        "ngram": NgramProposer(),
        "draft-self": DraftModelProposer(target, n_ctx=2048),
    }


def with_proposer(llm, proposer, k, n_ctx=None):
    return LLM(Engine(llm.engine.model, proposer=proposer, spec=SpecConfig(k), n_ctx=n_ctx), llm.tokenizer, llm.name)


def chat_or_text(llm, prompt):
    if llm.tokenizer.has_chat_template:  # SmolLM2 chats and ends turns with EOS
        return llm.tokenizer.chat_ids([{"role": "user", "content": prompt}])
    return prompt


def check(llm, prompts, ks, max_tokens):
    prompts = [chat_or_text(llm, p) for p in prompts]
    refs = [llm.generate(p, max_tokens=max_tokens) for p in prompts]
    for name, prop in proposers(llm).items():
        for k in ks:
            spec = with_proposer(llm, prop, k)
            for p, a in zip(prompts, refs, strict=True):
                b = spec.generate(p, max_tokens=max_tokens)
                assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), (name, k, p)
                if name == "draft-self":
                    assert b.stats.accepted == b.stats.drafted


def test_greedy_identity_small_sweep(plain):
    check(plain, PROMPTS[:2], ks=(3,), max_tokens=32)


def test_stop_strings_and_context_end(plain):
    oracle_like = proposers(plain)["ngram"]
    for k in (3, 8):
        spec = with_proposer(plain, oracle_like, k)
        p = "1, 2, 3, 4, 5, 6, 7, 8,"
        for stop in (", 2", "9", " 1"):
            a = plain.generate(p, max_tokens=60, stop=stop)
            b = spec.generate(p, max_tokens=60, stop=stop)
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
        # A stop string completed in the middle of a long accepted round: nothing after it is kept.
        rep = "The cat sat on the mat. " * 4
        for stop in (" mat", "sat on"):
            a = plain.generate(rep, max_tokens=40, stop=stop)
            b = spec.generate(rep, max_tokens=40, stop=stop)
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason), stop
            assert b.stats.completion_tokens == len(b.token_ids)
        short_plain = with_proposer(plain, None, 1, n_ctx=48)
        short_spec = with_proposer(plain, oracle_like, k, n_ctx=48)
        a = short_plain.generate(p, max_tokens=500, ignore_eos=True)
        b = short_spec.generate(p, max_tokens=500, ignore_eos=True)
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "length"
        assert len(plain.tokenizer.encode(p)) + len(b.token_ids) == 48


@pytest.mark.slow
def test_greedy_identity_full_sweep(plain):
    check(plain, PROMPTS, ks=(1, 2, 4, 8), max_tokens=128)
