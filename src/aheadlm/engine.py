"""The generation engine: token ids in, a stream of `Step`s out. Plain and speculative decoding.

It knows nothing about text: the API layer turns steps into text deltas and applies stop strings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from . import fused, speculative
from .errors import ContextLengthError, InvalidRequestError
from .kv_cache import DEFAULT_MAX_STEP, KVCache
from .model import Transformer
from .outputs import GenerationStats, Step, TokenLogprob
from .prompt_cache import PromptCache, cache_size
from .proposers import Proposer
from .sampling import SamplingParams, check_logprobs, next_token, penalize, token_logprobs
from .speculative import SpecConfig

__all__ = ["Engine", "GenerationStats", "Step"]


class Engine:
    """Runs one sequence at a time through a target model, optionally with a proposer."""

    def __init__(
        self,
        model: Transformer,
        *,
        proposer: Proposer | None = None,
        spec: SpecConfig | None = None,
        n_ctx: int | None = None,
        max_step: int = DEFAULT_MAX_STEP,
        kv_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.proposer = proposer
        self.spec = spec or SpecConfig()
        self.config = model.config
        self.n_ctx = min(n_ctx or self.config.max_position, self.config.max_position)
        self.max_step = max_step
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if kv_dtype not in (None, torch.float32, torch.bfloat16):
            raise InvalidRequestError(f"the KV cache holds float32 or bfloat16, not {kv_dtype}")
        self.kv_dtype = kv_dtype or self.dtype
        """What the KV cache stores: bfloat16 halves its memory and what attention reads per step
        at long contexts; plain and speculative decoding stay identical (both read the same cache)."""

    @property
    def exact_prefill(self) -> bool:
        """Whether prompts run through the compiled layers (CPU, float32), the same batch-invariant
        kernels as decoding, so that a prompt's K/V and logits equal, bit for bit, those of the same
        tokens decoded one at a time (what makes a kept `PromptCache` exact)."""
        compiled = self.device.type == "cpu" and self.dtype == torch.float32
        return compiled and all(b.compiled is not None for b in self.model.layers)

    @property
    def prefill_step(self) -> int:
        """Prompt tokens per forward: at most `fused.MAX_ROWS` through compiled layers (on CPU also
        faster than larger chunks through SDPA), else `max_step`."""
        return min(self.max_step, fused.MAX_ROWS) if self.exact_prefill else self.max_step

    def open_cache(self, prompt: list[int], needed: int, kept: PromptCache | None) -> tuple[KVCache, int]:
        """A cache with room for `needed` tokens (at most the context) for `prompt`, and how many of
        the prompt's tokens it already holds (from `kept`, if any)."""
        if kept is None:
            return self.new_cache(needed), 0
        size = cache_size(needed, self.n_ctx)
        cache, reused = kept.take(prompt, size)
        return (cache, reused) if cache is not None else (self.new_cache(size), 0)

    def new_cache(self, tokens_needed: int) -> KVCache:
        return KVCache(
            self.config,
            min(self.n_ctx, tokens_needed),
            dtype=self.kv_dtype,
            device=self.device,
            max_step=self.max_step,
        )

    def _forward(self, cache: KVCache, tokens: list[int], num_logits: int | None):
        start = cache.length
        x = torch.tensor([tokens], device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]
        return self.model(x, pos, cache, num_logits=num_logits)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, tokens: list[int], *, scored: list[TokenLogprob] | None = None, top: int = 0):
        """Run the prompt in chunks; returns (last logits `[V]`, last hidden `[H]`). With `scored` (a
        list), the output head also runs on every position, and each token after the first gets its
        log-probability given the tokens before it (and the `top` likeliest), appended to `scored`."""
        step = self.prefill_step
        for i in range(0, len(tokens), step):
            chunk = tokens[i : i + step]
            last = i + step >= len(tokens)
            logits, hidden = self._forward(cache, chunk, None if scored is not None else 1 if last else 0)
            if scored is not None:  # row j predicts token i + j + 1
                scored += token_logprobs(logits[0], tokens[i + 1 : i + 1 + len(chunk)], top)
        return logits[0, -1], hidden[0, -1]

    @torch.inference_mode()
    def score(self, prompt: list[int], top: int = 0) -> list[TokenLogprob]:
        """The log-probability of each prompt token after the first given the ones before it, with
        the `top` likeliest tokens at each position (perplexity, evaluations of choices)."""
        top = check_logprobs(top)
        if len(prompt) < 2:
            raise InvalidRequestError("scoring needs at least two tokens (the first one has no context)")
        if len(prompt) > self.n_ctx:
            raise ContextLengthError(f"the text has {len(prompt)} tokens; the context holds {self.n_ctx}")
        if max(prompt) >= self.config.vocab_size or min(prompt) < 0:
            raise InvalidRequestError("prompt token ids out of the vocabulary range")
        scored: list[TokenLogprob] = []
        self.prefill(self.new_cache(len(prompt)), prompt, scored=scored, top=top or 0)
        return scored

    @torch.inference_mode()
    def embed(self, tokens: list[int], pooling: str = "mean", skip_first: bool = False) -> torch.Tensor:
        """One vector `[H]` for a text: the final-norm hidden states of its tokens averaged
        (`mean`; without the first with `skip_first`, a BOS whose state is far larger than the
        text's), or the last token's (`last`), scaled to unit length."""
        if pooling not in ("mean", "last"):
            raise InvalidRequestError(f"pooling must be mean or last, got {pooling!r}")
        if not tokens:
            raise InvalidRequestError("the text to embed is empty")
        if len(tokens) > self.n_ctx:
            raise ContextLengthError(f"the text has {len(tokens)} tokens; the context holds {self.n_ctx}")
        if max(tokens) >= self.config.vocab_size or min(tokens) < 0:
            raise InvalidRequestError("token ids out of the vocabulary range")
        cache, step = self.new_cache(len(tokens)), self.prefill_step
        total, last = torch.zeros(self.config.hidden_size, dtype=torch.float64, device=self.device), None
        first = 1 if skip_first and len(tokens) > 1 else 0
        for i in range(0, len(tokens), step):
            _, hidden = self._forward(cache, tokens[i : i + step], 0)
            total += hidden[0, max(first - i, 0) :].double().sum(0)
            last = hidden[0, -1]
        v = (total / (len(tokens) - first)).float() if pooling == "mean" else last.float()
        return v / v.norm().clamp_min(1e-12)

    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}")
        if len(prompt) >= self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx} "
                f"(at least one must be left to generate)"
            )
        if max(prompt) >= self.config.vocab_size or min(prompt) < 0:
            raise InvalidRequestError("prompt token ids out of the vocabulary range")

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 256,
        stop_ids: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
        stats: GenerationStats | None = None,
        prompt_cache: PromptCache | None = None,
        logprobs: int | None = None,
        guide=None,
    ) -> Iterator[Step]:
        """Decode `prompt`: speculatively when the engine has a proposer, else one target forward
        per token. Yields a `Step` per round; the last one carries `finish_reason`. With
        `prompt_cache`, the prompt's prefix that cache holds is not prefilled again, and the
        sequence's cache is kept there when generation ends (or is stopped). With `logprobs` (the
        number of alternatives, 0..20), each step carries its tokens' log-probabilities. A `guide`
        (`guided.JsonGuide`, one per call) constrains the output (JSON mode)."""
        params = params or SamplingParams()
        logprobs = check_logprobs(logprobs)
        self.check_prompt(prompt, max_tokens)
        params.check_vocab(self.config.vocab_size)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt)
        generator = generator or params.make_generator(self.device)
        if not self.exact_prefill:  # kept K/V would not be those a fresh prefill computes
            prompt_cache = None
        if self.proposer is not None and self.proposer.name != "none":
            yield from speculative.generate(
                self,
                self.proposer,
                self.spec,
                prompt,
                params,
                max_tokens=max_tokens,
                stop_ids=stop_ids,
                generator=generator,
                stats=stats,
                prompt_cache=prompt_cache,
                logprobs=logprobs,
                guide=guide,
            )
            return
        yield from self._plain(prompt, params, max_tokens, stop_ids, generator, stats, prompt_cache, logprobs, guide)

    def _plain(self, prompt, params, max_tokens, stop_ids, generator, stats, kept, top, guide) -> Iterator[Step]:
        limit = min(self.n_ctx, len(prompt) + max_tokens)
        cache, safe = self.open_cache(prompt, limit, kept)
        stats.cached_tokens = safe
        tokens = list(prompt)  # then each output; the cache holds K/V for tokens[:safe]
        try:
            t0 = time.perf_counter()
            logits, _ = self.prefill(cache, prompt[safe:])
            safe = len(prompt)
            stats.prefill_s = time.perf_counter() - t0
            t_step = time.perf_counter()
            n_out = 0
            while True:
                raw = logits
                logits = penalize(logits[None], params, tokens, len(prompt), guide)
                tok = int(next_token(logits, params, generator)[0])
                n_out += 1
                stats.completion_tokens = n_out
                finish = None
                if tok in stop_ids:
                    finish = "stop"
                elif n_out >= max_tokens or len(prompt) + n_out >= limit:
                    finish = "length"
                emitted = [] if finish == "stop" else [tok]
                lps = None if top is None else token_logprobs(raw[None], [tok], top)  # a stop token's too
                now = time.perf_counter()
                stats.decode_s += now - t_step
                yield Step(emitted, finish, now - t_step, logprobs=lps)
                if finish:
                    return
                t_step = time.perf_counter()
                tokens.append(tok)
                logits, _ = self._forward(cache, [tok], 1)
                safe += 1
                logits = logits[0, -1]
                stats.target_forwards += 1
                stats.target_s += time.perf_counter() - t_step
        finally:  # also when the caller stops early or a forward fails: keep only what completed
            if kept is not None:
                kept.keep(cache, tokens[:safe])
