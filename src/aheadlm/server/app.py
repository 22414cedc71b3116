"""OpenAI- and Ollama-compatible HTTP API over the batching scheduler (FastAPI).

aheadlm serve --model gemma3-270m --port 8000
curl localhost:8000/v1/chat/completions -d '{"model": "gemma3-270m", "messages": [...]}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..api import LLM, _StopMatcher, _through_stop
from ..errors import ContextLengthError
from ..sampling import SamplingParams
from ..tokenizer import TextStream
from . import embeddings, error_handlers, model_info, tokenization, tools
from .batching import Request as EngineRequest
from .error_handlers import error_response
from .logprobs import chat_logprobs, completion_logprobs, joined, prompt_logprobs
from .metrics import endpoint_label, prometheus
from .middleware import BodyLimit, JsonBodies
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    OllamaChat,
    OllamaGenerate,
    OllamaOptions,
)
from .responses import (
    chain,
    client_gone,
    collect,
    ends_with_error,
    first_item,
    gather_all,
    merge,
    ndjson_error,
    now_rfc3339,
    sse_error,
    sse_event,
    usage,
)
from .scheduler import QueueFull, Scheduler


@dataclass
class ServerState:
    llm: LLM
    scheduler: Scheduler
    name: str
    n_ctx: int
    api_key: str | None = None
    timeout: float = 600.0
    max_body: int = 4 * 2**20
    default_max_tokens: int = 512
    file_size: int = 0


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="aheadlm", version="0.1.0")
    app.state.s = state
    app.add_middleware(BodyLimit, limit=state.max_body)
    app.add_middleware(JsonBodies)
    tok = state.llm.tokenizer
    known_paths: set[str] = set()  # filled once the routes below exist

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = endpoint_label(request.url.path, known_paths)
        if state.api_key and path not in ("/health", "/metrics"):
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {state.api_key}":
                resp = JSONResponse(APIError(401, "invalid or missing API key", "invalid_api_key").body(), 401)
                state.scheduler.metrics.requests[(path, 401)] += 1
                return resp
        try:
            resp = await call_next(request)
        except APIError as e:
            resp = error_response(request.url.path, e)  # the real path picks the error's shape
        state.scheduler.metrics.requests[(path, resp.status_code)] += 1
        return resp

    error_handlers.install(app)

    def check_model(name: str) -> None:
        base = name[: -len(":latest")] if name.endswith(":latest") else name
        if base != state.name:
            raise APIError(
                404, f"model {name!r} not found; this server runs {state.name!r}", "model_not_found", "model"
            )

    def sampling(o, repetition_penalty, logit_bias=None) -> SamplingParams:
        """The sampling fields both APIs share (`o`), the repetition penalty each names its way."""
        return SamplingParams(
            temperature=0.0 if o.temperature is None else float(o.temperature),
            top_k=o.top_k,
            top_p=None if o.top_p is None else float(o.top_p),
            min_p=None if o.min_p is None else float(o.min_p),
            repetition_penalty=repetition_penalty,
            seed=o.seed,
            presence_penalty=float(o.presence_penalty or 0.0),
            frequency_penalty=float(o.frequency_penalty or 0.0),
            logit_bias=logit_bias,
        )

    def budget(requested: int | None, prompt_len: int) -> int:
        if prompt_len >= state.n_ctx:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens; the context holds {state.n_ctx}")
        if requested is not None and requested > state.n_ctx:
            raise APIError(
                400, f"max_tokens {requested} exceeds the context size {state.n_ctx}", "invalid_value", "max_tokens"
            )
        return requested if requested is not None else min(state.default_max_tokens, state.n_ctx - prompt_len)

    async def run(
        http: Request,
        ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        stops: list[str],
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        json_format: bool | dict = False,
    ) -> AsyncIterator:
        """Yields (text delta, finish_reason | None, engine request, the log-probabilities of the
        tokens behind the delta: a list when `logprobs` is set, else None). With `prompt_logprobs`
        the request's `prompt_scored` is filled before the first item; `json_format` (True, or a
        schema) constrains the output to a JSON object, or to a value of the schema."""
        schema = json_format if isinstance(json_format, dict) else None
        # the first JSON-mode request builds the vocabulary's table: off the event loop
        guide = await asyncio.to_thread(state.llm.json_guide, (), schema) if json_format else None
        req = EngineRequest(
            ids,
            params,
            max_tokens,
            tok.stop_ids,
            emit=None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            guide=guide,
        )
        try:
            queue = state.scheduler.submit(req, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(503, str(e), "server_busy") from None
        text, matcher, done = TextStream(tok), _StopMatcher(stops), False
        deadline = time.monotonic() + state.timeout
        next_check = time.monotonic() + 0.5
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(504, f"generation exceeded the {state.timeout:.0f}s timeout", "timeout")
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=min(left, 0.5))
                except asyncio.TimeoutError:
                    item = None
                # checked while tokens flow too: a client that gave up on a long non-streamed
                # answer must free its row, not hold it to the end
                if time.monotonic() >= next_check:
                    if await client_gone(http):
                        return
                    next_check = time.monotonic() + 0.5
                if item is None:
                    continue
                tokens, finish, lps = item
                if finish and finish.startswith("error:"):
                    raise APIError(400, finish[len("error:") :], "invalid_request")
                if finish and finish.startswith("internal:"):
                    raise APIError(500, f"internal error ({finish[len('internal:') :]})", "server_error")
                delta = text.push(tokens) + (text.flush() if finish else "")
                out, hit = matcher.feed(delta)
                if hit:
                    done = True
                    # a round may have run past the stop string: count what plain decoding emits
                    before = text.ids[: len(text.ids) - len(tokens)]
                    through = _through_stop(tok, before, tokens, stops)
                    req.completion_tokens = len(before) + len(through)
                    yield out, "stop", req, None if lps is None else lps[: len(through)]
                    return
                if finish:
                    done = True
                    yield out + matcher.flush(), finish, req, lps
                    return
                if out or lps:
                    yield out, None, req, lps
        finally:
            if not done:
                state.scheduler.cancel(req)

    def chat_ids(messages, functions: list[dict] | None = None) -> tuple[list[int], list[str]]:
        msgs = tools.conversation(messages, functions)
        try:
            return state.llm.chat_prompt(msgs)
        except ValueError as e:  # the chat template rejected the conversation
            raise APIError(400, f"messages: {e}", "invalid_request", "messages") from None

    def stops_of(stop) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    # -- OpenAI ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        alive = state.scheduler.thread.is_alive()  # without it every request would wait to time out
        body = {
            "status": "ok" if alive else "error",
            "model": state.name,
            "running": state.scheduler.running,
            "queued": state.scheduler.queue_depth,
        }
        return body if alive else JSONResponse(body, 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "aheadlm"}]}

    def choice_params(params: SamplingParams, i: int) -> SamplingParams:
        """Choice i of a request with `n` > 1 samples with seed + i, so that seeded choices differ
        from each other and each is reproducible (greedy choices are all the same)."""
        if i == 0 or params.seed is None:
            return params
        seed = params.seed + i
        return dataclasses.replace(params, seed=seed - 2**64 if seed >= 2**64 else seed)  # torch takes < 2**64

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        check_model(body.model)
        functions = body.functions()  # then the answer is a call to one of them
        ids, extra = chat_ids(body.messages, functions)
        params = sampling(body, body.repetition_penalty, body.logit_bias)
        n = budget(body.max_completion_tokens or body.max_tokens, len(ids))
        stops = stops_of(body.stop) + extra
        fmt = tools.call_schema(functions) if functions else body.json_format()
        streams = [
            run(http, ids, choice_params(params, i), n, stops, body.logprob_count(), json_format=fmt)
            for i in range(body.n)
        ]
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": state.name}

        def logprobs(lps):
            return None if lps is None else {"content": chat_logprobs(tok, lps), "refusal": None}

        def message(text: str, finish: str) -> tuple[dict, str]:
            """The assistant's message and finish reason: a finished call as `tool_calls`."""
            if functions and finish == "stop":
                return {"role": "assistant", "content": None, "tool_calls": tools.tool_calls(text)}, "tool_calls"
            return {"role": "assistant", "content": text}, finish

        if not body.stream:
            results = await gather_all(streams)
            choices = []
            for i, (text, finish, _, lps) in enumerate(results):
                msg, reason = message(text, finish)
                choices.append({"index": i, "message": msg, "logprobs": logprobs(lps), "finish_reason": reason})
            reqs = [r for _, _, r, _ in results if r is not None]
            return {**base, "object": "chat.completion", "choices": choices, "usage": usage(*reqs) if reqs else None}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        merged = merge(streams)
        first = await first_item(merged)

        async def events():
            extra_usage = {"usage": None} if include_usage else {}

            def chunk(c: dict) -> str:
                return sse_event({**base, "object": "chat.completion.chunk", "choices": [c], **extra_usage})

            for i in range(body.n):
                yield chunk(
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                )
            reqs, calls = {}, {}
            async for i, (delta, finish, r, lps) in chain(first, merged):
                reqs[i] = r
                if functions:  # a call is sent whole once it is complete (a cut-off one as text)
                    calls[i] = calls.get(i, "") + delta
                    if finish:
                        msg, reason = message(calls[i], finish)
                        for k, call in enumerate(msg.get("tool_calls") or []):
                            call["index"] = k  # streamed calls carry their place
                        yield chunk({"index": i, "delta": msg, "logprobs": None, "finish_reason": None})
                        yield chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": reason})
                    continue
                if delta or lps:  # tokens whose text is held back still report their logprobs
                    yield chunk(
                        {"index": i, "delta": {"content": delta}, "logprobs": logprobs(lps), "finish_reason": None}
                    )
                if finish:
                    yield chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": finish})
            if include_usage and reqs:
                usage_body = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(*reqs.values())}
                yield sse_event(usage_body)
            yield "data: [DONE]\n\n"

        return StreamingResponse(ends_with_error(events(), sse_error), media_type="text/event-stream")

    def completion_ids(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            ids = prompt
            if any(not isinstance(i, int) or i < 0 or i >= state.llm.config.vocab_size for i in ids):
                raise APIError(400, "prompt token ids out of the vocabulary range", "invalid_value", "prompt")
        if not ids:
            raise APIError(400, "prompt must not be empty", "invalid_value", "prompt")
        return ids

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        prompts = [completion_ids(p) for p in body.prompts()]
        if body.stream and len(prompts) > 1:
            raise APIError(400, "a streamed request takes one prompt", "invalid_value", "prompt")
        params = sampling(body, body.repetition_penalty, body.logit_bias)
        scoring = body.max_tokens == 0  # echo only: the engine decodes one token, which is dropped
        scored = body.logprobs if body.echo else None
        stops = stops_of(body.stop)
        jobs = [(ids, i) for ids in prompts for i in range(body.n)]  # OpenAI's order of choices
        streams = [
            run(
                http,
                ids,
                choice_params(params, i),
                budget(1 if scoring else body.max_tokens, len(ids)),
                stops,
                body.logprobs,
                scored,
                json_format=body.json_format(),
            )
            for ids, i in jobs
        ]
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": state.name}

        def echoed(ids: list[int], req) -> tuple[str, dict | None]:
            """The prompt's text and, with logprobs, its legacy logprobs object."""
            if scoring:
                req.completion_tokens = 0
            return tok.decode(ids), None if scored is None else prompt_logprobs(tok, ids, req.prompt_scored)

        if not body.stream:
            results = await gather_all(streams)
            choices = []
            for k, ((ids, _), (text, finish, req, lps)) in enumerate(zip(jobs, results, strict=True)):
                if scoring:
                    text, finish, lps = "", "length", None if lps is None else []
                lp = None if lps is None else completion_logprobs(tok, lps, 0)
                if body.echo:
                    head, head_lp = echoed(ids, req)
                    lp = None if lp is None else joined(head_lp, completion_logprobs(tok, lps, len(head)))
                    text = head + text
                choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": finish})
            reqs = [r for _, _, r, _ in results if r is not None]
            return {**base, "choices": choices, "usage": usage(*reqs) if reqs else None}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        merged = merge(streams)
        first = await first_item(merged)

        async def events():
            extra_usage = {"usage": None} if include_usage else {}

            def chunk(k: int, text: str, lp: dict | None, finish: str | None) -> str:
                c = {"index": k, "text": text, "logprobs": lp, "finish_reason": finish}
                return sse_event({**base, "choices": [c], **extra_usage})

            reqs, offsets = {}, {}
            async for k, (delta, finish, r, lps) in chain(first, merged):
                if k not in reqs:  # this choice's first item: its request has scored the prompt
                    reqs[k], offsets[k] = r, 0
                    if body.echo:
                        head, head_lp = echoed(jobs[k][0], r)
                        yield chunk(k, head, head_lp, None)
                        offsets[k] = len(head)
                    if scoring:
                        yield chunk(k, "", None, "length")
                if scoring:
                    continue  # its one decoded token is dropped
                if delta or finish or lps:
                    lp = None if lps is None else completion_logprobs(tok, lps, offsets[k])
                    offsets[k] += sum(len(t) for t in lp["tokens"]) if lp else len(delta)
                    yield chunk(k, delta, lp, finish)
            if include_usage and reqs:
                yield sse_event({**base, "choices": [], "usage": usage(*reqs.values())})
            yield "data: [DONE]\n\n"

        return StreamingResponse(ends_with_error(events(), sse_error), media_type="text/event-stream")

    # -- Ollama ------------------------------------------------------------------------------------
    def ollama_params(o: OllamaOptions | None, prompt_len: int) -> tuple[SamplingParams, int, list[str]]:
        o = o or OllamaOptions()
        params = sampling(o, o.repeat_penalty)
        if o.num_predict is not None and o.num_predict == 0:
            raise APIError(400, "options.num_predict must not be 0", "invalid_value", "options.num_predict")
        n = budget(None if o.num_predict is None or o.num_predict < 0 else o.num_predict, prompt_len)
        if o.num_predict is not None and o.num_predict < 0:
            n = state.n_ctx - prompt_len
        return params, n, stops_of(o.stop)

    def ollama_final(req, finish, t0) -> dict:
        s = req.stats
        return {
            "done": True,
            "done_reason": finish,
            "total_duration": int((time.perf_counter() - t0) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens,
            "prompt_eval_duration": int(s.prefill_s * 1e9),
            "eval_count": usage(req)["completion_tokens"],
            "eval_duration": int(s.decode_s * 1e9),
            "aheadlm": usage(req)["aheadlm"],
        }

    async def ollama_respond(http, ids, params, n, stops, stream_out: bool, wrap, body):
        t0 = time.perf_counter()
        stream = run(http, ids, params, n, stops, body.logprob_count(), json_format=body.json_format())

        def lp(lps) -> dict:
            return {} if lps is None else {"logprobs": chat_logprobs(tok, lps)}

        if not stream_out:
            text, finish, req, lps = await collect(stream)
            return {**wrap(text), **lp(lps), **ollama_final(req, finish, t0)}
        first = await first_item(stream)

        async def ndjson():
            async for delta, finish, req, lps in chain(first, stream):
                if finish:
                    yield json.dumps({**wrap(delta), **lp(lps), **ollama_final(req, finish, t0)}) + "\n"
                elif delta or lps:
                    yield json.dumps({**wrap(delta), **lp(lps), "done": False}) + "\n"

        return StreamingResponse(ends_with_error(ndjson(), ndjson_error), media_type="application/x-ndjson")

    @app.post("/api/generate")
    async def ollama_generate(body: OllamaGenerate, http: Request):
        check_model(body.model)

        def wrap(text):
            return {"model": body.model, "created_at": now_rfc3339(), "response": text}

        if not body.prompt and not body.system:
            return {**wrap(""), "done": True, "done_reason": "load"}
        if body.raw:
            ids, extra = tok.encode(body.prompt), []
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}
            ]
            ids, extra = state.llm.chat_prompt(msgs)
        params, n, stops = ollama_params(body.options, len(ids))
        return await ollama_respond(http, ids, params, n, stops + extra, body.stream, wrap, body)

    @app.post("/api/chat")
    async def ollama_chat(body: OllamaChat, http: Request):
        check_model(body.model)
        ids, extra = chat_ids(body.messages)
        params, n, stops = ollama_params(body.options, len(ids))

        def wrap(text):
            return {
                "model": body.model,
                "created_at": now_rfc3339(),
                "message": {"role": "assistant", "content": text},
            }

        return await ollama_respond(http, ids, params, n, stops + extra, body.stream, wrap, body)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(state.scheduler), media_type="text/plain; version=0.0.4")

    model_info.register(app, state, check_model)
    embeddings.register(app, state, check_model)
    tokenization.register(app, state, check_model, chat_ids)
    known_paths.update(r.path for r in app.routes)
    return app
