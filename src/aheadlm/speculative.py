"""The speculative decoding loop: propose -> verify in one target forward -> accept -> bonus ->
roll the target cache back -> seed the next round with the target hidden of the last accepted
position. Emitted tokens are exactly those plain decoding would produce (greedy), or distributed
exactly like them (sampling, via rejection sampling in `verify.py`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .outputs import Step
from .proposers import Draft, Proposer, SpecState
from .sampling import SamplingParams, next_token, penalize, processed_probs, token_logprobs
from .verify import verify_greedy, verify_sampled


@dataclass
class SpecConfig:
    num_draft: int = 4
    """Most draft tokens per round (k)."""
    adaptive: bool = False
    """Pick k each round to maximise measured tokens/s (up to num_draft)."""


class AdaptiveK:
    """Chooses the draft length with the best expected tokens per second.

    Keeps an estimate of the chance that draft i is accepted given drafts 1..i-1 were, and of the
    seconds a round with k drafts costs (per-k averages, a least-squares line for unseen k)."""

    def __init__(self, k_max: int, decay: float = 0.9):
        self.k_max = k_max
        self.decay = decay
        self.accept = [0.5] * k_max
        self.cost: dict[int, float] = {}
        self.rounds = 0

    def expected_tokens(self, k: int) -> float:
        total, chain = 1.0, 1.0
        for i in range(k):
            chain *= self.accept[i]
            total += chain
        return total

    def _cost(self, k: int) -> float:
        if k in self.cost:
            return self.cost[k]
        ks = list(self.cost)
        if len(ks) < 2:
            return 1.0 + 0.1 * k
        n = len(ks)
        mk, mc = sum(ks) / n, sum(self.cost.values()) / n
        var = sum((x - mk) ** 2 for x in ks)
        slope = sum((x - mk) * (self.cost[x] - mc) for x in ks) / var
        return max(1e-6, mc + slope * (k - mk))

    def choose(self) -> int:
        self.rounds += 1
        if self.rounds == 1:
            return self.k_max
        if self.rounds == 2:
            return max(1, self.k_max // 2)
        best = max(range(1, self.k_max + 1), key=lambda k: self.expected_tokens(k) / self._cost(k))
        if self.rounds % 16 == 0:  # keep measuring a neighbour so the cost line stays current
            best = min(self.k_max, best + 1) if best < self.k_max else best - 1
        return max(1, best)

    def update(self, k: int, accepted: int, seconds: float) -> None:
        if k == 0:
            return
        d = self.decay
        for i in range(min(k, accepted + 1)):
            hit = 1.0 if i < accepted else 0.0
            self.accept[i] = d * self.accept[i] + (1 - d) * hit
        self.cost[k] = seconds if k not in self.cost else d * self.cost[k] + (1 - d) * seconds


def _penalized(logits, params: SamplingParams, history: list[int], drafts: list[int], n_prompt: int, guide=None):
    """Row i of the verify logits sees history + drafts[:i] as its context."""
    if not params.adjusts_logits and guide is None:
        return logits
    rows = [penalize(logits[i : i + 1], params, history + drafts[:i], n_prompt, guide) for i in range(len(logits))]
    return torch.cat(rows)


def judge(
    logits: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator,
    history: list[int],
    n_prompt: int,
    guide=None,
) -> tuple[int, int]:
    """Verify one row: target logits [len(drafts) + 1, V] over `[last token, drafts]` -> (accepted,
    bonus). Penalties see history (its first `n_prompt` tokens the prompt) + the drafts before
    each position, and so does a `guide`'s constraint."""
    rows = _penalized(logits, params, history, drafts, n_prompt, guide)
    if params.greedy:
        return verify_greedy(rows, drafts)
    q = None if draft_probs is None else draft_probs[: len(drafts)]
    return verify_sampled(processed_probs(rows, params), drafts, q, generator)


@torch.inference_mode()
def generate(
    engine,
    proposer: Proposer,
    spec: SpecConfig,
    prompt: list[int],
    params: SamplingParams,
    *,
    max_tokens: int,
    stop_ids: tuple[int, ...],
    generator: torch.Generator,
    stats,
    prompt_cache=None,
    logprobs: int | None = None,
    guide=None,
) -> Iterator:
    limit = min(engine.n_ctx, len(prompt) + max_tokens)  # total tokens the sequence may reach
    cache, safe = engine.open_cache(prompt, limit + spec.num_draft + 1, prompt_cache)
    stats.cached_tokens = safe
    tokens = list(prompt)  # then each emitted token; the cache holds K/V for tokens[:safe]
    model = engine.model
    controller = AdaptiveK(spec.num_draft) if spec.adaptive else None
    proposer.begin(prompt)
    width = max(spec.num_draft, 1)
    stats.drafted_by_position = [0] * width
    stats.accepted_by_position = [0] * width

    try:
        t0 = time.perf_counter()
        logits, hidden = engine.prefill(cache, prompt[safe:])
        safe = len(prompt)
        stats.prefill_s = time.perf_counter() - t0
        t_round = time.perf_counter()
        raw = logits[None]  # the raw logits of each token in `new`, for its log-probability
        logits = penalize(raw, params, prompt, len(prompt), guide)[0]
        first = int(next_token(logits[None], params, generator)[0])
        new, drafted, accepted = [first], 0, 0
        while True:
            emit, finish, stop = [], None, []
            for t in new:
                if t in stop_ids:
                    finish, stop = "stop", [t]
                    break
                emit.append(t)
                tokens.append(t)
                if len(tokens) >= limit:
                    finish = "length"
                    break
            stats.completion_tokens = len(tokens) - len(prompt) + (finish == "stop")
            lps = None if logprobs is None else token_logprobs(raw, emit + stop, logprobs)
            now = time.perf_counter()
            stats.decode_s += now - t_round
            yield Step(emit, finish, now - t_round, drafted, accepted, logprobs=lps)
            if finish:
                return
            t_round = time.perf_counter()
            state = SpecState(tokens, hidden, cache, model)
            proposer.after_verify(state)

            # Propose: no more drafts than fit in the cache or can still be emitted.
            n = len(tokens)
            k = controller.choose() if controller else spec.num_draft
            k = max(0, min(k, cache.max_len - n, limit - n - 1))
            td = time.perf_counter()
            draft = proposer.propose(state, k, params, generator) if k else Draft([])
            drafts = draft.tokens[:k]
            tt = time.perf_counter()
            stats.draft_s += tt - td

            # Verify [last token, drafts] in one target forward.
            x = torch.tensor([[tokens[-1]] + drafts], device=engine.device)
            pos = torch.arange(n - 1, n + len(drafts), device=engine.device)[None]
            out_logits, out_hidden = model(x, pos, cache)
            stats.target_s += time.perf_counter() - tt
            stats.target_forwards += 1
            accepted, bonus = judge(out_logits[0], drafts, draft.probs, params, generator, tokens, len(prompt), guide)

            # Roll back to [.., last token, accepted drafts]; the bonus is the new unprocessed token.
            cache.trim(n + accepted)
            safe = n + accepted  # tokens gets the accepted drafts at the top of the next round
            hidden = out_hidden[0, accepted]
            new, drafted, raw = drafts[:accepted] + [bonus], len(drafts), out_logits[0, : accepted + 1]
            stats.drafted += len(drafts)
            stats.accepted += accepted
            for i in range(len(drafts)):
                stats.drafted_by_position[i] += 1
                stats.accepted_by_position[i] += i < accepted
            tally = stats.by_source.setdefault(draft.source if drafts else "", [0, 0, 0])
            tally[0], tally[1], tally[2] = tally[0] + 1, tally[1] + len(drafts), tally[2] + accepted
            if controller:
                controller.update(len(drafts), accepted, time.perf_counter() - td)
    finally:  # also when the caller stops early or a forward fails: keep only what completed
        if prompt_cache is not None:
            prompt_cache.keep(cache, tokens[:safe])
