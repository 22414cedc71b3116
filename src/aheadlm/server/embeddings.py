"""Embeddings: OpenAI's `/v1/embeddings` and Ollama's `/api/embed` and `/api/embeddings`, from the
loaded model's final hidden states (`LLM.embed`). They run beside the decoding scheduler, one
request at a time, off the event loop."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI

from ..errors import ContextLengthError
from .protocol import APIError, EmbeddingRequest, OllamaEmbed


def register(app: FastAPI, state, check_model: Callable[[str], None]) -> None:
    llm, lock = state.llm, threading.Lock()

    def vectors(items: list[str | list[int]], truncate: bool) -> tuple[list[list[float]], int]:
        """The embeddings of `items` and how many tokens they held (cut to the context with
        `truncate`, else a text past it is an error)."""
        out, count = [], 0
        with lock:
            for item in items:
                ids = llm.prompt_ids(item)
                if len(ids) > state.n_ctx:
                    if not truncate:
                        raise ContextLengthError(f"a text has {len(ids)} tokens; the context holds {state.n_ctx}")
                    ids = ids[: state.n_ctx]
                count += len(ids)
                out.append(llm.embed(ids))
        return out, count

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        if body.dimensions is not None and body.dimensions != llm.config.hidden_size:
            raise APIError(
                400, f"dimensions: this model's embeddings have {llm.config.hidden_size}", "invalid_value", "dimensions"
            )
        vecs, count = await asyncio.to_thread(vectors, body.inputs(), False)

        def encode(v: list[float]):
            return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if body.encoding_format == "base64" else v

        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vecs)]
        usage = {"prompt_tokens": count, "total_tokens": count}
        return {"object": "list", "data": data, "model": state.name, "usage": usage}

    @app.post("/api/embed")
    async def ollama_embed(body: OllamaEmbed):
        check_model(body.model)
        t0 = time.perf_counter()
        vecs, count = await asyncio.to_thread(vectors, body.texts(), body.truncate)
        took = int((time.perf_counter() - t0) * 1e9)
        return {
            "model": body.model,
            "embeddings": vecs,
            "total_duration": took,
            "load_duration": 0,
            "prompt_eval_count": count,
        }

    @app.post("/api/embeddings")
    async def ollama_embeddings(body: OllamaEmbed):
        check_model(body.model)
        vecs, _ = await asyncio.to_thread(vectors, body.texts()[:1], body.truncate)
        return {"embedding": vecs[0]}
