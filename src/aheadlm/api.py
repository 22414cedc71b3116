"""Python API: `aheadlm.load(...)` -> LLM with generate / stream / chat."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import load_model
from .engine import Engine, GenerationStats, Step
from .errors import InvalidRequestError
from .guided import ANY_OBJECT, GuideTable, JsonGuide, table_for
from .outputs import TokenLogprob
from .prompt_cache import PromptCache
from .proposers import make_proposer
from .registry import REGISTRY, resolve
from .sampling import SamplingParams, check_logprobs
from .schema import SchemaGrammar
from .speculative import SpecConfig
from .tokenizer import PLAIN_CHAT_STOP, TextStream, Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = None
    """When asked for with `logprobs=`: one per token in `token_ids`, then one for the stop token
    that ended generation, if one did."""


def _is_count(x) -> bool:
    """An integer (numpy's too) that is not a bool: True must not pass for a count or an id."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str):
        raise InvalidRequestError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InvalidRequestError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    # torch also names mps, xpu, meta and more, which the engine has never run on
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {device!r} is not supported (use cpu or cuda)")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequestError(f"device {device!r} requested but no CUDA device is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise InvalidRequestError(f"device {device!r} requested but there are {n} CUDA devices (cuda:0..{n - 1})")
    return device


class _StopMatcher:
    """Finds stop strings in streamed text, holding back a tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was hit)."""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _through_stop(tokenizer: Tokenizer, before: list[int], new: list[int], stops: list[str]) -> list[int]:
    """The shortest prefix of `new` whose text completes a stop string: a speculative round can
    emit tokens past the stop, and the result must hold exactly what plain decoding would."""
    for n in range(1, len(new)):
        text = tokenizer.decode(before + new[:n])
        if any(s in text for s in stops):
            return new[:n]
    return new


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    collection = isinstance(stop, list | tuple | set | frozenset)
    stops = [stop] if isinstance(stop, str) else list(stop) if collection else stop
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}")
    return stops


class LLM:
    """A loaded target model (and, when given, its drafter), ready to generate.

    It keeps the KV cache of its last sequence (`prompt_cache`), so a prompt that extends it, such
    as the next turn of a chat, prefills only its new tokens; outputs are the same either way.
    `prompt_cache=False` turns that off, `clear_cache()` drops what is kept."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, name: str, prompt_cache: bool = True):
        self.engine = engine
        self.tokenizer = tokenizer
        self.name = name
        self.prompt_cache = PromptCache() if prompt_cache else None
        self._guide_table: GuideTable | None = None  # built on the first JSON-mode request

    def json_guide(self, stop_ids: Sequence[int] = (), schema: dict | None = None) -> JsonGuide:
        """A fresh constraint for one JSON-mode request: any JSON object, or a value of `schema`,
        then one of the tokenizer's stop tokens (or `stop_ids`)."""
        ends = tuple(dict.fromkeys([*self.tokenizer.stop_ids, *stop_ids]))
        if not ends:
            raise InvalidRequestError("JSON mode needs a stop token, and this model's tokenizer has none")
        grammar = ANY_OBJECT if schema is None else SchemaGrammar(schema)
        if self._guide_table is None:
            self._guide_table = table_for(self.tokenizer)
        return JsonGuide(self._guide_table, ends, grammar)

    def clear_cache(self) -> None:
        """Forget the kept KV cache (it holds memory in proportion to the last sequence's length)."""
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    @property
    def config(self):
        return self.engine.config

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids: a string encoded (with BOS where the model uses one), or ids
        checked and kept as they are."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        # bytes would pass as a sequence of ints: refuse it rather than read it as token ids
        ok = isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray)
        ids = list(prompt) if ok else []
        if not ok or not all(_is_count(i) for i in ids):
            raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return [int(i) for i in ids]

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        stats: GenerationStats | None = None,
        logprobs: int | None = None,
        json_mode: bool = False,
        json_schema: dict | None = None,
    ) -> Iterator[Step]:
        """Yield `Step`s with text deltas; the last one has `finish_reason` set. With `logprobs`
        (0..20), each step also carries its tokens' log-probabilities under the model's own
        distribution and that many most likely alternatives (`TokenLogprob`). `logit_bias` maps
        token ids to values added to their logits; the penalties follow OpenAI (presence,
        frequency: over the output) and HF (repetition: over prompt and output). `json_mode`
        constrains the output to one JSON object, `json_schema` to a value of that schema (see
        `schema.py` for what it may say); either may still stop at `max_tokens` or a stop string
        before the value is complete."""
        params = SamplingParams(
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
        )
        logprobs = check_logprobs(logprobs)
        if not _is_count(max_tokens) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not isinstance(json_mode, bool):
            raise InvalidRequestError(f"json_mode must be True or False, got {json_mode!r}")
        if not isinstance(ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be True or False, got {ignore_eos!r}")
        if stats is not None and not isinstance(stats, GenerationStats):
            raise InvalidRequestError(f"stats must be a GenerationStats or None, got {type(stats).__name__}")
        bad_ids = InvalidRequestError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
        try:  # any collection of ids: a list, a range, a numpy array; not a string or a lone int
            given = list(stop_token_ids) if not isinstance(stop_token_ids, str | bytes) else None
        except TypeError:
            given = None
        if given is None or not all(_is_count(i) for i in given):
            raise bad_ids
        extra_ids = [int(i) for i in given]
        max_tokens = int(max_tokens)
        stops = _stop_list(stop)
        ids = self.prompt_ids(prompt)
        stop_ids = tuple(extra_ids) + (() if ignore_eos else self.tokenizer.stop_ids)
        steps = self.engine.generate(
            ids,
            params,
            max_tokens=max_tokens,
            stop_ids=stop_ids,
            stats=stats,
            prompt_cache=self.prompt_cache,
            logprobs=logprobs,
            guide=self.json_guide(extra_ids, json_schema) if json_mode or json_schema is not None else None,
        )
        text = TextStream(self.tokenizer)
        matcher = _StopMatcher(stops)
        for step in steps:
            delta = text.push(step.token_ids)
            if step.finish_reason:
                delta += text.flush()
            step.text, hit = matcher.feed(delta)
            if hit:
                before = text.ids[: len(text.ids) - len(step.token_ids)]
                kept = _through_stop(self.tokenizer, before, step.token_ids, stops)
                if stats is not None:
                    stats.completion_tokens -= len(step.token_ids) - len(kept)
                step.token_ids = kept
                if step.logprobs is not None:
                    step.logprobs = step.logprobs[: len(kept)]
                step.finish_reason = "stop"
                steps.close()
                yield step
                return
            if step.finish_reason:
                step.text += matcher.flush()
            yield step
            if step.finish_reason:
                return

    def embed(self, text: str | Sequence[int], pooling: str = "mean") -> list[float]:
        """A unit-length embedding of `text` (or token ids): the model's final hidden states
        averaged over the text's tokens (a leading BOS left out), or the last token's with
        `pooling="last"`. A generative model's states, not a trained embedding model's."""
        ids = self.prompt_ids(text)
        bos = self.tokenizer.bos_id is not None and bool(ids) and ids[0] == self.tokenizer.bos_id
        return self.engine.embed(ids, pooling, skip_first=bos).tolist()

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        stats = kwargs.pop("stats", None)
        stats = GenerationStats() if stats is None else stats  # anything else is checked by stream
        text, ids, reason, lps = [], [], "length", None
        for step in self.stream(prompt, stats=stats, **kwargs):
            text.append(step.text)
            ids.extend(step.token_ids)
            reason = step.finish_reason or reason
            if step.logprobs is not None:
                lps = [] if lps is None else lps
                lps.extend(step.logprobs)
        return Completion("".join(text), ids, reason, stats, lps)

    def score(self, prompt: str | Sequence[int], *, logprobs: int = 0) -> list[TokenLogprob]:
        """The log-probability of each token of `prompt` after the first, given the tokens before
        it, with the `logprobs` likeliest tokens at each position: for perplexity, or to compare
        the likelihood of answers. A string gets the model's BOS token first, as in `generate`."""
        return self.engine.score(self.prompt_ids(prompt), logprobs)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[str]]:
        """Token ids for a conversation and the stop strings its format needs."""
        if (
            not isinstance(messages, list | tuple)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
        if not all(isinstance(m.get("content"), str) for m in messages):
            raise InvalidRequestError("each message's content must be a string")
        extra_stop = [] if self.tokenizer.has_chat_template else list(PLAIN_CHAT_STOP)
        return self.tokenizer.chat_ids(list(messages)), extra_stop

    def stream_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Iterator[Step]:
        ids, extra_stop = self.chat_prompt(messages)
        return self.stream(ids, stop=_stop_list(kwargs.pop("stop", None)) + extra_stop, **kwargs)

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Completion:
        ids, extra_stop = self.chat_prompt(messages)
        return self.generate(ids, stop=_stop_list(kwargs.pop("stop", None)) + extra_stop, **kwargs)


def load(
    model: str | os.PathLike = "gemma3-270m",
    *,
    drafter: str | os.PathLike | None = None,
    draft_tokens: int | None = None,
    adaptive: bool | None = None,
    threshold: float | None = None,
    fallback_k: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    n_ctx: int | None = None,
    kv_dtype: str | torch.dtype | None = None,
) -> LLM:
    """Load a model by registered name (`gemma3-270m`, `smollm2-135m`), GGUF path or HF folder.

    `drafter`: None (the model's shipped MTP drafter when there is one), "none", "ngram", "mtp",
    "draft:MODEL" or an MTP drafter folder. `draft_tokens` is k, the most drafts per round (None:
    the registered model's measured default when no drafter is named, 6 for Gemma 3 270M, else 4);
    `adaptive` picks k per round for the best measured speed (None: on when the registered model's
    measured default uses it and no drafter is named); `threshold` makes a model drafter draft only
    while its confidence is at least this (None: an MTP drafter's own `draft_threshold`, chosen
    when it was trained; 0 behind lookup and for draft models); `fallback_k` caps the drafts of X
    in "ngram+X" when lookup finds nothing (None: k). `kv_dtype` is what the KV cache stores (None:
    the model's dtype; "bfloat16" halves its memory and what attention reads at long contexts)."""
    if not isinstance(model, str | os.PathLike):
        raise InvalidRequestError(f"model must be a name or a path, got {type(model).__name__}")
    if not str(model).strip():  # Path("") is the current folder: "./config.json missing" would mislead
        raise InvalidRequestError("the model name is empty: give a registered name, a GGUF file or a folder")
    if n_ctx is not None and (not _is_count(n_ctx) or n_ctx < 1):
        raise InvalidRequestError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    reg = REGISTRY.get(str(model))
    if draft_tokens is None:
        draft_tokens = reg.default_draft_tokens if drafter is None and reg is not None else 4
    if not _is_count(draft_tokens) or not 1 <= draft_tokens <= 32:
        raise InvalidRequestError(f"draft_tokens must be in 1..32, got {draft_tokens!r}")
    if fallback_k is not None and (not _is_count(fallback_k) or not 1 <= fallback_k <= 32):
        raise InvalidRequestError(f"fallback_k must be in 1..32, got {fallback_k!r}")
    if threshold is not None and (
        not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0
    ):
        raise InvalidRequestError(f"threshold must be in 0..1, got {threshold!r}")
    if adaptive is not None and not isinstance(adaptive, bool):
        raise InvalidRequestError(f"adaptive must be True, False or None, got {adaptive!r}")
    kv = None if kv_dtype is None else resolve_dtype(kv_dtype)  # refused before the model loads
    path = resolve(model)
    device = resolve_device(device)
    net, tokenizer = load_model(path, resolve_dtype(dtype), device)
    if tokenizer is None:
        raise InvalidRequestError(f"{path}: no tokenizer found next to the weights")
    n_ctx = None if n_ctx is None else int(n_ctx)  # a numpy integer becomes a plain one
    ctx = min(n_ctx or net.config.max_position, net.config.max_position)
    proposer = make_proposer(
        None if drafter is None else str(drafter),
        net,
        model_name=str(model),
        n_ctx=ctx,
        threshold=threshold,
        fallback_k=fallback_k,
    )
    if adaptive is None:
        adaptive = drafter is None and reg is not None and reg.default_adaptive
    engine = Engine(net, proposer=proposer, spec=SpecConfig(draft_tokens, adaptive), n_ctx=n_ctx, kv_dtype=kv)
    name = str(model) if str(model) in REGISTRY else path.name
    return LLM(engine, tokenizer, name)
