"""What the engine yields and records: per-step dataclasses and per-request statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """A token's log-probability under the target's own distribution: log-softmax of the raw
    logits, before temperature, top-k/p, min-p and penalties (vLLM's default, "raw logprobs"), so
    it does not depend on the sampling settings, and it is the same whether the token came from a
    draft the target accepted or from plain decoding."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """The most likely tokens at this position and their log-probabilities, best first."""


@dataclass
class Step:
    """One engine step: the tokens it emitted and why generation ended, if it did."""

    token_ids: list[int]
    finish_reason: str | None = None
    """None while running, then "stop" (stop token or string) or "length" (max tokens or context)."""
    elapsed: float = 0.0
    """Seconds spent on this step (the first step includes the prompt's prefill)."""
    drafted: int = 0
    accepted: int = 0
    text: str = ""
    """Text delta, filled in by the API layer."""
    logprobs: list[TokenLogprob] | None = None
    """When the caller asked for log-probabilities: one per token in `token_ids`, then one for the
    stop token that ended the step, if one did (it counts as a completion token, as in vLLM and
    OpenAI, and evaluation harnesses expect an entry for it)."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose K/V came from an earlier request (`PromptCache`), not prefilled again."""
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    target_forwards: int = 0
    """Decode-phase target forwards (prefill excluded)."""
    drafted: int = 0
    accepted: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    target_s: float = 0.0
    draft_s: float = 0.0
    by_source: dict[str, list[int]] = field(default_factory=dict)
    """Per proposer that drafted ("" when none did): [rounds, drafted, accepted]."""

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over decode time (prefill excluded, first token included)."""
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per decode-phase target forward (1.0 for plain decoding)."""
        return (self.completion_tokens - 1) / self.target_forwards if self.target_forwards else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position, strict=True)]

    def to_dict(self) -> dict:
        total = self.prefill_s + self.decode_s
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "target_forwards": self.target_forwards,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 3),
            "acceptance_by_position": [round(x, 4) for x in self.acceptance_by_position()],
            "time_target_s": round(self.target_s, 4),
            "time_draft_s": round(self.draft_s, 4),
            "time_other_s": round(max(0.0, total - self.target_s - self.draft_s), 4),
            "by_source": {(k or "none"): list(v) for k, v in self.by_source.items()},
        }
