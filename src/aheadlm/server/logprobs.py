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
    `offset` of the completion. Each `top_logprobs` entry maps the alternatives' text to their
    log-probabilities, and holds the chosen token too, as OpenAI's does."""
    tokens, offsets, tops = [], [], []
    for x in lps:
        text = token_text(tok, x.token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top = {token_text(tok, t)[0]: v for t, v in x.top}
        top.setdefault(text, x.logprob)
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": [x.logprob for x in lps],
        "top_logprobs": tops,
        "text_offset": offsets,
    }
