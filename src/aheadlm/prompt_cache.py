"""Keeping a sequence's KV cache between requests, so that a prompt starting with the tokens of an
earlier sequence (the next turn of a chat, an agent's growing context, a regenerated answer)
prefills only the tokens after their common prefix.

This is exact, not an approximation: where the engine prefills through its batch-invariant
kernels (`Engine.exact_prefill`), K/V kept from decoding equal those a fresh prefill of the same
tokens computes, bit for bit, so what a request generates does not depend on what was cached.
Elsewhere (GPU, no compiled kernels) nothing is kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .kv_cache import KVCache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable(prompt: list[int], tokens: list[int], cache: KVCache, row: int = 0) -> int:
    """How many of `prompt`'s tokens row `row` of `cache`, holding the K/V of `tokens`, can serve:
    their common prefix, at most all but the prompt's last token (which must run to give the next
    token's logits), and none where a sliding window already overwrote what that prefix needs."""
    n = common_prefix(prompt[: len(prompt) - 1], tokens[: cache.lengths[row]])
    return n if n >= cache.min_length(row) else 0


def hold(cache: KVCache, tokens: list[int], row: int = 0) -> list[int] | None:
    """Trim row `row` of `cache`, whose first positions hold the K/V of `tokens` (any later ones
    are dropped), to those tokens and return them; None where the trim is not possible."""
    n = min(len(tokens), cache.lengths[row])
    if n < cache.min_length(row):
        return None
    cache.trim(n, row=row)
    return list(tokens[:n])


def cache_size(needed: int, n_ctx: int) -> int:
    """Room for a cache that will be kept: the next power of two from 1,024 (capped at `n_ctx`), so
    a conversation that keeps growing reallocates, and prefills in full, only a few times."""
    size = 1024
    while size < needed:
        size *= 2
    return min(size, n_ctx)


@dataclass
class PromptCache:
    """One kept sequence: a KV cache and the tokens whose K/V it holds, in order from position 0.
    Safe to share between threads: a cache is handed to one request at a time."""

    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def take(self, prompt: list[int], size: int) -> tuple[KVCache | None, int]:
        """The kept cache, trimmed to the longest prefix of `prompt` it holds (at most all but the
        prompt's last token, which must run to give the next token's logits), and that length; or
        (None, 0) when it cannot serve: nothing kept, smaller than `size`, or nothing in common.
        The cache leaves this object either way; `keep` hands one back."""
        with self.lock:
            cache, tokens = self.cache, self.tokens
            self.cache, self.tokens = None, []
        n = reusable(prompt, tokens, cache) if cache is not None and cache.max_len >= size else 0
        if n == 0:
            return None, 0
        cache.trim(n)
        return cache, n

    def keep(self, cache: KVCache, tokens: list[int]) -> None:
        """Keep `cache`, whose first `len(tokens)` positions hold `tokens` (any later ones are dropped)."""
        held = hold(cache, tokens)
        if held is not None:
            with self.lock:
                self.cache, self.tokens = cache, held

    def clear(self) -> None:
        with self.lock:
            self.cache, self.tokens = None, []
