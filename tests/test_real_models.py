"""Parity with transformers on the two real GGUFs (transformers loads the same files)."""

import pytest
import torch

import aheadlm
from aheadlm.kv_cache import KVCache

from helpers import hf_reference

pytestmark = pytest.mark.realmodel

TEXT = (
    "The printing press, invented by Johannes Gutenberg around 1440, changed how knowledge spread "
    "across Europe. Before it, books were copied by hand, mostly in monasteries, and a single volume "
    "could take months to finish. Movable metal type made it possible to print hundreds of identical "
    "pages a day. Within fifty years, presses operated in more than two hundred cities, and millions "
    "of books were in circulation. Literacy rose, scientific results could be checked and built upon, "
    "and religious and political pamphlets reached audiences their authors could never have met. "
    "Historians still debate how quickly these effects appeared, but few doubt that the press was one "
    "of the turning points of the modern world. Meanwhile, in the kitchen, the recipe called for two "
    "cups of flour, a pinch of salt, three eggs and a slow oven; def fib(n): return n if n < 2 else "
    "fib(n - 1) + fib(n - 2) # and the numbers 3.14159, 2.71828, 1.41421 kept appearing."
)
PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(arr):\n",
    "Question: What is the capital of France?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about photosynthesis are",
]
MODELS = ["gemma3-270m", "smollm2-135m"]


@pytest.fixture(scope="module", params=MODELS)
def models(request):
    hf, hf_tok = hf_reference(request.param)
    ours = aheadlm.load(request.param, dtype="float32", device="cpu")
    return ours, hf, hf_tok


def test_tokenizer_matches(models):
    ours, _, hf_tok = models
    for text in PROMPTS + [TEXT, "  leading spaces\tand\ttabs\n\nünïcödé 日本語 🙂"]:
        assert ours.tokenizer.encode(text) == hf_tok(text)["input_ids"], text
        ids = ours.tokenizer.encode(text)
        assert ours.tokenizer.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_logits_256_tokens(models):
    ours, hf, _ = models
    ids = ours.tokenizer.encode(TEXT * 2)[:256]
    assert len(ids) == 256
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        cache = KVCache(ours.config, 256)
        got, _ = ours.engine.model(torch.tensor([ids]), torch.arange(256)[None], cache)
    err = (got[0] - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err < 2e-3 * max(1.0, scale / 10), (err, scale)
    assert torch.equal(got[0].argmax(-1), ref.argmax(-1))


def test_greedy_64_identical(models):
    ours, hf, _ = models
    eos = ours.tokenizer.eos_id
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=eos,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )[0, len(ids) :].tolist()
        if ref and ref[-1] == eos:
            ref = ref[:-1]
        got = ours.generate(ids, max_tokens=64, stop_token_ids=[eos], ignore_eos=True)
        assert got.token_ids == ref, prompt


def test_fresh_conversion_matches_cache(tmp_path, monkeypatch):
    """Converting a GGUF from scratch (what every first run does) gives the cached weights, bit for bit."""
    cached = aheadlm.load("smollm2-135m")
    ids = cached.tokenizer.encode(PROMPTS[0])
    positions = torch.arange(len(ids))[None]
    with torch.no_grad():  # runs first so that the kernels load from the usual cache
        a, _ = cached.engine.model(torch.tensor([ids]), positions, KVCache(cached.config, 32))
    monkeypatch.setenv("AHEADLM_CACHE", str(tmp_path))
    fresh = aheadlm.load("smollm2-135m")
    assert list(tmp_path.glob("models/*/model.safetensors"))
    assert fresh.tokenizer.encode(PROMPTS[0]) == ids
    with torch.no_grad():
        b, _ = fresh.engine.model(torch.tensor([ids]), positions, KVCache(fresh.config, 32))
    assert torch.equal(a, b)
