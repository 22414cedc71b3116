"""The HTTP server as a real process on loopback: official openai and ollama clients, streaming and
not, 16 concurrent greedy clients identical to single runs, schema fuzzing, a client that
disconnects mid-stream, and the server healthy after every bad request."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.realmodel

MODEL = "smollm2-135m"
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plain_llm():
    """The server's model in this process, decoding plainly: what the server must agree with."""
    import aheadlm

    return aheadlm.load(MODEL, drafter="none")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "AHEADLM_QUIET": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aheadlm.cli",
            "serve",
            "-m",
            MODEL,
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--drafter",
            "ngram",
            "--slots",
            "8",
            "--max-queue",
            "64",
            "--n-ctx",
            "1024",
            "--max-tokens",
            "64",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode())
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def healthy(base):
    """/health says ok and the scheduler still answers a one-token request."""
    assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    assert httpx.post(base + "/v1/completions", json=body, headers=H, timeout=60).status_code == 200


H = {"Authorization": f"Bearer {KEY}"}


def test_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == [MODEL]
    msgs = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and "aheadlm" in r.usage.model_extra
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same messages again: the row the first request left holds all of the prompt but its last token
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.choices[0].text
    s = "".join(
        x.choices[0].text
        for x in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
    )
    assert s == c.choices[0].text
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert " 7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_penalties_and_logit_bias(server, plain_llm):
    """OpenAI's presence and frequency penalties and `logit_bias`, and Ollama's penalty options,
    give what the Python API gives with the same values; a bias of -100 bans a token."""
    from openai import OpenAI

    llm = plain_llm
    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    prompt = "Count: one, two, three,"
    banned = llm.generate(prompt, max_tokens=1).token_ids[0]
    kw = dict(max_tokens=12, presence_penalty=0.7, frequency_penalty=0.4)
    ref = llm.generate(prompt, **kw, logit_bias={banned: -100})
    assert banned not in ref.token_ids
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw, logit_bias={str(banned): -100})
    assert r.choices[0].text == ref.text
    options = {"num_predict": 12, "temperature": 0, "presence_penalty": 0.7, "frequency_penalty": 0.4}
    body = {"model": MODEL, "prompt": prompt, "raw": True, "stream": False, "options": options}
    g = httpx.post(server + "/api/generate", json=body, headers=H, timeout=60).json()
    assert g["response"] == llm.generate(prompt, **kw).text


def test_json_mode(server, plain_llm):
    """`response_format: json_object` (chat, completions) and Ollama's `format: "json"` give the
    Python API's `json_mode` answer, and it parses as one JSON object; a JSON schema (OpenAI's
    `json_schema`, Ollama's schema `format`) gives the API's `json_schema` answer."""
    from openai import OpenAI

    llm = plain_llm
    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    msgs = [{"role": "user", "content": "Describe a cat as JSON with a name and an age."}]
    ref = llm.chat(msgs, max_tokens=120, json_mode=True)
    assert ref.finish_reason == "stop" and isinstance(json.loads(ref.text), dict)
    kw = dict(model=MODEL, messages=msgs, max_tokens=120, temperature=0, response_format={"type": "json_object"})
    assert client.chat.completions.create(**kw).choices[0].message.content == ref.text
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices
    )
    assert streamed == ref.text
    prompt = "A JSON object for a book, with title and year:"
    want = llm.generate(prompt, max_tokens=60, json_mode=True).text
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert r.choices[0].text == want
    body = {
        "model": MODEL,
        "messages": msgs,
        "stream": False,
        "format": "json",
        "options": {"num_predict": 120, "temperature": 0},
    }
    g = httpx.post(server + "/api/chat", json=body, headers=H, timeout=60).json()
    assert g["message"]["content"] == ref.text

    # a JSON schema: OpenAI's json_schema response format and Ollama's schema `format`
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "indoor": {"type": "boolean"}},
    }
    want = llm.chat(msgs, max_tokens=120, json_schema=schema)
    assert want.finish_reason == "stop" and list(json.loads(want.text)) == ["name", "age", "indoor"]
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}}
    r = client.chat.completions.create(**{**kw, "response_format": fmt})
    assert r.choices[0].message.content == want.text
    g = httpx.post(server + "/api/chat", json={**body, "format": schema}, headers=H, timeout=60).json()
    assert g["message"]["content"] == want.text


def test_embeddings(server, plain_llm):
    """OpenAI's /v1/embeddings (float and the client's default base64) and Ollama's /api/embed and
    /api/embeddings give `LLM.embed`'s unit vectors; a text past the context is an error on
    /v1 and cut to it on Ollama's (its `truncate`, on by default)."""
    from openai import OpenAI

    llm = plain_llm
    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue grew by 8%."]
    want = [llm.embed(t) for t in texts]
    got = [d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data]  # base64 on the wire
    assert len(got[0]) == llm.config.hidden_size
    assert all(g == pytest.approx(w, abs=1e-6) for g, w in zip(got, want, strict=True))
    cos = torch.tensor(got) @ torch.tensor(got).T
    assert abs(float(cos[0, 0]) - 1) < 1e-5 and cos[0, 1] > cos[0, 2]  # the two cat sentences are closest
    r = httpx.post(
        server + "/v1/embeddings", json={"model": MODEL, "input": texts[0], "encoding_format": "float"}, headers=H
    ).json()
    assert r["data"][0]["embedding"] == pytest.approx(want[0], abs=1e-6) and r["usage"]["prompt_tokens"] > 0
    g = httpx.post(server + "/api/embed", json={"model": MODEL, "input": texts[:2]}, headers=H, timeout=60).json()
    assert [pytest.approx(w, abs=1e-6) for w in want[:2]] == g["embeddings"]
    old = httpx.post(server + "/api/embeddings", json={"model": MODEL, "prompt": texts[2]}, headers=H).json()
    assert old["embedding"] == pytest.approx(want[2], abs=1e-6)
    long = "word " * 1500  # past the server's 1,024-token context
    r = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": long}, headers=H, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server + "/api/embed", json={"model": MODEL, "input": long}, headers=H, timeout=60)
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == 1024
    r = httpx.post(
        server + "/api/embed", json={"model": MODEL, "input": long, "truncate": False}, headers=H, timeout=60
    )
    assert r.status_code == 400


def test_tool_calls(server, plain_llm):
    """tool_choice "required" and a named function answer with `tool_calls` whose arguments follow
    the function's parameters, the same as the Python API under the call schema, streamed or not;
    a conversation carrying the call and its result goes on."""
    from openai import OpenAI

    from aheadlm.server import tools
    from aheadlm.server.protocol import ChatMessage

    llm = plain_llm
    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    functions = [t["function"] for t in TOOLS]
    for choice, offered in [
        ("required", functions),
        ({"type": "function", "function": {"name": "add"}}, functions[1:]),
    ]:
        kw = dict(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0)
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        call = c.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        params = next(f["parameters"] for f in functions if f["name"] == call.function.name)
        assert call.function.name in [f["name"] for f in offered] and list(args) == list(params["properties"])
        conv = tools.conversation([ChatMessage(**m) for m in msgs], offered)
        want = llm.chat(conv, max_tokens=120, json_schema=tools.call_schema(offered))
        assert json.loads(want.text) == {"name": call.function.name, "arguments": args}
        deltas = [ch.choices[0] for ch in client.chat.completions.create(**kw, stream=True) if ch.choices]
        streamed = [t for d in deltas if d.delta.tool_calls for t in d.delta.tool_calls]
        assert [(t.function.name, t.function.arguments) for t in streamed] == [
            (call.function.name, call.function.arguments)
        ]
        assert deltas[-1].finish_reason == "tool_calls"
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")


def test_tokenize_and_detokenize(server, plain_llm):
    """vLLM's and llama.cpp server's shapes: a prompt (special tokens as the model adds them), a
    chat (the chat endpoint's prompt), raw content (no special tokens), pieces; ids back to text."""

    llm = plain_llm
    text = "Speculative decoding, naïvely: 🚀"

    def post(path, body):
        r = httpx.post(server + path, json=body, headers=H, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    r = post("/tokenize", {"model": MODEL, "prompt": text})
    assert r["tokens"] == llm.tokenizer.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    msgs = [{"role": "user", "content": "Hi there"}]
    assert post("/tokenize", {"model": MODEL, "messages": msgs})["tokens"] == llm.chat_prompt(msgs)[0]
    raw = post("/tokenize", {"content": text})["tokens"]
    assert raw == llm.tokenizer.encode(text, add_bos=False)
    pieces = post("/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == raw
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text
    back = post("/detokenize", {"model": MODEL, "tokens": raw})
    assert back["prompt"] == back["content"] == text


def test_logprobs(server, plain_llm):
    """OpenAI chat, legacy completions and Ollama give each token's log-probability and the most
    likely alternatives: the same streamed or not, covering the tokens through a stop string, and
    the same bits as plain decoding in this process (the server decodes speculatively, in rows)."""
    from openai import OpenAI

    from aheadlm.server.logprobs import token_text

    llm = plain_llm
    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    msgs = [{"role": "user", "content": "List the first five prime numbers."}]
    ref = llm.chat(msgs, max_tokens=20, logprobs=3)
    want = [(token_text(llm.tokenizer, x.token_id)[0], x.logprob) for x in ref.logprobs]
    kw = dict(model=MODEL, messages=msgs, max_tokens=20, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in content] == want
    shown = len(content) - (r.choices[0].finish_reason == "stop")  # a stop token gets an entry, no text
    assert b"".join(bytes(c.bytes) for c in content[:shown]).decode() == r.choices[0].message.content == ref.text
    assert all(
        len(c.top_logprobs) == 3 and (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (c.token, c.logprob)
        for c in content
    )
    streamed = [
        c
        for chunk in client.chat.completions.create(**kw, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content
    ]
    assert [(c.token, c.logprob) for c in streamed] == want

    prompt = "The capital of France is"
    c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == [x.logprob for x in llm.generate(prompt, max_tokens=8, logprobs=2).logprobs]
    assert "".join(lp.tokens[: len(lp.tokens) - (c.choices[0].finish_reason == "stop")]) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(t in top and 2 <= len(top) <= 3 for t, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    parts = [
        x.choices[0].logprobs
        for x in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2, stream=True
        )
        if x.choices and x.choices[0].logprobs
    ]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    stopped = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"], logprobs=0
    )
    assert len(stopped.choices[0].logprobs.tokens) == stopped.usage.completion_tokens
    assert c.usage.completion_tokens == len(lp.tokens) and r.usage.completion_tokens == len(content)

    body = {"model": MODEL, "prompt": prompt, "raw": True, "stream": False, "logprobs": True, "top_logprobs": 1}
    g = httpx.post(server + "/api/generate", json={**body, "options": {"num_predict": 8}}, headers=H, timeout=60).json()
    assert [x["logprob"] for x in g["logprobs"]] == lp.token_logprobs
    assert (
        "".join(x["token"] for x in g["logprobs"][: len(g["logprobs"]) - (g["done_reason"] == "stop")]) == g["response"]
    )


def test_echo_scores_the_prompt(server, plain_llm):
    """What evaluation harnesses send (lm-eval's local-completions: token ids, echo, logprobs 1,
    max_tokens 1, several prompts a request): the prompt comes back with each token's
    log-probability (the first null), equal bit for bit to `LLM.score` in this process, then the
    completion's; max_tokens 0 scores only; streamed, the prompt is the first chunk."""

    llm = plain_llm
    texts = ["The capital of France is Paris.", "Water boils at 100 degrees Celsius at sea level."]
    ids = [llm.tokenizer.encode(t) for t in texts]
    body = {"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    r = httpx.post(server + "/v1/completions", json={**body, "max_tokens": 1}, headers=H, timeout=120).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for c, p, text in zip(r["choices"], ids, texts, strict=True):
        lp, n = c["logprobs"], len(p)
        want = llm.score(p, logprobs=1)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:n] == [x.logprob for x in want]
        assert len(lp["tokens"]) == n + 1 and c["text"].startswith(text) and len(c["text"]) > len(text)
        assert lp["text_offset"][n] == len(text)
        pairs = zip(lp["token_logprobs"][1:n], lp["top_logprobs"][1:n], strict=True)
        greedy = [max(top.values()) == v for v, top in pairs]
        assert greedy == [x.top[0][0] == t for x, t in zip(want, p[1:], strict=True)]
    assert r["usage"]["prompt_tokens"] == sum(map(len, ids)) and r["usage"]["completion_tokens"] == 2
    only = httpx.post(server + "/v1/completions", json={**body, "max_tokens": 0}, headers=H, timeout=120).json()
    assert [c["text"] for c in only["choices"]] == texts
    assert [c["logprobs"]["token_logprobs"] for c in only["choices"]] == [
        c["logprobs"]["token_logprobs"][:-1] for c in r["choices"]
    ]
    assert only["usage"]["completion_tokens"] == 0 and all(c["finish_reason"] == "length" for c in only["choices"])
    plain = httpx.post(
        server + "/v1/completions", json={"model": MODEL, "prompt": texts[0], "echo": True, "max_tokens": 4}, headers=H
    ).json()["choices"][0]
    assert plain["text"].startswith(texts[0]) and plain["logprobs"] is None
    chunks = []
    stream_body = {"model": MODEL, "prompt": texts[0], "echo": True, "logprobs": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=stream_body, headers=H, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert chunks[0]["text"] == texts[0] and chunks[0]["logprobs"]["token_logprobs"][1:] == [
        x.logprob for x in llm.score(texts[0])
    ]
    assert "".join(c["text"] for c in chunks) == plain["text"]


def test_several_choices(server):
    """`n` choices decode as requests of their own, together: choice i samples with seed + i, so
    each equals a single request with that seed; streamed, each index carries its own text; on
    /v1/completions the choices of each prompt follow each other, as OpenAI orders them."""
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=KEY)
    msgs = [{"role": "user", "content": "Invent a name for a cat."}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=12, temperature=1.0, seed=7)
    r = client.chat.completions.create(**kw, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    singles = [client.chat.completions.create(**{**kw, "seed": 7 + i}).choices[0].message.content for i in range(2)]
    assert [c.message.content for c in r.choices] == singles
    assert r.usage.completion_tokens == sum(
        client.chat.completions.create(**{**kw, "seed": 7 + i}).usage.completion_tokens for i in range(2)
    )
    streamed = ["", ""]
    for chunk in client.chat.completions.create(**kw, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == singles
    c = client.completions.create(model=MODEL, prompt=["Red, green,", "One, two,"], max_tokens=6, temperature=0, n=2)
    assert [x.index for x in c.choices] == [0, 1, 2, 3]
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in ("Red, green,", "One, two,")
    ]
    assert [x.text for x in c.choices] == [alone[0], alone[0], alone[1], alone[1]]


def test_ollama_client(server):
    import ollama

    import aheadlm

    client = ollama.Client(host=server, headers=H)
    assert any(m.model.startswith(MODEL) for m in client.list().models)
    r = client.chat(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], options={"temperature": 0, "num_predict": 16}
    )
    assert r.message.content and r.done
    parts = list(
        client.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            stream=True,
            options={"temperature": 0, "num_predict": 16},
        )
    )
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done
    g = client.generate(model=MODEL, prompt="Why is the sky blue?", options={"temperature": 0, "num_predict": 12})
    assert g.response and g.eval_count > 0
    assert client.show(MODEL).details.family == "llama"
    assert [m.model for m in client.ps().models] == [f"{MODEL}:latest"]
    assert httpx.get(server + "/api/version", headers=H).json()["version"] == aheadlm.__version__


def test_concurrent_greedy_identical(server):
    """16 simultaneous streaming clients get exactly what each gets alone."""
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]

    def ask(p, stream):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": p}],
            "max_tokens": 24,
            "temperature": 0,
            "stream": stream,
        }
        if not stream:
            return httpx.post(server + "/v1/chat/completions", json=body, headers=H, timeout=300).json()["choices"][0][
                "message"
            ]["content"]
        out = []
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=H, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for ch in json.loads(line[6:])["choices"]:
                        out.append(ch["delta"].get("content") or "")
        return "".join(out)

    alone = [ask(p, False) for p in prompts]
    results = [None] * 16
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i], True))) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    m = httpx.get(server + "/metrics").text
    assert "aheadlm_mean_accepted_length" in m and "aheadlm_queue_depth" in m
    cached = int(re.search(r"^aheadlm_cached_prompt_tokens_total (\d+)$", m, re.M).group(1))
    assert cached > 0  # 16 requests repeating 16 earlier prompts: their rows held the prefixes


def test_disconnect_frees_the_slot(server):
    body = {"model": MODEL, "prompt": "Count forever: 1, 2, 3,", "max_tokens": 900, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=H, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # hang up mid-stream
    for _ in range(40):
        if httpx.get(server + "/health").json()["running"] == 0:
            break
        time.sleep(0.25)
    assert httpx.get(server + "/health").json()["running"] == 0
    healthy(server)


CHAT_X = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        },
    },
]
BAD = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": -1}, 400),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
        400,
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 17}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 8, "n": 9}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 3000}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"temperature": "hot"}}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/completions", b"x" * (5 * 2**20), 413),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 1, "seed": 10**30}, 400),
    # lone surrogates, as JSON escapes (json.dumps keeps them ASCII)
    (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a \ud800"}]}).encode(),
        400,
    ),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "a \udcff b"}).encode(), 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"seed": -(10**30), "temperature": 1}}, 400),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        400,
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], []]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 65}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["x", "y"], "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], [10**9]]}, 400),
    ("/v1/chat/completions", {**CHAT_X, "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {**CHAT_X, "logprobs": True, "top_logprobs": -1}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "logprobs": True, "top_logprobs": 99}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"7042": -101}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"hello": 1}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"-3": 1}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {str(10**9): 1}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": [1, 2]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400),
    ("/v1/chat/completions", {**CHAT_X, "tools": TOOLS}, 400),  # tool_choice auto, the default
    ("/v1/chat/completions", {**CHAT_X, "tools": TOOLS, "tool_choice": "auto"}, 400),
    ("/v1/chat/completions", {**CHAT_X, "tool_choice": "required"}, 400),
    (
        "/v1/chat/completions",
        {**CHAT_X, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        400,
    ),
    ("/v1/chat/completions", {**CHAT_X, "tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, 400),
    (
        "/v1/chat/completions",
        {**CHAT_X, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        400,
    ),
    (
        "/v1/chat/completions",
        {
            **CHAT_X,
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string", "pattern": "a"}}}
            ],
            "tool_choice": "required",
        },
        400,
    ),
    ("/v1/chat/completions", {**CHAT_X, "response_format": {"type": "json_schema", "json_schema": {}}}, 400),
    ("/v1/chat/completions", {**CHAT_X, "response_format": {"kind": "json"}}, 400),
    (
        "/v1/chat/completions",
        {
            **CHAT_X,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "a"}}},
        },
        400,
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400),
    ("/v1/chat/completions", {**CHAT_X, "frequency_penalty": -3}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"presence_penalty": "a"}}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGk="]}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "object"}}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": "yaml"}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400),
    ("/v1/embeddings", {"model": MODEL, "input": ""}, 400),
    ("/v1/embeddings", {"model": MODEL, "input": []}, 400),
    ("/v1/embeddings", {"model": MODEL, "input": ["a", ""]}, 400),
    ("/v1/embeddings", {"model": MODEL, "input": "a", "dimensions": 7}, 400),
    ("/v1/embeddings", {"model": MODEL, "input": "a", "encoding_format": "int8"}, 400),
    ("/v1/embeddings", {"model": MODEL, "input": [[10**9]]}, 400),
    ("/v1/embeddings", {"model": "other", "input": "a"}, 404),
    ("/api/embed", {"model": MODEL}, 400),
    ("/api/embed", {"model": MODEL, "input": ["a"] * 300}, 400),
    ("/tokenize", {"model": MODEL, "prompt": "x", "content": "y"}, 400),
    ("/tokenize", {"model": MODEL}, 400),
    ("/tokenize", {"model": MODEL, "messages": []}, 400),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": ["a"]}, 400),
    ("/detokenize", {"model": MODEL}, 400),
    ("/v1/nowhere", {"model": MODEL}, 404),
    ("/health", {}, 405),
]


@pytest.mark.parametrize("path,body,status", BAD)
def test_bad_requests(server, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, headers={**H, "content-type": "application/json"}, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]  # Ollama's shape on /api/..., OpenAI's elsewhere
    assert err if path.startswith("/api/") else err["message"]
    assert "Value error," not in str(err)  # pydantic's wrapper is not part of the message
    healthy(server)


def test_off_values_of_unsupported_fields_and_lenient_content_types(server):
    """Clients send the "off" values of fields we lack (logprobs false, penalties 0): those pass.
    Ollama's docs post with `curl -d` (a form content type): the JSON body is read all the same."""
    body = {**CHAT_X, "max_tokens": 2, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0}
    r = httpx.post(server + "/v1/chat/completions", json={**body, "repetition_penalty": 1.3}, headers=H, timeout=60)
    assert r.status_code == 200, r.text
    form = {**H, "content-type": "application/x-www-form-urlencoded"}
    data = json.dumps({"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    r = httpx.post(server + "/api/generate", content=data, headers=form, timeout=60)
    assert r.status_code == 200 and r.json()["done"], r.text


def test_metrics_fold_unknown_paths(server):
    httpx.get(server + "/x%22y%0Az", headers=H, timeout=10)
    text = httpx.get(server + "/metrics", timeout=10).text
    assert 'endpoint="other",status="404"' in text
    assert all(line.count('"') % 2 == 0 for line in text.splitlines())  # no broken label quoting


def test_non_streamed_request_is_cancelled_when_the_client_leaves(server):
    body = {"model": MODEL, "prompt": "Count forever: 1, 2, 3,", "max_tokens": 900}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json=body, headers=H, timeout=1.0)
    # about 6 s of decoding were asked for; a cancelled request frees its row within a second
    t0 = time.monotonic()
    while httpx.get(server + "/health").json()["running"] and time.monotonic() - t0 < 3:
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["running"] == 0
    healthy(server)


def test_error_after_the_stream_started_is_its_last_event():
    """The timeout after a 200 went out becomes a final error event (then [DONE] for SSE)."""
    import asyncio

    from aheadlm.server.protocol import APIError
    from aheadlm.server.responses import ends_with_error, ndjson_error, sse_error

    async def chunks():
        yield "data: 1\n\n"
        raise APIError(504, "generation exceeded the 4s timeout", "timeout")

    async def collect(render):
        return [c async for c in ends_with_error(chunks(), render)]

    sse = asyncio.run(collect(sse_error))
    assert sse[0] == "data: 1\n\n" and "exceeded" in sse[1] and sse[1].endswith("data: [DONE]\n\n")
    nd = asyncio.run(collect(ndjson_error))
    assert json.loads(nd[1]) == {"error": "generation exceeded the 4s timeout"}


def test_serve_refuses_an_empty_api_key_and_a_busy_port(server, capsys):
    from aheadlm.cli import main

    assert main(["serve", "-m", MODEL, "--api-key", ""]) == 1
    assert "--api-key must not be empty" in capsys.readouterr().err
    port = server.rsplit(":", 1)[1]
    assert main(["serve", "-m", MODEL, "--port", port]) == 1
    assert "cannot listen on" in capsys.readouterr().err


def test_streamed_bodies(server):
    """A chunked body (no Content-Length) over the limit gets the same 413; a small one works."""

    def chunks(data: bytes):
        for i in range(0, len(data), 2**16):
            yield data[i : i + 2**16]

    url, hdr = server + "/v1/completions", {**H, "content-type": "application/json"}
    r = httpx.post(url, content=chunks(b"x" * (5 * 2**20)), headers=hdr, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"]
    ok = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    assert httpx.post(url, content=chunks(ok), headers=hdr, timeout=60).status_code == 200
    healthy(server)


def test_tiny_temperature_is_greedy(server):
    """Dividing logits by 1e-40 overflows; such temperatures decode greedily (as in vLLM), and the
    server stays up."""
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8}
    texts = []
    for t in (0, 1e-40):
        r = httpx.post(server + "/v1/completions", json={**body, "temperature": t}, headers=H, timeout=60)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1]
    healthy(server)


def test_api_key_enforced(server):
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or infinity
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat", "/api/show"]),
    extra=st.dictionaries(
        st.sampled_from(
            [
                "model",
                "messages",
                "prompt",
                "max_tokens",
                "temperature",
                "top_p",
                "stop",
                "stream",
                "seed",
                "options",
                "n",
                "stream_options",
                "logprobs",
                "top_logprobs",
            ]
        ),
        json_values,
        max_size=6,
    ),
)
def test_fuzz_schemas(server, path, extra):
    body = {"model": MODEL, "max_tokens": 4, "options": {"num_predict": 4}, **extra}
    r = httpx.post(server + path, json=body, headers=H, timeout=120)
    assert r.status_code < 500, r.text
    healthy(server)
