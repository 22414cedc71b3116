"""`/tokenize` and `/detokenize`, as vLLM's and llama.cpp server's (clients count tokens with
them before sending a prompt). One answer serves both: it carries both APIs' field names."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from .protocol import APIError, DetokenizeRequest, TokenizeRequest


def register(app: FastAPI, state, check_model: Callable[[str], None], chat_ids: Callable) -> None:
    tok = state.llm.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        if body.messages is not None:  # the prompt the chat endpoint would decode from
            ids = chat_ids(body.messages)[0]
        elif body.prompt is not None:
            ids = tok.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
        else:
            ids = tok.encode(body.content, add_bos=body.add_special)
        tokens = [{"id": i, "piece": _piece(tok, i)} for i in ids] if body.with_pieces else ids
        return {"tokens": tokens, "count": len(ids), "max_model_len": state.n_ctx}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        vocab = state.llm.config.vocab_size
        bad = [i for i in body.tokens if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is not in the vocabulary (size {vocab})", "invalid_value", "tokens")
        text = tok.decode(body.tokens)
        return {"prompt": text, "content": text}


def _piece(tok, token_id: int) -> str | list[int]:
    """llama.cpp's piece: the token's text, or its bytes where they are not whole UTF-8."""
    raw = tok.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)
