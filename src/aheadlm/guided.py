"""JSON mode: decoding constrained so that the output is one JSON object (OpenAI's
`response_format: {"type": "json_object"}`, Ollama's `format: "json"`).

A byte-level pushdown recogniser of JSON (RFC 8259) says which bytes may come next; a token is
allowed when all its bytes are, and a stop token only once the object is complete. The mask
depends only on the recogniser's state (its mode, the containers a token could close, the
whitespace run), so each state's mask is computed once per vocabulary and kept in its
`GuideTable`. The engine applies the mask to every position it decodes or verifies, after
penalties, so speculative output still equals plain decoding's under the same constraint.
`schema.SchemaGrammar` is the same for the values a JSON schema describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Recogniser modes. A state is (mode, aux, stack, ws): aux carries the mode's detail (the number's
# state, a literal's remaining bytes, (whether a string is a key, its `string_step` state)),
# stack the open containers ("o" object, "a" array), ws the current whitespace run.
TOP, VALUE, OBJ_FIRST, KEY, COLON, ARR_FIRST, AFTER, STR, NUM, LIT, DONE = range(11)
WS = frozenset(b" \t\n\r")
MAX_INDENT = 20
"""Whitespace between the tokens of the JSON is a single space, or a newline and at most this
many spaces and tabs (llama.cpp's JSON grammar: `" " | "\n" [ \t]{0,20}`): small models in JSON
mode otherwise spend their tokens on blank space."""


def ws_step(ws: int, b: int) -> int | None:
    """The whitespace run after byte `b` (a whitespace byte), or None where it may not take it.
    `ws`: 0 before any, 1 after a single space, 2 + n after a newline and n spaces or tabs."""
    if ws == 0:
        return 1 if b == 0x20 else 2 if b == 0x0A else None
    if ws >= 2 and b in (0x20, 0x09) and ws - 2 < MAX_INDENT:
        return ws + 1
    return None


MAX_MASKS = 256
"""Masks a table keeps (two bytes per token each with their tensors: at most 128 MiB for Gemma
3's vocabulary)."""
HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
# Number parts: after "-", after a leading 0, in the integer digits, after ".", in the fraction,
# after "e", after the exponent's sign, in the exponent. Complete: ZERO, INT, FRAC, EXP.
MINUS, ZERO, INT, DOT, FRAC, E, ESIGN, EXP = range(8)
NUM_DONE = frozenset((ZERO, INT, FRAC, EXP))
MAX_DIGITS = 16
"""Digits a number's integer part, fraction or exponent may have (llama.cpp's JSON grammar
caps integers at 16 too)."""

State = tuple


def start() -> State:
    return (TOP, None, "", 0)


def _after_value(stack: str) -> State:
    return (AFTER, None, stack, 0) if stack else (DONE, None, "", 0)


def _value(b: int, stack: str) -> State | None:
    """The state after byte `b` starts a value."""
    if b == 0x7B:  # {
        return (OBJ_FIRST, None, stack + "o", 0)
    if b == 0x5B:  # [
        return (ARR_FIRST, None, stack + "a", 0)
    if b == 0x22:  # "
        return (STR, (False, 0), stack, 0)
    if b == 0x2D or b in DIGITS:
        return (NUM, number_start(b), stack, 0)
    for lit in (b"true", b"false", b"null"):
        if b == lit[0]:
            return (LIT, lit[1:], stack, 0)
    return None


def _close(b: int, stack: str) -> State | None:
    if stack and b == (0x7D if stack[-1] == "o" else 0x5D):  # } or ]
        return _after_value(stack[:-1])
    return None


def step(s: State, b: int) -> State | None:
    """The state after byte `b`, or None where JSON cannot go on with it."""
    mode, aux, stack, ws = s
    if mode == STR:
        key, inner = aux
        nxt = string_step(inner, b)
        if nxt == STRING_END:
            return (COLON, None, stack, 0) if key else _after_value(stack)
        return None if nxt is None else (STR, (key, nxt), stack, 0)
    if mode == LIT:
        if b != aux[0]:
            return None
        return (LIT, aux[1:], stack, 0) if len(aux) > 1 else _after_value(stack)
    if mode == NUM:
        nxt = number_step(aux, b)
        if nxt is not None:
            return (NUM, nxt, stack, 0)
        return step(_after_value(stack), b) if aux[0] in NUM_DONE else None
    if mode == DONE:
        return None
    if b in WS:  # between tokens of the JSON
        n = ws_step(ws, b)
        return None if n is None else (mode, aux, stack, n)
    if mode == TOP:
        return (OBJ_FIRST, None, "o", 0) if b == 0x7B else None
    if mode == VALUE:
        return _value(b, stack)
    if mode == ARR_FIRST:
        return _close(b, stack) or _value(b, stack)
    if mode == OBJ_FIRST:
        return _close(b, stack) or ((STR, (True, 0), stack, 0) if b == 0x22 else None)
    if mode == KEY:
        return (STR, (True, 0), stack, 0) if b == 0x22 else None
    if mode == COLON:
        return (VALUE, None, stack, 0) if b == 0x3A else None
    # AFTER a value inside a container: a comma or the container's closer
    if b == 0x2C:
        return (KEY, None, stack, 0) if stack[-1] == "o" else (VALUE, None, stack, 0)
    return _close(b, stack)


STRING_END = -2


def string_step(inner: int, b: int) -> int | None:
    """Inside a JSON string: its state after byte `b` (`inner` 0 in its text, -1 after a
    backslash, 1..4 hex digits of a \\u escape still to come), `STRING_END` after the closing
    quote, or None where the string cannot take `b`."""
    if inner == 0:
        return STRING_END if b == 0x22 else -1 if b == 0x5C else None if b < 0x20 else 0
    if inner == -1:
        return 4 if b == 0x75 else 0 if b in b'"\\/bfnrt' else None
    return inner - 1 if b in HEXDIGITS else None


def number_start(b: int) -> tuple[int, int]:
    """A number's state, (part, digits in the part so far), after its first byte (- or a digit)."""
    return (MINUS, 0) if b == 0x2D else (ZERO, 1) if b == 0x30 else (INT, 1)


def number_step(num: tuple[int, int], b: int) -> tuple[int, int] | None:
    """The number's state after byte `b`, or None where `b` does not continue it (or would make a
    part longer than `MAX_DIGITS`: small models can otherwise write digits until they run out)."""
    part, digits = num
    nxt = number_part(part, b)
    if nxt is None:
        return None
    digits = digits + 1 if nxt == part else int(b in DIGITS)
    return None if digits > MAX_DIGITS else (nxt, digits)


def number_part(part: int, b: int) -> int | None:
    """The number's part after byte `b`, or None where `b` does not continue it."""
    if b in DIGITS:
        if part == MINUS:
            return ZERO if b == 0x30 else INT
        return {INT: INT, DOT: FRAC, FRAC: FRAC, E: EXP, ESIGN: EXP, EXP: EXP}.get(part)
    if b == 0x2E:
        return DOT if part in (ZERO, INT) else None
    if b in b"eE":
        return E if part in (ZERO, INT, FRAC) else None
    if b in b"+-":
        return ESIGN if part == E else None
    return None


def advance(s: State | None, data: bytes, step=step) -> State | None:
    """The state after `data` under a recogniser's `step` (this module's: any JSON object)."""
    for b in data:
        if s is None:
            return None
        s = step(s, b)
    return s


class JsonGrammar:
    """Any JSON object: the recogniser above, as `GuideTable` and `JsonGuide` use a grammar
    (`schema.SchemaGrammar` is the other one)."""

    key = ("json",)
    start = staticmethod(start)
    step = staticmethod(step)

    @staticmethod
    def done(s: State) -> bool:
        return s[0] == DONE

    @staticmethod
    def in_string(s: State) -> bool:
        """Whether tokens without quotes, backslashes or control bytes leave `s` as it is."""
        return s[0] == STR and s[1][1] == 0

    @staticmethod
    def signature(s: State, closers: int) -> tuple:
        """What a token's fate depends on: the stack only as deep as one token can close."""
        mode, aux, stack, ws = s
        return (mode, aux, stack[-closers:] if closers else "", len(stack) > closers, ws)


ANY_OBJECT = JsonGrammar()


class GuideTable:
    """A vocabulary's token bytes, prepared for computing masks, and the masks computed so far
    (one per recogniser signature; shared by every request on this vocabulary)."""

    def __init__(self, token_bytes: Sequence[bytes], special: Sequence[bool]):
        self.bytes = list(token_bytes)
        n = len(self.bytes)
        first = np.full(n, -1, dtype=np.int16)  # first byte, -1 for empty tokens
        first_text = np.full(n, -1, dtype=np.int16)  # first byte that is not whitespace
        plain = np.zeros(n, dtype=bool)  # no quote, backslash or control byte: inert in a string
        closers = 0
        for i, t in enumerate(self.bytes):
            if t:
                first[i] = t[0]
                rest = t.lstrip(b" \t\n\r")
                first_text[i] = rest[0] if rest else -1
                plain[i] = not any(c < 0x20 or c in (0x22, 0x5C) for c in t)
                closers = max(closers, t.count(b"}") + t.count(b"]"))
        self.special = np.asarray(special, dtype=bool)
        self.usable = (first >= 0) & ~self.special
        self.first, self.first_text, self.plain = first, first_text, plain
        self.closers = closers
        """The most containers one token could close: how much of the stack a mask depends on."""
        self.masks: dict[tuple, np.ndarray] = {}
        self._kept: dict[tuple, tuple] = {}  # (signature, logits width) -> (allowed ids, forbidden mask)

    def kept(self, s: State, width: int, grammar=ANY_OBJECT) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ids `allowed` takes among `width` logits (empty: none) and, where they are most of
        them (inside strings), the bool mask of the rest: masking those is then cheaper than
        gathering the kept ones."""
        key = (grammar.key, grammar.signature(s, self.closers), width)
        out = self._kept.get(key)
        if out is None:
            keep = np.zeros(width, dtype=bool)
            m = self.allowed(s, grammar)[:width]
            keep[: len(m)] = m
            ids = torch.from_numpy(np.flatnonzero(keep))
            out = (ids, None) if len(ids) <= width // 4 else (ids[:0], torch.from_numpy(~keep))
            self._kept[key] = out
        return out

    def allowed(self, s: State, grammar=ANY_OBJECT) -> np.ndarray:
        """Bool [vocab]: the tokens whose every byte the grammar allows from state `s` (stop
        tokens aside)."""
        key = (grammar.key, grammar.signature(s, self.closers))
        mask = self.masks.get(key)
        if mask is None:
            if len(self.masks) >= MAX_MASKS:  # many schemas over a server's life: start afresh
                self.masks.clear()
                self._kept.clear()
            mask = self.masks[key] = self._compute(s, grammar)
        return mask

    def _compute(self, s: State, grammar) -> np.ndarray:
        step = grammar.step
        ok_first = np.array([step(s, b) is not None for b in range(256)])
        after_ws = step(s, 0x20)
        ok_text = np.array([after_ws is not None and step(after_ws, b) is not None for b in range(256)])
        is_ws = np.isin(self.first, list(WS))
        cand = self.usable & np.where(
            is_ws, (self.first_text < 0) | ok_text[self.first_text.clip(0)], ok_first[self.first.clip(0)]
        )
        mask = np.zeros(len(self.bytes), dtype=bool)
        if grammar.in_string(s):  # tokens without quotes, escapes or controls never leave the string
            mask |= cand & self.plain
            cand &= ~self.plain
        for i in np.flatnonzero(cand):
            mask[i] = advance(s, self.bytes[i], step) is not None
        return mask


def table_for(tokenizer) -> GuideTable:
    """The `GuideTable` of a tokenizer's vocabulary (0.65 s for Gemma 3's 262k tokens; keep it)."""
    ids = range(tokenizer.vocab_size)
    return GuideTable([tokenizer.token_bytes(i) for i in ids], [tokenizer.is_special(i) for i in ids])


@dataclass
class JsonGuide:
    """One request's constraint: the output is a single JSON object, then a stop token. Keeps the
    recogniser's state after each output token, so a round's rows cost only their new tokens."""

    table: GuideTable
    stop_ids: tuple[int, ...]
    grammar: Any = ANY_OBJECT
    """`ANY_OBJECT`, or a `schema.SchemaGrammar` for output that follows a JSON schema."""
    _tokens: list[int] = field(default_factory=list)
    _states: list[State] = field(default_factory=list)

    def state(self, output: Sequence[int]) -> State | None:
        """The recogniser's state after `output`; None once it holds a token JSON cannot take
        (under the mask, only a stop token after the object)."""
        if not self._states:
            self._states.append(self.grammar.start())
        n = min(len(output), len(self._tokens))
        if list(output[:n]) != self._tokens[:n]:  # rejected drafts: where the two part (compared in C first)
            n = next(i for i in range(n) if output[i] != self._tokens[i])
        del self._tokens[n:], self._states[n + 1 :]
        for t in output[n:]:
            s = self._states[-1]
            if s is not None and t < len(self.table.bytes) and not self.table.special[t]:
                s = advance(s, self.table.bytes[t], self.grammar.step)
            else:
                s = None
            self._tokens.append(t)
            self._states.append(s)
        return self._states[-1]

    def mask(self, logits: torch.Tensor, output: Sequence[int]) -> torch.Tensor:
        """`logits` [N, V] of the position after `output` with every token JSON forbids at -inf."""
        s = self.state(output)
        V = logits.shape[-1]
        ids, forbid = (torch.zeros(0, dtype=torch.long), None) if s is None else self.table.kept(s, V, self.grammar)
        end = s is None or self.grammar.done(s)  # a stop token may come (a top-level number may also go on)
        stuck = forbid is None and not len(ids)  # no token can go on (no real vocabulary): end
        stops = [t for t in self.stop_ids if t < V] if end or stuck else []
        if forbid is not None:
            if stops:
                forbid = forbid.clone()
                forbid[stops] = False
            return logits.masked_fill(forbid.to(logits.device), float("-inf"))
        if stops:
            ids = torch.cat([ids, torch.tensor(stops, dtype=torch.long)])
        ids = ids.to(logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[:, ids] = logits[:, ids]
        return out
