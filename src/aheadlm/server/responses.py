"""Pieces of the HTTP responses: usage, SSE and NDJSON framing, and the helpers that collect,
peek at and chain the stream of (text delta, finish reason, request, logprobs) a request yields."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import Request

from .batching import Request as EngineRequest
from .protocol import APIError


def usage(*reqs: EngineRequest) -> dict:
    """Token counts and speculative statistics, summed over the requests of one response."""
    completion = 0
    for r in reqs:
        n = r.completion_tokens
        completion += (len(r.tokens) - len(r.prompt) if r.tokens else 0) if n is None else n
    stats = [r.stats for r in reqs]
    prompt = sum(s.prompt_tokens for s in stats)
    drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
    forwards, decode_s = sum(s.target_forwards for s in stats), sum(s.decode_s for s in stats)
    # tau counts tokens per decode forward; each request's first token came from its prefill
    after_first = sum(max(0, s.completion_tokens - 1) for s in stats)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in stats)},
        "aheadlm": {
            "mean_accepted_length": round(after_first / forwards if forwards else 1.0, 3),
            "acceptance_rate": round(accepted / drafted if drafted else 0.0, 4),
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            "target_forwards": forwards,
            "tokens_per_s": round(sum(s.completion_tokens for s in stats) / decode_s if decode_s > 0 else 0.0, 2),
        },
    }


async def collect(stream: AsyncIterator) -> tuple[str, str, EngineRequest | None, list | None]:
    parts, finish, last, logprobs = [], "length", None, None
    async for delta, f, r, lps in stream:
        parts.append(delta)
        finish, last = f or finish, r
        if lps is not None:
            logprobs = [] if logprobs is None else logprobs
            logprobs.extend(lps)
    return "".join(parts), finish, last, logprobs


async def client_gone(http: Request) -> bool:
    """Whether the client hung up. Starlette's `is_disconnected` cancels its read at once, and
    under the http middleware that cancel always wins, so it never sees the disconnect; wait a
    moment instead. The body has been read: the only message left to come is the disconnect."""
    try:
        message = await asyncio.wait_for(http.receive(), timeout=0.01)
    except asyncio.TimeoutError:
        return False
    return message.get("type") == "http.disconnect"


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def sse_error(e: APIError) -> str:
    return sse_event(e.body()) + "data: [DONE]\n\n"


def ndjson_error(e: APIError) -> str:
    return json.dumps({"error": e.message}) + "\n"


async def ends_with_error(chunks: AsyncIterator[str], render) -> AsyncIterator[str]:
    """A stream's error after its 200 went out (the timeout, an engine failure) becomes its last
    event, so the client sees why it ended instead of a silently cut stream."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        yield render(e)


async def first_item(stream: AsyncIterator):
    """Await the first item before the response starts, so errors still get a proper status."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def chain(first, stream: AsyncIterator):
    if first is not None:
        yield first
    async for item in stream:
        yield item


async def gather_all(streams: list[AsyncIterator]) -> list[tuple]:
    """`collect` every stream at once (their requests decode together); if one fails, the others
    are cancelled, and their requests leave the scheduler as their streams close."""
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, tuple]]:
    """The items of several streams as they arrive, each with its stream's index. An error in one
    ends the merged stream (as it would a single one); closing it cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                live -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


def now_rfc3339() -> str:
    """Ollama's timestamps."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
