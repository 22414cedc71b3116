"""JSON schemas for JSON mode (OpenAI's `response_format: {"type": "json_schema"}`, Ollama's
`format: {schema}`): a byte-level recogniser of the values a schema describes, used by
`guided.JsonGuide` in place of the any-object one.

What a schema may say: `type` object (with `properties`: every property is written, in the
schema's order, and no other, as in OpenAI's strict mode), array (`items`, `minItems`,
`maxItems`), string, number, integer, boolean, null; `enum` and `const` of scalars; a list of
types, `anyOf` or `oneOf` whose branches begin with different bytes, or that are objects told
apart by a `const` first property (as function calls by their name). Keywords the output could
break (`pattern`, lengths, ranges, `$ref`, ...) are refused, not ignored; descriptive ones
(`title`, `description`, `required`, `additionalProperties`, ...) are read past.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidRequestError
from .guided import DIGITS, NUM_DONE, STRING_END, WS, number_start, number_step, string_step, ws_step

# Node kinds, and the recogniser's modes: a value of node `aux` (VALUE), an object's first key
# or next key (OBJ_FIRST, KEY), inside a key's literal (KEY_LIT), its colon (COLON), an array's
# first item (ARR_FIRST), after a value in the innermost container (AFTER), a free string (STR:
# aux its `guided.string_step` state), one of a set of literals (LITS: aux (node, bytes so far)),
# a number (NUM: aux (number state, integer only)). A state is (mode, aux, stack, ws); the stack holds
# (node, index) frames: the object's current key, or the array's items so far.
OBJ, ARR, STRING, NUMBER, LITERALS, UNION, TAGGED = range(7)
VALUE, OBJ_FIRST, KEY, KEY_LIT, COLON, ARR_FIRST, AFTER, STR, LITS, NUM, DONE = range(11)
MAX_NODES = 1000
REFUSED = (
    "$ref", "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "allOf", "not", "if", "patternProperties", "minProperties", "maxProperties", "uniqueItems",
    "prefixItems", "contains",
)  # fmt: skip


class SchemaGrammar:
    """The recogniser for one schema (compiled once; its states refer to nodes by index)."""

    def __init__(self, schema: Any):
        if not isinstance(schema, dict):
            raise InvalidRequestError("a JSON schema must be an object")
        self.nodes: list[tuple] = []
        self.root = self._compile(schema, "schema")
        self.key = ("schema", json.dumps(schema, sort_keys=True))

    # -- compiling ---------------------------------------------------------------------------------
    def _add(self, node: tuple) -> int:
        if len(self.nodes) >= MAX_NODES:
            raise InvalidRequestError(f"the JSON schema is too large (over {MAX_NODES} parts)")
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _compile(self, sch: Any, where: str) -> int:
        if not isinstance(sch, dict):
            raise InvalidRequestError(f"{where} must be a JSON schema object")
        for word in REFUSED:
            if word in sch:
                raise InvalidRequestError(f"{where}: `{word}` is not supported in JSON schemas here")
        if "const" in sch or "enum" in sch:
            options = [sch["const"]] if "const" in sch else sch["enum"]
            if not isinstance(options, list) or not options:
                raise InvalidRequestError(f"{where}: enum must be a non-empty list")
            if any(isinstance(o, dict | list) for o in options):
                raise InvalidRequestError(f"{where}: enum and const take scalars only")
            return self._add((LITERALS, tuple(json.dumps(o, ensure_ascii=False).encode() for o in options)))
        branches = sch.get("anyOf", sch.get("oneOf"))
        kind = sch.get("type", "object" if "properties" in sch else None)
        if isinstance(kind, list):
            branches = [{**sch, "type": k} for k in kind]
        if branches is not None:
            if not isinstance(branches, list) or not branches:
                raise InvalidRequestError(f"{where}: anyOf / oneOf / type must list at least one schema")
            ids = tuple(self._compile(b, f"{where}.anyOf[{i}]") for i, b in enumerate(branches))
            tagged = self._tagged(ids)
            if tagged is not None:
                return tagged
            for b in range(256):  # each first byte picks at most one branch
                if sum(self._value(i, b, ()) is not None for i in ids) > 1:
                    raise InvalidRequestError(f"{where}: its alternatives can begin alike ({chr(b)!r})")
            return self._add((UNION, ids))
        if kind == "object":
            props = sch.get("properties")
            if not isinstance(props, dict):
                raise InvalidRequestError(f"{where}: an object schema needs `properties`")
            keys = tuple(json.dumps(k, ensure_ascii=False).encode() for k in props)
            values = tuple(self._compile(v, f"{where}.{k}") for k, v in props.items())
            return self._add((OBJ, keys, values))
        if kind == "array":
            lo, hi = sch.get("minItems", 0), sch.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise InvalidRequestError(f"{where}: minItems/maxItems must be counts, min <= max")
            if "items" not in sch:
                raise InvalidRequestError(f"{where}: an array schema needs `items`")
            return self._add((ARR, self._compile(sch["items"], f"{where}[]"), lo, hi))
        if kind == "string":
            return self._add((STRING,))
        if kind in ("number", "integer"):
            return self._add((NUMBER, kind == "integer"))
        if kind == "boolean":
            return self._add((LITERALS, (b"true", b"false")))
        if kind == "null":
            return self._add((LITERALS, (b"null",)))
        raise InvalidRequestError(f"{where}: type {kind!r} is not supported (a schema for any value is not)")

    def _tagged(self, ids: tuple[int, ...]) -> int | None:
        """Objects told apart by their first property, one `const` (or one-value `enum`) each, as
        function calls are by their name: a node that reads the tag, then goes on as its object."""
        tags, key = [], None
        for node in ids:
            n = self.nodes[node]
            if n[0] != OBJ or not n[1] or (key is not None and n[1][0] != key):
                return None
            first = self.nodes[n[2][0]]
            if first[0] != LITERALS or len(first[1]) != 1 or first[1][0] in tags:
                return None
            key = n[1][0]
            tags.append(first[1][0])
        tag_node = self._add((LITERALS, tuple(tags)))
        return self._add((TAGGED, (key,), (tag_node,), tuple(tags), ids))

    # -- recognising -------------------------------------------------------------------------------
    def start(self) -> tuple:
        return (VALUE, self.root, (), 0)

    def _after(self, stack: tuple) -> tuple:
        return (AFTER, None, stack, 0) if stack else (DONE, None, (), 0)

    def _value(self, node: int, b: int, stack: tuple) -> tuple | None:
        """The state after byte `b` starts a value of `node`."""
        n = self.nodes[node]
        kind = n[0]
        if kind in (OBJ, TAGGED):
            return (OBJ_FIRST, None, stack + ((node, 0),), 0) if b == 0x7B else None
        if kind == ARR:
            return (ARR_FIRST, None, stack + ((node, 0),), 0) if b == 0x5B else None
        if kind == STRING:
            return (STR, 0, stack, 0) if b == 0x22 else None
        if kind == NUMBER:
            return (NUM, (number_start(b), n[1]), stack, 0) if b == 0x2D or b in DIGITS else None
        if kind == LITERALS:
            return self._literal(node, b"", b, stack)
        for branch in n[1]:
            s = self._value(branch, b, stack)
            if s is not None:
                return s
        return None

    def _literal(self, node: int, sofar: bytes, b: int, stack: tuple) -> tuple | None:
        options, now = self.nodes[node][1], sofar + bytes([b])
        if any(o.startswith(now) for o in options):
            if now in options and not any(len(o) > len(now) and o.startswith(now) for o in options):
                return self._after_literal(stack, now)  # complete, and nothing longer could follow
            return (LITS, (node, now), stack, 0)
        return self.step(self._after_literal(stack, sofar), b) if sofar in options else None

    def _after_literal(self, stack: tuple, value: bytes) -> tuple:
        """After a literal; a tagged object's tag picks the object it goes on as."""
        if stack and self.nodes[stack[-1][0]][0] == TAGGED:
            n = self.nodes[stack[-1][0]]
            return (AFTER, None, stack[:-1] + ((n[4][n[3].index(value)], 0),), 0)
        return self._after(stack)

    def step(self, s: tuple, b: int) -> tuple | None:
        mode, aux, stack, ws = s
        if mode == STR:
            nxt = string_step(aux, b)
            if nxt == STRING_END:
                return self._after(stack)
            return None if nxt is None else (STR, nxt, stack, 0)
        if mode == KEY_LIT:
            if b != aux[0]:
                return None
            return (KEY_LIT, aux[1:], stack, 0) if len(aux) > 1 else (COLON, None, stack, 0)
        if mode == LITS:
            return self._literal(aux[0], aux[1], b, stack)
        if mode == NUM:
            num, integer = aux
            nxt = None if integer and b in b".eE" else number_step(num, b)
            if nxt is not None:
                return (NUM, (nxt, integer), stack, 0)
            return self.step(self._after(stack), b) if num[0] in NUM_DONE else None
        if mode == DONE:
            return None
        if b in WS:
            n = ws_step(ws, b)
            return None if n is None else (mode, aux, stack, n)
        if mode == VALUE:
            return self._value(aux, b, stack)
        node, i = stack[-1]
        n = self.nodes[node]
        if mode in (OBJ_FIRST, KEY):
            if mode == OBJ_FIRST and not n[1]:
                return self._after(stack[:-1]) if b == 0x7D else None
            return (KEY_LIT, n[1][i][1:], stack, 0) if b == 0x22 else None
        if mode == COLON:
            return (VALUE, n[2][i], stack, 0) if b == 0x3A else None
        if mode == ARR_FIRST:
            if b == 0x5D:
                return self._after(stack[:-1]) if n[2] == 0 else None
            return None if n[3] == 0 else self._value(n[1], b, stack[:-1] + ((node, 1),))
        # AFTER a value in the innermost container
        if n[0] == OBJ:
            if i + 1 < len(n[1]):
                return (KEY, None, stack[:-1] + ((node, i + 1),), 0) if b == 0x2C else None
            return self._after(stack[:-1]) if b == 0x7D else None
        if b == 0x2C and (n[3] is None or i < n[3]):
            return (VALUE, n[1], stack[:-1] + ((node, i + 1),), 0)
        return self._after(stack[:-1]) if b == 0x5D and i >= n[2] else None

    def done(self, s: tuple) -> bool:
        """Complete: the value has ended, or a top-level number or literal could end here."""
        mode, aux, stack, _ = s
        if mode == DONE:
            return True
        if stack:
            return False
        return (mode == NUM and aux[0][0] in NUM_DONE) or (mode == LITS and aux[1] in self.nodes[aux[0]][1])

    @staticmethod
    def in_string(s: tuple) -> bool:
        return s[0] == STR and s[1] == 0

    def signature(self, s: tuple, closers: int) -> tuple:
        """The state, with an array's count cut to what its limits tell apart."""
        mode, aux, stack, ws = s
        frames = []
        for node, i in stack:
            n = self.nodes[node]
            frames.append((node, min(i, n[2]) if n[0] == ARR and n[3] is None else i))
        return (mode, aux, tuple(frames), ws)
