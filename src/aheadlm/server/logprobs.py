"""Log-probabilities in the shapes the OpenAI and Ollama APIs return them."""

from __future__ import annotations

from ..outputs import TokenLogprob
from ..tokenizer import Tokenizer


def token_text(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text and bytes. A token holding part of a UTF-8 character reads `bytes:\\xe2\\x80`
    (OpenAI's convention); its `bytes` let a client join such tokens."""
    raw = tok.token_bytes(token_id)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text, list(raw)


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> list[dict]:
    """OpenAI chat's `logprobs.content` entries, also Ollama's `logprobs`."""
    out = []
    for x in lps:
        text, raw = token_text(tok, x.token_id)
        top = []
        for t, v in x.top:
            t_text, t_raw = token_text(tok, t)
            top.append({"token": t_text, "logprob": v, "bytes": t_raw})
        out.append({"token": text, "logprob": x.logprob, "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], offset: int) -> dict:
    """The legacy completions API's `logprobs` object for tokens whose text starts at character
    `offset` of the returned text. Each `top_logprobs` entry maps the alternatives' text to their
    log-probabilities, and holds the chosen token too, as OpenAI's does."""
    return _legacy(tok, [(x.token_id, x) for x in lps], offset)


def prompt_logprobs(tok: Tokenizer, ids: list[int], scored: list[TokenLogprob]) -> dict:
    """The same object for an echoed prompt (`scored`: its tokens after the first). The first
    token has no context, so its log-probability and alternatives are null, as OpenAI's are."""
    return _legacy(tok, [(ids[0], None)] + [(x.token_id, x) for x in scored], 0)


def joined(a: dict, b: dict) -> dict:
    """Two legacy `logprobs` objects one after the other (an echoed prompt, then its completion)."""
    return {k: a[k] + b[k] for k in a}


def _legacy(tok: Tokenizer, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> dict:
    tokens, offsets, values, tops = [], [], [], []
    for token_id, x in entries:
        text = token_text(tok, token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += 0 if tok.is_special(token_id) else len(text)  # decode leaves BOS and such out
        values.append(None if x is None else x.logprob)
        if x is None:
            tops.append(None)
            continue
        top = {token_text(tok, t)[0]: v for t, v in x.top}
        top.setdefault(text, x.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
