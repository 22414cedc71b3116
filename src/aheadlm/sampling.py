"""Sampling: logits -> processed distribution -> token. Pure functions; randomness only through an
explicit `torch.Generator`. Temperature 0 is greedy (argmax)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError
from .outputs import TokenLogprob

GREEDY_BELOW = 1e-5
MAX_TOP_LOGPROBS = 20
"""The most alternatives a token's log-probabilities may list (OpenAI's and vLLM's limit)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 means greedy; so does anything below `GREEDY_BELOW` (as in vLLM), where dividing the
    logits by it would overflow."""
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    """HF/llama.cpp style: seen tokens' positive logits are divided by it, negative ones multiplied."""
    seed: int | None = None
    presence_penalty: float = 0.0
    """OpenAI style, -2..2: subtracted once from the logit of every token the output already holds."""
    frequency_penalty: float = 0.0
    """OpenAI style, -2..2: subtracted from a token's logit once per time the output holds it."""
    logit_bias: Mapping[int, float] | None = None
    """Token id -> a value in [-100, 100] added to its logit (-100 bans it in practice)."""

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or t > 100:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {t!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise InvalidRequestError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        for name in ("top_p", "min_p"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or math.isnan(v) or not 0 <= v <= 1):
                raise InvalidRequestError(f"{name} must be in [0, 1], got {v!r}")
        rp = self.repetition_penalty
        if rp is not None and (not isinstance(rp, (int, float)) or math.isnan(rp) or not 0.01 <= rp <= 10):
            raise InvalidRequestError(f"repetition_penalty must be in [0.01, 10], got {rp!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or not -2 <= v <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {v!r}")
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            raise InvalidRequestError(f"logit_bias must map token ids to values, got {type(self.logit_bias).__name__}")
        for tok, b in (self.logit_bias or {}).items():
            if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {tok!r}")
            if not isinstance(b, (int, float)) or isinstance(b, bool) or math.isnan(b) or not -100 <= b <= 100:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {b!r} for token {tok}")
        sd = self.seed
        if sd is not None and (not isinstance(sd, int) or isinstance(sd, bool) or not -(2**63) <= sd < 2**64):
            raise InvalidRequestError(f"seed must be an integer in [-2**63, 2**64), got {sd!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """Whether `penalize` changes anything: a bias or a penalty that is not off."""
        rp = self.repetition_penalty
        return (
            bool(self.logit_bias)
            or (rp is not None and rp != 1.0)
            or bool(self.presence_penalty or self.frequency_penalty)
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a `logit_bias` token outside the vocabulary (the model is known only here)."""
        bad = [t for t in self.logit_bias or {} if t >= vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias token {bad[0]} is not in the vocabulary (size {vocab_size})")

    def make_generator(self, device="cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits `[N, V]`; `seen` `[N, S]` token ids already in each row's context (may repeat)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def penalize(
    logits: torch.Tensor, params: SamplingParams, tokens: Sequence[int], n_prompt: int, guide=None
) -> torch.Tensor:
    """Logits `[N, V]` of the position after `tokens` (the prompt, its first `n_prompt`, then the
    output so far), every row alike, adjusted as plain decoding adjusts them: `logit_bias` added,
    then the repetition penalty over every token (prompt and output, as HF and vLLM), then the
    presence and frequency penalties over the output tokens (as OpenAI and vLLM), then the tokens
    a `guide` (`guided.JsonGuide`) forbids after this output set to -inf."""
    if guide is not None:
        return guide.mask(penalize(logits, params, tokens, n_prompt), tokens[n_prompt:])
    if not params.adjusts_logits:
        return logits
    x = logits
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=x.device)
        bias = torch.tensor(list(params.logit_bias.values()), dtype=x.dtype, device=x.device)
        x = x.index_add(-1, ids, bias.expand(x.shape[0], -1))
    rp = params.repetition_penalty
    if rp is not None and rp != 1.0 and tokens:
        seen = torch.tensor(list(tokens), device=x.device)[None].expand(x.shape[0], -1)
        x = apply_repetition_penalty(x, seen, rp)
    if (params.presence_penalty or params.frequency_penalty) and len(tokens) > n_prompt:
        counts = torch.bincount(torch.tensor(list(tokens[n_prompt:]), device=x.device), minlength=x.shape[-1])
        counts = counts[: x.shape[-1]].to(x.dtype)
        x = x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(x.dtype)
    return x


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: temperature, then top-k, top-p, min-p.
    `logits` `[N, V]` (penalties already applied) -> float32 probabilities `[N, V]`."""
    x = logits.float() / params.temperature
    if params.top_k:
        k = min(params.top_k, x.shape[-1])
        kth = x.topk(k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        probs = top_p_filter(probs, params.top_p)
    if params.min_p:
        floor = probs.max(-1, keepdim=True).values * params.min_p
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero each token whose strictly more likely tokens already hold `top_p` of the mass (the most
    likely token always stays), for probs `[N, V]`. Only the k most likely tokens are sorted, k =
    64, 256, ... until they hold `top_p` in every row: every later token is dropped anyway. Sorting
    all of Gemma's 262k tokens took 19 ms a row, longer than a decode step."""
    V = probs.shape[-1]
    k = min(64, V)
    while True:
        vals, idx = probs.topk(k, dim=-1)  # sorted, most likely first
        cum = vals.cumsum(-1)
        if k == V or bool((cum[..., -1] >= top_p).all()):
            break
        k = min(V, 4 * k)
    keep = (cum - vals) < top_p  # mass of strictly better tokens
    keep[..., 0] = True
    return torch.zeros_like(probs).scatter(-1, idx, vals * keep)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` `[N, V]` (non-negative, any positive total) -> `[N]`, by inverse
    transform: the first token whose cumulative mass exceeds a uniform draw times the total. The
    sums are float64 and a zero-probability token is never drawn. Same distribution as
    `torch.multinomial`, over twenty times faster on a 262k vocabulary (0.18 against 4.1 ms on CPU)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def sample_one(probs: torch.Tensor, generator: torch.Generator) -> int:
    """`sample` for one distribution `[V]`."""
    return int(sample(probs[None], generator)[0])


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Plain decoding's choice for logits `[N, V]` (penalties already applied) -> `[N]`."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(processed_probs(logits, params), generator)


def check_logprobs(n) -> int | None:
    """`None` (no log-probabilities) or how many alternatives to list per token, 0..20."""
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be None or an integer in 0..{MAX_TOP_LOGPROBS}, got {n!r}")
    return n


def token_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """Raw logits `[N, V]` (no temperature, no penalties) and the token chosen at each of the N
    positions (the first `len(ids)` rows are used) -> each token's log-probability and the `top`
    most likely tokens'."""
    if not ids:
        return []
    lp = torch.log_softmax(logits[: len(ids)].float(), dim=-1)
    chosen = lp[torch.arange(len(ids), device=lp.device), torch.tensor(ids, device=lp.device)].tolist()
    if top:
        vals, idx = lp.topk(min(top, lp.shape[-1]), dim=-1)
        alts = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    else:
        alts = [[] for _ in ids]
    return [TokenLogprob(t, c, a) for t, c, a in zip(ids, chosen, alts, strict=True)]
