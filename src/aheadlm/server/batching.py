"""Continuous batching with speculative decoding (the server's engine).

Up to `slots` requests decode together in one batch KV cache, one row each. A round drafts for
every active row at once (the MTP drafter runs batched over the rows; n-gram proposers are per
request), verifies all rows in one target forward (rows padded with position -1), then accepts,
rolls back and emits per row. New requests are prefilled in a private cache and copied into a free
row, so a long prompt never stalls the rows already decoding for more than its prefill.

A finished request's row keeps its K/V. A new request goes to the free row holding the longest
prefix of its prompt (the earlier turns of a chat, an agent's context) and prefills only the rest;
this is exact, since prefill and decoding share the batch-invariant kernels (`Engine.exact_prefill`).

Rows are computed independently by the kernels, so a request receives exactly the tokens it would
receive alone, whatever else is in the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..copy_head import COPY_TOP, recent_tokens
from ..drafter import MTPDrafter
from ..engine import Engine
from ..kv_cache import KVCache
from ..model import Transformer
from ..outputs import GenerationStats, TokenLogprob
from ..prompt_cache import hold, reusable
from ..proposers import NgramProposer, SpecState, choose_mixed
from ..sampling import SamplingParams, next_token, penalize, token_logprobs
from ..speculative import judge


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: tuple[int, ...]
    emit: Callable[[list[int], str | None, list[TokenLogprob] | None], None]
    """Called from the engine thread with (new token ids, finish reason or None, their
    log-probabilities when `logprobs` is set, else None; after a stop token, one more for it)."""
    generator: torch.Generator | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancelled: bool = False
    row: int = -1
    tokens: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    limit: int = 0
    ngram: NgramProposer | None = None
    completion_tokens: int | None = None
    """Set by the HTTP layer when a stop string ends the request (tokens through the stop)."""
    logprobs: int | None = None
    """With a number (of alternatives, 0..20), each emitted token comes with its log-probability."""
    guide: Any = None
    """A `guided.JsonGuide` constraining this request's output (JSON mode), or None."""
    prompt_logprobs: int | None = None
    """With a number, the prompt is scored too: `prompt_scored` gets, before the first tokens are
    emitted, the log-probability of each prompt token after the first (and that many alternatives)."""
    prompt_scored: list[TokenLogprob] | None = None


class BatchEngine:
    def __init__(
        self,
        model: Transformer,
        *,
        drafter: MTPDrafter | None = None,
        ngram: bool = False,
        num_draft: int = 4,
        slots: int = 8,
        n_ctx: int = 4096,
        draft_max_batch: int = 3,
        fallback_k: int | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.fallback_k = fallback_k
        """With lookup on, the most MTP drafts for a row lookup found nothing for (see HybridProposer)."""
        self.draft_max_batch = draft_max_batch
        """Draft only while at most this many requests run: a big batch already keeps the CPU
        busy, and every row pays for the longest draft in the verify forward."""
        self.drafter = drafter
        self.ngram = ngram
        self.num_draft = num_draft if (drafter is not None or ngram) else 0
        self.n_ctx = min(n_ctx, model.config.max_position)
        self.max_step = 128
        p = next(model.parameters())
        self.device = p.device
        self.cache = KVCache(
            model.config,
            self.n_ctx,
            batch_size=slots,
            dtype=kv_dtype or model.embed_dtype(),
            device=p.device,
            max_step=self.max_step,
        )
        self.rows: list[Request | None] = [None] * slots
        self._prefill_engine = Engine(model, n_ctx=self.n_ctx, max_step=self.max_step, kv_dtype=self.cache.k[0].dtype)
        self.kept: list[list[int]] = [[] for _ in range(slots)]
        """Per free row, the tokens whose K/V it still holds (from its last request)."""
        self._freed = [0] * slots  # when each row was last freed, to reuse the stalest first
        self._clock = 0
        # One private prefill cache, emptied per admission: allocating it each time cost SmolLM2
        # 37 ms at 4,096 tokens, as much as prefilling the new tokens of a cached prompt.
        self._tmp = KVCache(
            model.config, self.n_ctx, dtype=self.cache.k[0].dtype, device=p.device, max_step=self.max_step
        )

    @property
    def active(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    def has_free_slot(self) -> bool:
        return any(r is None for r in self.rows)

    # -- admission ---------------------------------------------------------------------------------
    def _pick_row(self, prompt: list[int]) -> tuple[int, int]:
        """A free row for `prompt` and how many of its tokens that row already holds: the longest
        usable kept prefix, else the row freed longest ago."""
        free = [r for r, req in enumerate(self.rows) if req is None]
        best, held = min(free, key=lambda r: self._freed[r]), 0
        if not self._prefill_engine.exact_prefill:
            return best, 0
        for r in free:
            n = reusable(prompt, self.kept[r], self.cache, r)
            if n > held:
                best, held = r, n
        return best, held

    @torch.inference_mode()
    def admit(self, req: Request) -> None:
        """Prefill `req` in a private cache (from the kept prefix of the row it gets), move it into
        that row, emit its first token."""
        self._prefill_engine.check_prompt(req.prompt, req.max_tokens)
        req.params.check_vocab(self._prefill_engine.config.vocab_size)
        row, held = self._pick_row(req.prompt)
        scored = None if req.prompt_logprobs is None else []
        if scored is not None:
            held = 0  # every prompt position's logits are needed, and a kept prefix has none
        t0 = time.perf_counter()
        tmp = self._tmp
        tmp.reset()  # stale K/V may stay: empty slots (position -1) are never attended to
        if held:
            tmp.copy_row_from(self.cache, row, 0)
            tmp.trim(held)
        self.kept[row] = []  # the row is rewritten from here on
        logits, hidden = self._prefill_engine.prefill(
            tmp, req.prompt[held:], scored=scored, top=req.prompt_logprobs or 0
        )
        req.prompt_scored = scored
        self.cache.reset(row)
        self.cache.copy_row_from(tmp, 0, row)
        req.stats.prompt_tokens = len(req.prompt)
        req.stats.cached_tokens = held
        req.stats.prefill_s = time.perf_counter() - t0
        req.generator = req.generator or req.params.make_generator(self.device)
        req.row, req.hidden, req.tokens = row, hidden, list(req.prompt)
        req.limit = min(self.n_ctx, len(req.prompt) + req.max_tokens)
        if self.ngram:
            req.ngram = NgramProposer()
            req.ngram.begin(req.prompt)
        self.rows[row] = req
        raw = logits[None]
        first = int(
            next_token(penalize(raw, req.params, req.prompt, len(req.prompt), req.guide), req.params, req.generator)[0]
        )
        self._deliver(req, [first], raw, time.perf_counter())

    def _deliver(self, req: Request, new: list[int], raw: torch.Tensor, t_start: float) -> None:
        """Emit `new` up to a stop token or the length limit; `raw` holds each token's raw logits."""
        emit, finish, stop = [], None, []
        for t in new:
            if t in req.stop_ids:
                finish, stop = "stop", [t]
                break
            emit.append(t)
            req.tokens.append(t)
            if len(req.tokens) >= req.limit:
                finish = "length"
                break
        req.stats.completion_tokens = len(req.tokens) - len(req.prompt) + (finish == "stop")
        req.stats.decode_s += time.perf_counter() - t_start
        lps = None if req.logprobs is None else token_logprobs(raw, emit + stop, req.logprobs)  # a stop token's too
        req.emit(emit, finish, lps)
        if finish:
            self.release(req)

    def release(self, req: Request, keep: bool = True) -> None:
        """Free `req`'s row. With `keep` (not after a failure, which may have left K/V half
        written), the row keeps the K/V of the tokens it completed, for a later prompt to reuse."""
        if 0 <= req.row < len(self.rows) and self.rows[req.row] is req:
            row = req.row
            self.rows[row] = None
            self._clock += 1
            self._freed[row] = self._clock
            kept = hold(self.cache, req.tokens, row) if keep else None
            if kept is None:
                self.cache.reset(row)
            self.kept[row] = kept or []

    # -- one round ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        for r in self.active:
            if r.cancelled:
                self.release(r)
        active = self.active
        if not active:
            return
        t0 = time.perf_counter()
        k = self.num_draft if len(active) <= self.draft_max_batch else 0
        budget = {r.row: max(0, min(k, self.n_ctx - len(r.tokens), r.limit - len(r.tokens) - 1)) for r in active}
        drafts, probs = self._propose(active, budget)
        td = time.perf_counter()
        K = 1 + max(len(drafts[r.row]) for r in active)
        B = 1 + max(r.row for r in active)  # rows past the last busy one are not computed
        x = torch.zeros(B, K, dtype=torch.long)
        pos = torch.full((B, K), -1, dtype=torch.long)
        for r in active:
            seq = [r.tokens[-1]] + drafts[r.row]
            n = len(r.tokens)
            x[r.row, : len(seq)] = torch.tensor(seq)
            pos[r.row, : len(seq)] = torch.arange(n - 1, n - 1 + len(seq))
        _, hidden = self.model(x.to(self.device), pos.to(self.device), self.cache.first_rows(B), num_logits=0)
        # Logits only for real positions: padding costs the output head nothing.
        index = [(r.row, i) for r in active for i in range(1 + len(drafts[r.row]))]
        rows_idx = torch.tensor([a for a, _ in index])
        cols_idx = torch.tensor([b for _, b in index])
        logits = self.model.logits(hidden[rows_idx, cols_idx][None])[0]
        tt = time.perf_counter()
        offset = 0
        for r in active:
            d = drafts[r.row]
            m = len(d) + 1
            accepted, bonus = judge(
                logits[offset : offset + m],
                d,
                probs.get(r.row),
                r.params,
                r.generator,
                r.tokens,
                len(r.prompt),
                r.guide,
            )
            offset += m
            n = len(r.tokens)
            self.cache.trim(n + accepted, row=r.row)
            r.hidden = hidden[r.row, accepted]
            st = r.stats
            st.target_forwards += 1
            st.drafted += len(d)
            st.accepted += accepted
            st.draft_s += (td - t0) / len(active)
            st.target_s += (tt - td) / len(active)
            self._deliver(r, d[:accepted] + [bonus], logits[offset - m : offset], t0)
            if r.ngram is not None and self.rows[r.row] is r:
                r.ngram.after_verify(SpecState(r.tokens, r.hidden, self.cache, self.model))

    def _propose(self, active: list[Request], budget: dict[int, int]):
        drafts: dict[int, list[int]] = {r.row: [] for r in active}
        probs: dict[int, torch.Tensor] = {}
        if self.ngram:
            for r in active:
                if budget[r.row]:
                    st = SpecState(r.tokens, r.hidden, self.cache, self.model)
                    drafts[r.row] = r.ngram.propose(st, budget[r.row], r.params, r.generator).tokens
        # The MTP drafter (alone, or behind the lookup) drafts for the rows that have no draft yet.
        active = [r for r in active if budget[r.row] and not drafts[r.row]]
        if self.ngram and self.fallback_k is not None:
            budget = {row: min(b, self.fallback_k) for row, b in budget.items()}
        k = max((budget[r.row] for r in active), default=0)
        if self.drafter is None or k == 0:
            return drafts, probs
        d, B = self.drafter, 1 + max(r.row for r in active)
        pos = torch.full((B,), -1, dtype=torch.long)
        tok = torch.zeros(B, dtype=torch.long)
        h = torch.zeros(B, self.model.config.hidden_size, dtype=d.dtype)
        for r in active:
            pos[r.row], tok[r.row], h[r.row] = len(r.tokens) - 1, r.tokens[-1], r.hidden
        ctx = d.round_context(self.model, self.cache.first_rows(B), pos.to(self.device))
        known = None
        if d.copy is not None:  # each row's sequence, for the copy head to point into
            known = torch.zeros(B, 1 + int(pos.max()), dtype=torch.long)
            for r in active:
                known[r.row, : len(r.tokens)] = torch.tensor(r.tokens)
            known = known.to(self.device)
        qs: dict[int, list[torch.Tensor]] = {r.row: [] for r in active}
        ptr = None
        for j in range(k):
            h_in = h
            head_in, h = d.step(self.model, tok.to(self.device), h, ctx)
            if known is not None:
                emb = self.model.embed_tokens(tok[:, None].to(self.device)).to(h.dtype)
                chains = [[] for _ in range(B)]
                for r in active:
                    chains[r.row] = r.tokens[-d.copy.recent :] + drafts[r.row]
                recent = recent_tokens(chains, d.copy.recent).to(self.device)
                ptr = d.copy(emb, h_in[:, None], h[:, None], ctx, known, recent, ptr, top=COPY_TOP)
                cids = ptr.ids(known)
            for r in active:
                if j >= budget[r.row] or len(drafts[r.row]) < j:
                    continue
                ids, scores = d.scores(self.model, head_in[r.row])
                row = None
                if known is not None:
                    row = (cids[r.row, 0], ptr.w[r.row, 0], float(ptr.g[r.row, 0]))
                choice, q, _ = choose_mixed(ids, scores, row, d.config.vocab_size, r.params, r.generator)
                drafts[r.row].append(choice)
                if q is not None:
                    qs[r.row].append(q)
                tok[r.row] = choice
        for row, q in qs.items():
            if q:
                probs[row] = torch.stack(q)
        return drafts, probs
