"""Proposers behind one small interface: `mtp` (an MTP drafter reading the target's cache),
`ngram` (prompt lookup), `draft` (a smaller model with the same tokenizer) and `none`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import fused
from .drafter import MTPDrafter
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, processed_probs, sample_one


@dataclass
class Draft:
    """Proposed tokens and, when they were sampled, the distributions they were sampled from."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    """[len(tokens), V] drafter's processed distributions; None means chosen deterministically."""
    source: str = ""
    """Name of the proposer that made it (a hybrid reports which half drafted)."""
    confidences: list[float] = field(default_factory=list)
    """A model drafter's confidence in each token (what its threshold compares)."""


@dataclass
class SpecState:
    """What a proposer may read. `tokens[-1]` is the newest token, not yet in the target cache;
    `hidden` is the target's post-norm hidden state of the row that produced it."""

    tokens: list[int]
    hidden: torch.Tensor
    cache: KVCache
    target: Transformer


class Proposer:
    """Base class: proposes nothing (plain decoding)."""

    name = "none"

    def begin(self, prompt: list[int]) -> None:
        """A new request starts."""

    def propose(self, state: SpecState, k: int, params: SamplingParams, generator: torch.Generator) -> Draft:
        return Draft([])

    def after_verify(self, state: SpecState) -> None:
        """Called with the new state after each round (accepted tokens and bonus appended)."""


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """A draft token from drafter logits [V] -> (token, its processed distribution or None, confidence)."""
    if params.greedy:
        probs = torch.softmax(logits.float(), -1)
        tok = int(probs.argmax())
        return tok, None, float(probs[tok])
    q = processed_probs(logits[None], params)[0]
    tok = sample_one(q, generator)
    return tok, q, float(q.max())


def choose_candidate(ids: torch.Tensor | None, scores: torch.Tensor, vocab_size: int, params, generator):
    """A drafter's token from its scores of token ids `ids` (None: of the whole vocabulary) ->
    (token, processed q or None, confidence). With a clustered head only the candidates can be
    drafted, so both greedy and sampled drafts work on the candidate scores; a sampled draft's q
    (needed by rejection sampling) is that distribution placed over the whole vocabulary, zero
    elsewhere."""
    if ids is None:
        return _choose(scores, params, generator)
    if params.greedy:
        probs = torch.softmax(scores, -1)
        best = int(probs.argmax())
        return int(ids[best]), None, float(probs[best])
    p = processed_probs(scores[None], params)[0]
    j = sample_one(p, generator)
    q = torch.zeros(vocab_size, dtype=p.dtype, device=p.device).index_copy_(0, ids, p)
    return int(ids[j]), q, float(p.max())


def choose_mixed(ids, scores, pointer, vocab_size: int, params, generator):
    """`choose_candidate` for a drafter with a copy head: the head's distribution (processed as
    usual) weighted 1 - g plus, weighted g, the pointer's entries renormalised. `pointer` =
    (token ids, weights, g), the entries as lists or tensors (a draft round keeps at most
    `COPY_TOP`), or None for a drafter without a copy head. A sampled draft's q is exactly this
    mixture."""
    if pointer is None or pointer[2] <= 0.0:  # the head's choice alone
        return choose_candidate(ids, scores, vocab_size, params, generator)
    cids, cw, g = pointer
    mass: dict[int, float] = {}  # the pointer's weight per token
    for t, x in zip(_as_list(cids), _as_list(cw), strict=True):
        if x > 0.0:
            mass[t] = mass.get(t, 0.0) + x
    total = sum(mass.values())
    if total <= 0.0:
        return choose_candidate(ids, scores, vocab_size, params, generator)
    p = torch.softmax(scores.float(), -1) if params.greedy else processed_probs(scores[None], params)[0]
    pointed = torch.tensor(list(mass))
    weight = torch.tensor(list(mass.values()), dtype=p.dtype) * (g / total)
    if params.greedy:  # the best is the head's best or a pointed token; no sort needed
        in_head = (pointed[:, None] == ids[None]).to(p.dtype) @ p if ids is not None else p[pointed]
        mixed = weight + (1.0 - g) * in_head
        h = int(p.argmax())
        h_tok = h if ids is None else int(ids[h])
        h_mass = (1.0 - g) * float(p[h]) + mass.get(h_tok, 0.0) * (g / total)
        j = int(mixed.argmax())
        return (int(pointed[j]), None, float(mixed[j])) if float(mixed[j]) > h_mass else (h_tok, None, h_mass)
    if ids is None:
        ids = torch.arange(vocab_size)
    every, inverse = torch.unique(torch.cat([ids, pointed]), return_inverse=True)
    m = torch.zeros(every.numel(), dtype=p.dtype).index_add_(0, inverse, torch.cat([p * (1.0 - g), weight]))
    j = sample_one(m, generator)
    return int(every[j]), torch.zeros(vocab_size, dtype=m.dtype).index_copy_(0, every, m), float(m.max())


def _as_list(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else x


class MTPProposer(Proposer):
    """Drafts with an MTP drafter: the query position stays at the last token's position, the
    drafter reads the target's K/V in place, and no draft token enters any cache."""

    name = "mtp"

    def __init__(self, drafter: MTPDrafter, threshold: float | None = None):
        self.drafter = drafter
        self.threshold = drafter.config.draft_threshold if threshold is None else threshold
        """Draft only while the drafter's confidence is at least this: the round ends before a
        draft below it, and a round whose first draft is below it drafts nothing (a plain decode
        step, which costs less than verifying a draft that is likely rejected). None: the value
        measured for the drafter (its config's `draft_threshold`)."""
        self._compiled: tuple[Transformer, object] | None = None
        """(target, the drafter's compiled step for it), built on first use."""

    def compiled_step(self, target: Transformer):
        """The drafter's whole step as one compiled call for `target` (`fused.compile_drafter`), or None."""
        if self._compiled is None or self._compiled[0] is not target:
            self._compiled = (target, fused.compile_drafter(self.drafter, target))
        return self._compiled[1]

    @torch.inference_mode()
    def propose(self, state, k, params, generator):
        if k <= 0:
            return Draft([])
        target, d = state.target, self.drafter
        pos = torch.tensor([len(state.tokens) - 1])
        ctx = d.round_context(target, state.cache, pos)
        tok = state.tokens[-1]
        h = state.hidden[None].to(d.dtype)
        compiled = self.compiled_step(target) if fused.takes(h[:, None]) and fused.compiled_round_kv(ctx) else None
        layers = fused.draft_round(d, ctx) if compiled is not None else None
        known = torch.tensor([state.tokens]) if d.copy is not None else None
        tokens, qs, confs = [], [], []
        ptr = None  # the copy head's entries of the previous depth
        for _ in range(k):
            h_in = h
            if compiled is not None:  # the same numbers as the step and scores below, in one call
                h_next, ids, scores = compiled.step(tok, h[0], layers)
                h = h_next[None]
            else:
                head_in, h = d.step(target, torch.tensor([tok]), h, ctx)
                ids, scores = d.scores(target, head_in[0])
            pointer = None
            if d.copy is not None:
                emb = target.embed_tokens(torch.tensor([[tok]])).to(h.dtype)
                recent = (state.tokens[-d.copy.recent :] + tokens)[-d.copy.recent :]
                ptr, g = d.copy.draft_step(emb, h_in[:, None], h[:, None], ctx, state.tokens, known, recent, ptr)
                pointer = ([state.tokens[s] for s in ptr[0]], ptr[1], g)
            choice, q, conf = choose_mixed(ids, scores, pointer, d.config.vocab_size, params, generator)
            if conf < self.threshold:
                break
            tokens.append(choice)
            qs.append(q)
            confs.append(conf)
            tok = choice
        return Draft(tokens, None if params.greedy or not qs else torch.stack(qs), self.name, confs)


class NgramProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = max_n..min_n)
    in prompt + output and propose what followed it. Training-free; strong on copy-heavy text."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0

    def begin(self, prompt):
        self._index, self._indexed = {}, 0

    def _extend(self, tokens: list[int]) -> None:
        # Index n-grams ending strictly before the last token, so a match never points at itself.
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(self.min_n, self.max_n + 1):
                if end - n + 1 >= 0:
                    self._index[tuple(tokens[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, len(tokens) - 1)

    def match(self, tokens: list[int]) -> tuple[int, int] | None:
        """(end, n): where the latest earlier occurrence of the longest matching suffix n-gram
        ends, and n; None when no n-gram of min_n..max_n matches."""
        self._extend(tokens)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) < n:
                continue
            end = self._index.get(tuple(tokens[-n:]))
            if end is not None:
                return end, n
        return None

    def propose(self, state, k, params, generator):
        found = self.match(state.tokens)
        if found is None:
            return Draft([])
        end = found[0]
        return Draft(state.tokens[end + 1 : end + 1 + k], source=self.name)


class HybridProposer(Proposer):
    """Prompt lookup first, a model-based proposer when lookup finds no match: copies are nearly
    free and accepted at length, and the drafter covers the rest. `fallback_k` caps the
    fallback's drafts: its later drafts are accepted far less often than a copy's, and each one
    costs a draft step plus a wider verification."""

    def __init__(self, lookup: NgramProposer, fallback: Proposer, fallback_k: int | None = None):
        self.lookup, self.fallback = lookup, fallback
        self.fallback_k = fallback_k
        self.name = f"{lookup.name}+{fallback.name}"

    def begin(self, prompt):
        self.lookup.begin(prompt)
        self.fallback.begin(prompt)

    def propose(self, state, k, params, generator):
        draft = self.lookup.propose(state, k, params, generator)
        if draft.tokens:
            return draft
        k = k if self.fallback_k is None else min(k, self.fallback_k)
        return self.fallback.propose(state, k, params, generator)

    def after_verify(self, state):
        self.lookup.after_verify(state)
        self.fallback.after_verify(state)


class DraftModelProposer(Proposer):
    """A smaller model with the same tokenizer drafts autoregressively with its own KV cache."""

    name = "draft"

    def __init__(self, model: Transformer, n_ctx: int, threshold: float = 0.0):
        self.model = model
        self.n_ctx = n_ctx
        self.threshold = threshold
        self.cache: KVCache | None = None
        self.fed: list[int] = []
        """Tokens whose K/V the draft cache holds."""

    def begin(self, prompt):
        p = next(self.model.parameters())
        self.cache = KVCache(self.model.config, self.n_ctx, dtype=self.model.embed_dtype(), device=p.device)
        self.fed = []

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Run the tokens the draft cache lacks; returns the logits after the last one."""
        c = self.cache
        logits = None
        for i in range(c.length, len(tokens), c.max_step):
            chunk = tokens[i : i + c.max_step]
            pos = torch.arange(i, i + len(chunk))[None]
            logits, _ = self.model(torch.tensor([chunk]), pos, c, num_logits=1)
        self.fed = list(tokens)
        return logits[0, -1]

    @torch.inference_mode()
    def propose(self, state, k, params, generator):
        toks = list(state.tokens)
        k = min(k, self.n_ctx - len(toks))
        if k <= 0:
            return Draft([])
        logits = self._feed(toks)
        tokens, qs = [], []
        for i in range(k):
            choice, q, conf = _choose(logits, params, generator)
            if conf < self.threshold:
                break
            tokens.append(choice)
            qs.append(q)
            if i + 1 < k:
                logits = self._feed(toks + tokens)
        return Draft(tokens, None if params.greedy or not qs else torch.stack(qs), self.name)

    def after_verify(self, state):
        # Keep the longest prefix still part of the sequence; rejected drafts are forgotten, and
        # the newest token is left for the next round to feed.
        toks, keep = state.tokens, 0
        limit = min(len(self.fed), len(toks) - 1)
        while keep < limit and self.fed[keep] == toks[keep]:
            keep += 1
        if keep < self.cache.min_length():  # a ring cannot roll back that far: start over
            self.begin(toks)
            return
        self.cache.trim(keep)
        self.fed = self.fed[:keep]


def _assistant_beside(model_path: str | None):
    """Google ships each Gemma 4 assistant as `<model>-assistant`; one found beside a model folder
    is its drafter by default."""
    from pathlib import Path

    from .gemma4_assistant import is_assistant_folder

    if not model_path or not Path(model_path).is_dir():
        return None
    p = Path(model_path).resolve()
    candidate = p.with_name(p.name + "-assistant")
    return candidate if is_assistant_folder(candidate) else None


def make_proposer(
    spec: str | None,
    target: Transformer,
    *,
    model_name: str | None = None,
    n_ctx: int = 4096,
    threshold: float | None = None,
    fallback_k: int | None = None,
    dtype=None,
) -> Proposer | None:
    """Build a proposer from a user choice: None (the registered model's measured default, see
    `Registered.default_proposer`; plain decoding for other models), "none", "ngram", "mtp" (the
    drafter that ships for the model), "draft:MODEL" (a smaller model with the same tokenizer),
    "ngram+X" (lookup first, X with at most `fallback_k` drafts when it finds nothing), or a
    drafter folder. `threshold` None: each MTP drafter's own measured value (`draft_threshold` in
    its config), 0 behind lookup and for draft models."""
    from pathlib import Path

    from .checkpoint import load_model
    from .drafter import load_drafter
    from .errors import DrafterMismatchError, ModelNotFoundError
    from .registry import REGISTRY, default_drafter_dir, resolve

    device = next(target.parameters()).device
    if spec is not None and not spec.strip():
        raise ModelNotFoundError("the drafter name is empty: use none, ngram, mtp, draft:MODEL or a drafter folder")
    if spec is None:
        reg = REGISTRY.get(model_name or "")
        sibling = _assistant_beside(model_name)
        if reg is None and sibling is not None:
            from .progress import status

            status(f"using the MTP drafter {sibling} (pass --drafter none to turn it off)")
            return MTPProposer(load_drafter(sibling, target.config, device), threshold)
        if reg is None:  # a model we have not measured: plain decoding
            return None
        spec = reg.default_proposer
        if default_drafter_dir(model_name) is None:  # no drafter installed: "ngram+mtp" -> "ngram", "mtp" -> none
            spec = spec.removesuffix("mtp").rstrip("+") or "none"
    if spec and "+" in spec:  # "ngram+mtp": lookup first, then the named proposer
        first, _, rest = spec.partition("+")
        if first != "ngram":
            raise ModelNotFoundError(f"drafter {spec!r}: combinations are ngram+PROPOSER")
        if rest in ("", "ngram", "none") or "+" in rest:  # lookup behind lookup, or behind nothing, adds nothing
            raise ModelNotFoundError(
                f"drafter {spec!r}: ngram+X needs a model drafter X (mtp, draft:MODEL or a drafter folder)"
            )
        if fallback_k is None and rest == "mtp" and model_name in REGISTRY:  # the shipped pair's measured cap
            fallback_k = REGISTRY[model_name].default_fallback_k
        # Behind lookup the drafter's threshold measured level (docs/benchmarks.md): none unless asked.
        th = 0.0 if threshold is None else threshold
        inner = make_proposer(rest, target, model_name=model_name, n_ctx=n_ctx, threshold=th, dtype=dtype)
        return NgramProposer() if inner is None else HybridProposer(NgramProposer(), inner, fallback_k)
    if spec == "mtp":
        d = default_drafter_dir(model_name) if model_name else None
        if d is None:
            raise ModelNotFoundError(
                f"no MTP drafter ships for {model_name!r}: train one (aheadlm train-drafter) and pass its folder"
            )
        return MTPProposer(load_drafter(d, target.config, device), threshold)
    if spec == "none":
        return None
    if spec == "ngram":
        return NgramProposer()
    if spec.startswith("draft:"):
        if not spec[len("draft:") :].strip():
            raise ModelNotFoundError(f"drafter {spec!r}: the draft model's name is empty (draft:MODEL)")
        draft_model, _ = load_model(resolve(spec[len("draft:") :]), dtype or target.embed_dtype(), device)
        if draft_model.config.vocab_size != target.config.vocab_size:
            raise DrafterMismatchError("the draft model's vocabulary differs from the target's")
        return DraftModelProposer(draft_model, n_ctx, threshold or 0.0)
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"drafter {spec!r} not found: use none, ngram, mtp, draft:MODEL or a drafter folder")
    return MTPProposer(load_drafter(path, target.config, device), threshold)
