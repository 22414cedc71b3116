"""Log-probabilities of emitted tokens: the target's own distribution at each position, the same
whether a token came from plain decoding, an accepted draft or a bonus, from the single-sequence
engine or the server's batch engine; equal to a teacher-forced forward over the whole sequence."""

import json
import math

import pytest
import torch

from aheadlm.engine import Engine
from aheadlm.errors import ContextLengthError, InvalidRequestError
from aheadlm.kv_cache import KVCache
from aheadlm.proposers import HybridProposer, MTPProposer, NgramProposer
from aheadlm.sampling import SamplingParams, token_logprobs
from aheadlm.speculative import SpecConfig
from test_speculative import PROMPTS, copying_drafter, random_drafter

from helpers import ours_from_hf, packed_tiny, tiny_hf


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def target(request):
    return ours_from_hf(tiny_hf(request.param, seed=5))


def run(engine, prompt, params=None, **kw):
    toks, lps = [], []
    for step in engine.generate(prompt, params, **kw):
        # one per token, and one for the stop token that ends a step, if one does
        assert step.logprobs is not None and len(step.logprobs) == len(step.token_ids) + (step.finish_reason == "stop")
        toks += step.token_ids
        lps += step.logprobs
    return toks, lps


def teacher_forced(model, prompt, out):
    """log-softmax of one forward over prompt + out: row i is the distribution of out[i]."""
    seq = prompt + out
    cache = KVCache(model.config, len(seq) + 1)
    logits, _ = model(torch.tensor([seq]), torch.arange(len(seq))[None], cache)
    return torch.log_softmax(logits[0].float(), -1)[len(prompt) - 1 : len(seq) - 1]


def engines(target):
    return {
        "plain": Engine(target),
        "ngram": Engine(target, proposer=NgramProposer(), spec=SpecConfig(4)),
        "mtp": Engine(target, proposer=MTPProposer(random_drafter(target)), spec=SpecConfig(3)),
        "ngram+mtp-copy": Engine(
            target,
            proposer=HybridProposer(NgramProposer(), MTPProposer(copying_drafter(target)), fallback_k=2),
            spec=SpecConfig(4, adaptive=True),
        ),
    }


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_the_targets_own_distribution(target, temperature):
    """For every proposer, greedy and sampled: each token's log-probability and its alternatives
    equal a teacher-forced forward over the final sequence; greedy output equals plain decoding's
    and so do its log-probabilities (to rounding here: these float models run through SDPA, whose
    sums depend on the number of rows; the compiled kernels are exact, see below)."""
    params = SamplingParams(temperature=temperature, top_k=20 if temperature else None, seed=3)
    reference = {}
    for name, engine in engines(target).items():
        for p, prompt in enumerate(PROMPTS):
            toks, lps = run(engine, prompt, params, max_tokens=25, logprobs=3)
            assert [x.token_id for x in lps] == toks
            want = teacher_forced(target, prompt, toks)
            got = torch.tensor([x.logprob for x in lps])
            torch.testing.assert_close(got, want[torch.arange(len(toks)), torch.tensor(toks)], atol=1e-4, rtol=0)
            vals, idx = want.topk(3, -1)
            for i, x in enumerate(lps):
                assert [t for t, _ in x.top] == idx[i].tolist() or torch.allclose(
                    torch.tensor([v for _, v in x.top]), vals[i], atol=1e-4
                )  # near-ties may swap order; the values must still agree
                assert [v for _, v in x.top] == sorted((v for _, v in x.top), reverse=True)
                if not temperature:
                    assert x.top[0] == (x.token_id, x.logprob)  # greedy takes the most likely
            if not temperature:
                if name == "plain":
                    reference[p] = (toks, torch.tensor([x.logprob for x in lps]))
                else:
                    assert toks == reference[p][0], name
                    got = torch.tensor([x.logprob for x in lps])
                    torch.testing.assert_close(got, reference[p][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,fmt", [("gemma3", "q8"), ("llama", "q4")])
def test_compiled_logprobs_are_bit_identical(arch, fmt):
    """Through the compiled batch-invariant kernels (as the real GGUFs run), a token's
    log-probability and alternatives are the same bits whether plain decoding, a verified draft or
    a bonus produced it."""
    _, model = packed_tiny(arch, fmt)
    ref = {}
    for name, engine in engines(model).items():
        for p, prompt in enumerate(PROMPTS):
            toks, lps = run(engine, prompt, max_tokens=25, logprobs=4)
            got = (toks, [(x.token_id, x.logprob, x.top) for x in lps])
            assert got == ref.setdefault(p, got), (name, prompt)


def test_logprobs_follow_stops_and_limits(target):
    """A stop token is not emitted but gets its log-probability (it counts as a completion token,
    and evaluation harnesses read an entry for it); a round cut by max_tokens carries exactly the
    tokens it emits; logprobs=0 lists no alternatives; None gives none."""
    engine = engines(target)["ngram"]
    toks, free = run(engine, PROMPTS[1], max_tokens=20, logprobs=0)
    stop = toks[5]
    emitted, lps = run(engine, PROMPTS[1], max_tokens=20, stop_ids=(stop,), logprobs=0)
    cut = toks.index(stop)
    assert emitted == toks[:cut]
    assert [(x.token_id, x.logprob) for x in lps] == [(x.token_id, x.logprob) for x in free[: cut + 1]]
    assert lps[-1].token_id == stop and all(x.top == [] for x in lps)
    for n in (1, 2, 7):
        got, lps = run(engine, PROMPTS[1], max_tokens=n, logprobs=1)
        assert len(got) == len(lps) == n
    assert all(s.logprobs is None for s in engine.generate(PROMPTS[0], max_tokens=5))
    for bad in (-1, 21, 2.0, True, "3"):
        with pytest.raises(InvalidRequestError, match="logprobs"):
            list(engine.generate(PROMPTS[0], max_tokens=5, logprobs=bad))


@pytest.mark.parametrize("arch,fmt,ngram", [("gemma3", "q8", False), ("llama", "q4", True)])
def test_batch_engine_logprobs_match_single_runs(arch, fmt, ngram):
    """The server's engine: each request's log-probabilities equal, bit for bit, its single-sequence
    run's, with rows joining mid-way, a request without logprobs beside them, and one ended by a
    stop token (which gets its entry)."""
    from aheadlm.server.batching import BatchEngine, Request

    _, target = packed_tiny(arch, fmt)
    plain = Engine(target)
    free = run(plain, PROMPTS[2], max_tokens=16, logprobs=0)[0]
    stops = [(), (), (free[7],)]
    expected = [run(plain, p, max_tokens=10 + 3 * i, stop_ids=stops[i], logprobs=2) for i, p in enumerate(PROMPTS)]
    assert expected[2][1][-1].token_id == free[7]  # the stop token's entry
    engine = BatchEngine(
        target, drafter=random_drafter(target, seed=3), ngram=ngram, num_draft=3, slots=4, n_ctx=64, draft_max_batch=4
    )
    got = [([], []) for _ in PROMPTS]

    def collect(i):
        def emit(toks, finish, lps):
            got[i][0].extend(toks)
            if i == 1:
                assert lps is None
            else:
                assert len(lps) == len(toks) + (finish == "stop")
                got[i][1].extend(lps)

        return emit

    pending = [
        Request(p, SamplingParams(), 10 + 3 * i, stops[i], emit=collect(i), logprobs=None if i == 1 else 2)
        for i, p in enumerate(PROMPTS)
    ]
    engine.admit(pending.pop(0))
    while engine.active or pending:
        if pending and engine.has_free_slot():
            engine.admit(pending.pop(0))
        engine.step()
    for i, ((toks, lps), (want_toks, want_lps)) in enumerate(zip(got, expected, strict=True)):
        assert toks == want_toks
        if i != 1:
            assert [(x.token_id, x.logprob, x.top) for x in lps] == [(x.token_id, x.logprob, x.top) for x in want_lps]


def test_token_logprobs_is_log_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 1.0, 0.0, 0.0]])
    out = token_logprobs(logits, [1, 0], 2)
    ref = torch.log_softmax(logits, -1)
    assert out[0].token_id == 1 and out[0].logprob == pytest.approx(float(ref[0, 1]))
    assert [t for t, _ in out[0].top] == [3, 2] and [t for t, _ in out[1].top] == [0, 1]
    assert token_logprobs(logits, [2], 0)[0].top == []  # only the first rows are used
    assert token_logprobs(logits, [], 5) == []


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_token_bytes_and_stop_strings(name):
    """On both real tokenizers (byte-level BPE and SentencePiece with byte fallback), the tokens'
    bytes rebuild the text exactly, characters split across tokens included; through the Python
    API a stop string cuts the log-probabilities with the tokens."""
    import aheadlm

    llm = aheadlm.load(name, drafter="ngram")
    tok = llm.tokenizer
    text = "Grüße, 世界! 🙂 naïve café\n\tdef f(x):  return x ** 2"
    ids = tok.encode(text, add_bos=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    out = llm.generate("1, 2, 3, 4, 5,", max_tokens=30, stop=[" 9"], logprobs=2)
    assert out.finish_reason == "stop" and out.token_ids
    assert [x.token_id for x in out.logprobs] == out.token_ids
    assert all(len(x.top) == 2 for x in out.logprobs)


def test_score_is_a_teacher_forced_forward(target):
    """`Engine.score` gives each prompt token after the first its log-probability (over prefill
    chunks: the prompt is longer than one); scoring leaves what prefill computes unchanged."""
    engine = Engine(target, max_step=8)
    prompt = [(7 * i + 3) % 160 for i in range(21)]
    scored = engine.score(prompt, top=2)
    want = teacher_forced(target, prompt[:1], prompt[1:])
    assert [x.token_id for x in scored] == prompt[1:]
    torch.testing.assert_close(
        torch.tensor([x.logprob for x in scored]), want[torch.arange(20), torch.tensor(prompt[1:])], atol=1e-4, rtol=0
    )
    assert all(len(x.top) == 2 for x in scored)
    for bad, error in (
        ([5], InvalidRequestError),
        (list(range(600)), ContextLengthError),
        ([1, 999], InvalidRequestError),
    ):
        with pytest.raises(error):
            engine.score(bad)


@pytest.mark.parametrize("arch,fmt", [("gemma3", "q8"), ("llama", "q4")])
def test_scored_prefill_equals_plain_prefill(arch, fmt):
    """Running the head on every prompt position changes nothing else: K/V, last logits and
    hidden are the same bits as a plain prefill's, so a scored request decodes the same tokens."""
    _, model = packed_tiny(arch, fmt)
    engine = Engine(model)
    prompt = [(5 * i + 1) % 160 for i in range(150)]
    a, b = engine.new_cache(160), engine.new_cache(160)
    la, ha = engine.prefill(a, prompt)
    scored = []
    lb, hb = engine.prefill(b, prompt, scored=scored, top=1)
    assert torch.equal(la, lb) and torch.equal(ha, hb) and len(scored) == 149
    assert all(torch.equal(x, y) for x, y in zip(a.k + a.v, b.k + b.v, strict=True))


def test_perplexity_windows(target):
    """llama.cpp's windows: `ctx` tokens each, BOS in front, the second half scored; the running
    value is exp of the mean NLL so far; bad windows and short texts are refused clearly."""
    from aheadlm.perplexity import perplexity

    engine = Engine(target)
    tokens = [(11 * i + 2) % 160 for i in range(70)]
    runs = list(perplexity(engine, tokens, 16, bos=1))
    assert [w.index for w in runs] == [1, 2, 3, 4] and runs[-1].tokens == 4 * 7
    nll = 0.0
    for w in range(4):
        chunk = [1] + tokens[w * 16 + 1 : (w + 1) * 16]
        lp = teacher_forced(target, chunk[:1], chunk[1:])  # row j: the distribution of chunk[j + 1]
        nll -= sum(lp[j, chunk[j + 1]].item() for j in range(8, 15))
    assert runs[-1].ppl == pytest.approx(math.exp(nll / 28), rel=1e-4)
    assert runs[-1].ppl_error > 0 and len(list(perplexity(engine, tokens, 16, None, limit=2))) == 2
    for ctx, n in ((2, 70), (600, 700), (16, 10)):
        with pytest.raises(InvalidRequestError):
            list(perplexity(engine, tokens[:n] if n <= 70 else tokens * 10, ctx, None))


@pytest.mark.realmodel
def test_perplexity_command(tmp_path, capsys):
    """`aheadlm perplexity`: llama.cpp's running values then the result, or one JSON object; a
    missing, non-UTF-8 or too short file is a one-line error."""
    from aheadlm.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The printing press changed how knowledge spread across Europe. " * 30)
    assert main(["perplexity", "-m", "smollm2-135m", "-f", str(text), "--ctx", "128", "--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1]") and ",[2]" in out and "PPL = " in out and "in 2 windows of 128" in out
    assert main(["perplexity", "-m", "smollm2-135m", "-f", str(text), "--ctx", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] >= 2 and result["tokens_scored"] == 63 * result["windows"] and result["ppl"] > 1
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    for path, ctx, message in (
        (tmp_path / "none.txt", "128", "No such file"),
        (tmp_path / "bin.txt", "128", "not UTF-8"),
        (text, "4096", "one window needs"),
    ):
        assert main(["perplexity", "-m", "smollm2-135m", "-f", str(path), "--ctx", ctx]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err
