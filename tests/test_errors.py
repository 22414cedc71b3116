"""Bad input gives one clear line: typed exceptions from the API, exit code 1 from the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import aheadlm
from aheadlm.cli import main
from aheadlm.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightsError,
)
from aheadlm.registry import resolve


def write_gguf(path, arch="llama", tensor_type=None):
    """A tiny GGUF with llama-style metadata and one embedding tensor."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(64)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    else:
        _, nbytes = gguf.GGML_QUANT_SIZES[tensor_type]
        raw = np.zeros((64, 32 // 32 * nbytes), dtype=np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_missing_model(capsys):
    with pytest.raises(ModelNotFoundError):
        aheadlm.load("/nonexistent/model.gguf")
    code, err = cli(capsys, "generate", "hi", "--model", "no-such-model")
    assert code == 1 and err.startswith("error: model 'no-such-model' not found") and "Traceback" not in err


def test_truncated_gguf(tmp_path, capsys):
    src = resolve("smollm2-135m")
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(WeightsError, match="truncated"):
        aheadlm.load(bad)
    code, err = cli(capsys, "generate", "hi", "--model", str(bad))
    assert code == 1 and "truncated" in err and err.count("\n") == 1


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a model at all" * 100)
    with pytest.raises(WeightsError, match="not a GGUF"):
        aheadlm.load(bad)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(WeightsError):
        aheadlm.load(header_only)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    write_gguf(p, arch="mamba")
    with pytest.raises(UnsupportedModelError, match="architecture 'mamba'"):
        aheadlm.load(p)


def test_unsupported_tensor_type(tmp_path):
    import gguf

    p = tmp_path / "q81.gguf"
    write_gguf(p, tensor_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        aheadlm.load(p)


def test_hf_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        aheadlm.load(tmp_path)


def test_hf_folder_unsupported_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        aheadlm.load(tmp_path)


def test_corrupt_cache_is_reported(tmp_path):
    from aheadlm.checkpoint import _gguf_cache_path

    aheadlm.load("smollm2-135m")  # make sure the cache exists
    copy = tmp_path / "cached"
    shutil.copytree(_gguf_cache_path(resolve("smollm2-135m")), copy)
    st = copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="delete the folder"):
        aheadlm.load(copy)


@pytest.fixture(scope="module")
def small_llm():
    return aheadlm.load("smollm2-135m", n_ctx=64)


def test_prompt_longer_than_context(small_llm, capsys):
    with pytest.raises(ContextLengthError, match="context holds 64"):
        small_llm.generate("word " * 100, max_tokens=4)
    code, err = cli(capsys, "generate", "word " * 100, "-m", "smollm2-135m", "--n-ctx", "64")
    assert code == 1 and "context holds 64" in err


def test_generation_stops_at_context_end(small_llm):
    out = small_llm.generate("Count: 1, 2, 3,", max_tokens=500, ignore_eos=True)
    prompt_len = len(small_llm.tokenizer.encode("Count: 1, 2, 3,"))
    assert out.finish_reason == "length"
    assert prompt_len + len(out.token_ids) == 64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_p": 1.5},
        {"top_k": -3},
        {"min_p": 2},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": 1e-300, "temperature": 0.8},  # logits / 1e-300 overflow
        {"max_tokens": 0},
        {"seed": 10**30, "temperature": 1.0},  # beyond what torch.Generator takes
        {"seed": "1", "temperature": 1.0},
        {"seed": 1.5, "temperature": 1.0},
        {"stop": 5},
        {"stop": [5]},
        {"presence_penalty": 2.5},
        {"frequency_penalty": float("nan")},
        {"frequency_penalty": "1"},
        {"logit_bias": {"12": 1.0}},  # the Python API takes ids as ints
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {12: 101}},
        {"logit_bias": {10**9: 1.0}},  # past the vocabulary
        {"logit_bias": [12, 1.0]},
    ],
)
def test_bad_sampling_values(small_llm, kwargs):
    args = {"max_tokens": 4, **kwargs}
    with pytest.raises(InvalidRequestError):
        small_llm.generate("hi", **args)


@pytest.mark.parametrize("prompt", [["a", "b"], [10**9], None, 5, b"hi", "hi \ud800 there"])
def test_bad_prompts(small_llm, prompt):
    with pytest.raises(InvalidRequestError):
        small_llm.generate(prompt, max_tokens=2)


@pytest.mark.parametrize(
    "messages", [[], "hi", [{"role": "user", "content": 5}], [{"role": "user", "content": None}], [{"content": "x"}]]
)
def test_bad_messages(small_llm, messages):
    with pytest.raises(InvalidRequestError):
        small_llm.chat(messages, max_tokens=2)


def test_tiny_temperature_decodes_greedily(small_llm):
    """1e-40 would overflow the logits; below 1e-5 a temperature means greedy (as in vLLM)."""
    greedy = small_llm.generate("The capital of France is", max_tokens=6)
    tiny = small_llm.generate("The capital of France is", max_tokens=6, temperature=1e-40, seed=3)
    assert tiny.token_ids == greedy.token_ids


@pytest.mark.parametrize("kwargs", [{"n_ctx": "512"}, {"n_ctx": 0}, {"device": "tpu"}, {"device": 0}, {"model": 123}])
def test_bad_load_arguments(kwargs):
    args = {"model": "smollm2-135m", **kwargs}
    with pytest.raises(InvalidRequestError):
        aheadlm.load(args.pop("model"), **args)


def test_undecodable_prompt_on_the_command_line(capsys):
    code, err = cli(capsys, "generate", "hi \udcff", "-m", "smollm2-135m", "-n", "2")
    assert code == 1 and "not valid UTF-8" in err and err.count("\n") == 1


def _hf_folder(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(tmp_path)


LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "config,message",
    [
        ("[]", "malformed config"),
        ("\u00ff\u00fe not json", "malformed config"),
        ({**LLAMA, "num_attention_heads": 0}, "malformed config"),
        ({**LLAMA, "hidden_size": "32", "head_dim": 8}, "hidden_size must be a positive integer"),
        ({**LLAMA, "num_hidden_layers": -1}, "num_layers must be a positive integer"),
        ({"target_hidden": 576, "hidden_size": 576}, "pass it with --drafter"),
    ],
)
def test_malformed_model_config(tmp_path, capsys, config, message):
    folder = _hf_folder(tmp_path, config)
    code, err = cli(capsys, "models", folder)
    assert code == 1 and message in err and err.count("\n") == 1


def test_gguf_without_a_required_key(tmp_path):
    import gguf

    p = tmp_path / "noblocks.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_feed_forward_length(64)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match="lacks 'llama.block_count'"):
        aheadlm.load(p)


def test_damaged_drafter_config(tmp_path):
    from aheadlm.checkpoint import read_config
    from aheadlm.drafter import load_drafter

    shutil.copytree(Path(aheadlm.__file__).parent / "drafters" / "gemma3-270m", tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**cfg, "hidden_size": str(cfg["hidden_size"])}))
    with pytest.raises(WeightsError, match="hidden_size must be a positive integer"):
        load_drafter(tmp_path / "d", read_config(resolve("gemma3-270m")))


def test_chat_session_survives_a_turn_past_the_context(monkeypatch, capsys):
    lines = iter(["word " * 80, "Hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    code = main(["chat", "-m", "smollm2-135m", "--n-ctx", "64", "-n", "2"])
    out = capsys.readouterr()
    assert code == 0 and "context holds 64" in out.err and "/reset" in out.err
    assert out.out.strip()  # the second turn was answered


def test_bench_checks_its_inputs_before_loading(tmp_path, capsys):
    base = ["bench", "-m", "no-such-model", "--methods", "ngram", "--max-tokens", "2", "--quiet"]
    bad_records = ['{"turns": [123]}', '{"turns": "hello"}', '{"turns": ["hi"], "category": ["x"]}']
    for i, record in enumerate(bad_records):
        f = tmp_path / f"p{i}.jsonl"
        f.write_text(record + "\n")
        code, err = cli(capsys, *base, "--prompts", str(f))
        assert code == 1 and "not a Spec-Bench record" in err, err  # not "model not found": checked first
    good = tmp_path / "ok.jsonl"
    good.write_text('{"turns": ["hi"]}\n')
    code, err = cli(capsys, *base, "--prompts", str(tmp_path))
    assert code == 1 and "is not a file" in err
    code, err = cli(capsys, *base, "--prompts", str(good), "--json", str(tmp_path))
    assert code == 1 and "is a folder" in err
    code, err = cli(capsys, *base, "--prompts", str(good), "--plot", str(tmp_path / "p.xyz"))
    assert code == 1 and "--plot" in err


def test_serve_flags_are_checked_before_loading(capsys):
    for flags, message in ((["--port", "99999"], "--port"), (["--max-queue", "0"], "--max-queue")):
        code, err = cli(capsys, "serve", "-m", "no-such-model", *flags)
        assert code == 1 and message in err, err


def test_bad_dtype(capsys):
    code, err = cli(capsys, "generate", "hi", "-m", "smollm2-135m", "--dtype", "int3")
    assert code == 1 and "unknown dtype" in err


class _FailingEngine:
    """Stands in for the batch engine: admits into one row; `step` raises a bug when told to."""

    def __init__(self):
        self.rows, self.fail_step, self.released = [None], False, []

    @property
    def active(self):
        return [r for r in self.rows if r is not None]

    def has_free_slot(self):
        return None in self.rows

    def admit(self, req):
        if req.prompt == [666]:
            raise RuntimeError("admission bug")
        self.rows[0], req.row = req, 0

    def step(self):
        if self.fail_step:
            raise ZeroDivisionError("step bug")
        for r in self.active:
            self.release(r)
            r.emit([1], "stop")

    def release(self, req, keep=True):
        if self.rows[0] is req:
            self.rows[0] = None
            self.released.append(req)


def test_scheduler_survives_engine_bugs():
    """An unexpected exception fails only the requests it touched (as `internal:`), frees their
    rows, and the scheduler thread goes on serving."""
    import asyncio

    from aheadlm.sampling import SamplingParams
    from aheadlm.server.batching import Request
    from aheadlm.server.scheduler import Scheduler

    engine = _FailingEngine()
    sched = Scheduler(engine)
    loop = asyncio.new_event_loop()

    def run(prompt):
        req = Request(prompt, SamplingParams(), 4, (), emit=None)
        queue = sched.submit(req, loop)
        return req, loop.run_until_complete(asyncio.wait_for(queue.get(), 10))

    try:
        assert run([666])[1][1].startswith("internal:RuntimeError")
        engine.fail_step = True
        req, (_, finish, _) = run([1])
        assert finish.startswith("internal:ZeroDivisionError") and req in engine.released
        assert engine.rows == [None]
        engine.fail_step = False
        assert run([2])[1] == ([1], "stop", None)
        assert sched.thread.is_alive()
    finally:
        sched.shutdown()
        loop.close()


# -- audit of 2026-12-07, second round ------------------------------------------------------------


def test_stale_kernel_build_lock_is_cleared(tmp_path):
    """A torch `lock` left by a process killed mid-build made every later start wait forever."""
    import threading

    from torch.utils.file_baton import FileBaton

    from aheadlm import kernels

    if kernels.fcntl is None:
        pytest.skip("no fcntl: torch's lock alone, as before")
    (tmp_path / "lock").touch()
    with kernels.build_lock(tmp_path):
        baton = FileBaton(str(tmp_path / "lock"))
        assert baton.try_acquire()  # the stale lock is gone: torch's load would not wait
        baton.release()
    # a live builder (holding our flock) is waited for, not raced
    import fcntl

    entered = threading.Event()

    def build():
        with kernels.build_lock(tmp_path):
            entered.set()

    with open(tmp_path / "aheadlm-build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=build)
        waiter.start()
        assert not entered.wait(0.3)
    assert entered.wait(10)
    waiter.join()


def test_kernels_load_past_a_stale_lock(tmp_path):
    """The real build, copied (already compiled) into a fresh cache with a stale torch lock."""
    import subprocess
    import sys

    from aheadlm.kernels import build_dir, cpu_kernels

    build = build_dir()
    if cpu_kernels() is None or not any(build.glob("*.so")):
        pytest.skip("no compiled CPU kernels here")
    copy = tmp_path / "kernels" / build.name
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("lock", "aheadlm-build.lock"))
    (copy / "lock").touch()
    code = "from aheadlm.kernels import cpu_kernels; print(cpu_kernels() is not None)"
    env = {**__import__("os").environ, "AHEADLM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
    assert not (copy / "lock").exists()


def _word_tokenizer(template=None, source=None):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from aheadlm.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    return Tokenizer(backend, bos_id=None, eos_id=None, add_bos=False, chat_template=template, template_source=source)


def test_chat_template_errors():
    msgs = [{"role": "user", "content": "hi"}]
    tok = _word_tokenizer("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="Conversation roles must alternate"):
        tok.chat_ids(msgs)
    with pytest.raises(ValueError):  # the trainer skips such conversations by catching ValueError
        tok.chat_ids(msgs)
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        _word_tokenizer("{{ nothing.attr }}").chat_ids(msgs)
    with pytest.raises(WeightsError, match=r"tpl.jinja: the chat template is not valid Jinja \(line 1"):
        _word_tokenizer("{% for m in messages %}{{ m.content }", "tpl.jinja").chat_ids(msgs)


def test_hf_folder_chat_template_syntax_error_names_the_file(tmp_path):
    from aheadlm.tokenizer import Tokenizer

    _word_tokenizer().backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    tok = Tokenizer.load(tmp_path)
    with pytest.raises(WeightsError, match="chat_template.jinja: the chat template is not valid Jinja"):
        tok.render_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("content", [None, b"", b"{not json", b'{"version": "1.0"}'])
def test_hf_folder_tokenizer_missing_or_unreadable(tmp_path, content):
    from aheadlm.tokenizer import Tokenizer

    (tmp_path / "config.json").write_text("{}")
    if content is not None:
        (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(WeightsError, match=r"tokenizer.json: missing or unreadable \(") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_devices_torch_names_but_the_engine_cannot_use(device):
    from aheadlm.api import resolve_device

    with pytest.raises(InvalidRequestError, match=f"device '{device}' is not supported \\(use cpu or cuda\\)"):
        resolve_device(device)
    assert resolve_device("cpu") == "cpu"


class _FakeLLM:
    """Stands in for a loaded model in CLI tests: streams the given texts, then `after` (an exception)."""

    name = "fake"

    def __init__(self, *turns):
        self.turns, self.seen = list(turns), []

    def _steps(self, texts, after=None):
        from aheadlm.outputs import Step

        for i, t in enumerate(texts):
            yield Step([i], "stop" if i == len(texts) - 1 and after is None else None, text=t)
        if after is not None:
            raise after

    def stream(self, prompt, stats=None, **kwargs):
        return self._steps(*self.turns.pop(0))

    def stream_chat(self, messages, **kwargs):
        self.seen.append([dict(m) for m in messages])
        return self._steps(*self.turns.pop(0))


def test_output_the_terminal_cannot_encode_is_replaced(monkeypatch):
    import io

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="cp1252")
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("aheadlm.cli._load", lambda a: _FakeLLM((["hello ", "你好"],)))
    assert main(["generate", "hi"]) == 0
    out.flush()
    assert raw.getvalue() == b"hello ??\n"


def test_broken_pipe_exits_quietly(monkeypatch, capsys):
    import io

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("aheadlm.cli._load", lambda a: _FakeLLM((["hello"],)))
    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["generate", "hi"]) == 141
    assert capsys.readouterr().err == ""


def test_closed_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", None)
    code, err = cli(capsys, "generate", "-", "-m", "no-such-model")
    assert code == 1 and err == "error: no standard input to read the prompt from\n"
    code, err = cli(capsys, "chat", "-m", "no-such-model")  # checked before loading
    assert code == 1 and err.startswith("error: no standard input")


def test_ctrl_c_stops_one_chat_reply(monkeypatch, capsys):
    llm = _FakeLLM((["Once upon", " a time"], KeyboardInterrupt()), ([], KeyboardInterrupt()), (["ok"],))
    lines = iter(["tell a story", "again", "thanks", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    monkeypatch.setattr("aheadlm.cli._load", lambda a: llm)
    assert main(["chat"]) == 0
    # the partial reply stays (it was shown); the turn interrupted before any text is dropped
    assert llm.seen[-1] == [
        {"role": "user", "content": "tell a story"},
        {"role": "assistant", "content": "Once upon a time"},
        {"role": "user", "content": "thanks"},
    ]
    assert capsys.readouterr().out == "Once upon a time\n\nok\n"

    def interrupt(_prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupt)  # Ctrl-C at the prompt still ends the session
    assert main(["chat"]) == 130


def test_empty_and_pointless_drafter_names():
    import torch

    from aheadlm.proposers import make_proposer

    target = torch.nn.Linear(1, 1)  # only its device is read before the spec is refused
    for spec, message in [
        ("ngram+draft:", "draft model's name is empty"),
        ("draft:", "draft model's name is empty"),
        ("", "drafter name is empty"),
        ("ngram+ngram", "needs a model drafter X"),
        ("ngram+none", "needs a model drafter X"),
        ("ngram+ngram+ngram", "needs a model drafter X"),
        ("ngram+", "needs a model drafter X"),
    ]:
        with pytest.raises(ModelNotFoundError, match=message):
            make_proposer(spec, target)
    with pytest.raises(InvalidRequestError, match="model name is empty"):
        aheadlm.load("")
    with pytest.raises(ModelNotFoundError, match="model name is empty"):
        resolve("")


def test_bench_refuses_zero_limit_and_fallback(tmp_path, capsys):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"turns": ["hi"]}\n')
    base = ["bench", "-m", "no-such-model", "--prompts", str(good), "--quiet"]
    for flags, message in (
        (["--limit", "0"], "--limit must be at least 1"),
        (["--fallback-k", "0"], "--fallback-k must be in 1..32"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    ):
        code, err = cli(capsys, *base, *flags)
        assert code == 1 and message in err, err


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_tokens": True}, "max_tokens must be a positive integer"),
        ({"ignore_eos": "no"}, "ignore_eos must be True or False"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of token ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids must be a list of token ids"),
        ({"stats": 5}, "stats must be a GenerationStats"),
    ],
)
def test_bad_generate_argument_types(small_llm, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        small_llm.generate("hi", **{"max_tokens": 2, **kwargs})


@pytest.mark.parametrize("kwargs", [{"draft_tokens": True}, {"fallback_k": False}, {"adaptive": "yes"}])
def test_bool_and_non_bool_load_arguments(kwargs):
    with pytest.raises(InvalidRequestError):
        aheadlm.load("smollm2-135m", **kwargs)


def test_collections_and_numpy_integers_are_accepted(small_llm):
    """What worked before the argument checks keeps working: sets of stop strings, ranges and numpy
    arrays of stop ids, numpy integers as counts and token ids, a tuple of messages."""
    base = small_llm.generate("Count: 1, 2, 3, 4,", max_tokens=3)
    for kw in ({"stop_token_ids": range(0, 3)}, {"stop_token_ids": np.array([13])}, {"max_tokens": np.int64(3)}):
        assert small_llm.generate("Count: 1, 2, 3, 4,", **{"max_tokens": 3, **kw}).token_ids == base.token_ids
    assert small_llm.generate("Count: 1, 2, 3, 4,", max_tokens=3, stop={base.text[:2]}).finish_reason == "stop"
    ids = small_llm.tokenizer.encode("Count: 1, 2, 3, 4,")
    assert small_llm.generate([np.int64(i) for i in ids], max_tokens=3).token_ids == base.token_ids
    assert small_llm.chat(({"role": "user", "content": "hi"},), max_tokens=2).token_ids


def test_plot_takes_what_matplotlib_writes(tmp_path, capsys):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"turns": ["hi"]}\n')
    base = ["bench", "-m", "no-such-model", "--methods", "ngram", "--prompts", str(good), "--quiet"]
    for name in ("p.webp", "p.svgz", "plot"):  # checked, then the run fails on the model
        code, err = cli(capsys, *base, "--plot", str(tmp_path / name))
        assert code == 1 and "not found" in err and "--plot" not in err


def test_serve_listen_check_knows_ipv6():
    import socket

    from aheadlm.server.cli import _check_listen

    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as s:
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    _check_listen("::1", port)  # free again: no error
    with socket.create_server(("::1", port), family=socket.AF_INET6), pytest.raises(InvalidRequestError):
        _check_listen("::1", port)
