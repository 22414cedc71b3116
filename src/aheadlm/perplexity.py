"""Perplexity of a text, as llama.cpp's `llama-perplexity` measures it: the tokens are cut into
windows of `ctx` tokens, and in each window only the second half is scored, so every scored token
sees at least `ctx / 2` tokens of context. A model that adds BOS gets it as each window's first
token (in place of the text's token there). Windows run one at a time through the engine's own
prefill (`Engine.score`), so the number is that of the model as this engine computes it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .engine import Engine
from .errors import InvalidRequestError


@dataclass
class Window:
    """Running totals after a window: its number, tokens scored so far, their summed negative
    log-likelihood and summed square (for the standard error), and seconds spent."""

    index: int
    windows: int
    tokens: int
    nll: float
    nll_sq: float
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def ppl_error(self) -> float:
        """The standard error of the mean NLL, carried to perplexity (d ppl = ppl * d nll)."""
        mean = self.nll / self.tokens
        var = max(0.0, self.nll_sq / self.tokens - mean * mean)
        return self.ppl * math.sqrt(var / max(1, self.tokens - 1))


def perplexity(
    engine: Engine, tokens: list[int], ctx: int, bos: int | None, limit: int | None = None
) -> Iterator[Window]:
    """Yield the running result after each window of `ctx` tokens of `tokens` (at most `limit` windows)."""
    if ctx < 4 or ctx > engine.n_ctx:
        raise InvalidRequestError(f"the window must be 4 to {engine.n_ctx} tokens (the context), got {ctx}")
    windows = len(tokens) // ctx if limit is None else min(limit, len(tokens) // ctx)
    if windows < 1:
        raise InvalidRequestError(f"the text has {len(tokens)} tokens; one window needs {ctx} (use a smaller --ctx)")
    first = ctx // 2
    n = nll = nll_sq = 0.0
    t0 = time.perf_counter()
    for w in range(windows):
        chunk = tokens[w * ctx : (w + 1) * ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        for x in engine.score(chunk)[first:]:  # entry i is token i + 1: tokens first + 1 .. ctx - 1
            nll -= x.logprob
            nll_sq += x.logprob * x.logprob
            n += 1
        yield Window(w + 1, windows, int(n), nll, nll_sq, time.perf_counter() - t0)
