"""JSON schemas in JSON mode (`schema.py`): instances of a schema complete, whatever the
recogniser completes parses and conforms, unsupported schemas are refused clearly, and decoding
under a schema is lossless and conforms."""

import json
import random

import pytest
import torch

from aheadlm.engine import Engine
from aheadlm.errors import InvalidRequestError
from aheadlm.guided import JsonGuide, advance
from aheadlm.proposers import NgramProposer
from aheadlm.sampling import SamplingParams
from aheadlm.schema import SchemaGrammar
from aheadlm.speculative import SpecConfig

from helpers import default_and_plain, ours_from_hf, tiny_hf, toy_table

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": "number", "description": "metres"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", 3, None, True]}, "maxItems": 3},
        "address": {"type": ["object", "null"], "properties": {"city": {"type": "string"}, "zip": {"const": "é1"}}},
        "tags": {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}, "minItems": 1},
        "empty": {"type": "object", "properties": {}},
    },
    "required": ["name"],
}
SCHEMAS = [
    PERSON,
    {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
    {"type": "integer"},
    {"enum": [1, 12, 123]},
    {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    {  # objects told apart by a const first property, as function calls by their name
        "anyOf": [
            {"type": "object", "properties": {"name": {"const": "add"}, "arguments": PERSON["properties"]["address"]}},
            {
                "type": "object",
                "properties": {"name": {"const": "ad"}, "arguments": {"type": "array", "items": {"type": "null"}}},
            },
            {"type": "object", "properties": {"name": {"enum": [7]}}},
        ]
    },
]


def complete(grammar, text: bytes) -> bool:
    s = advance(grammar.start(), text, grammar.step)
    return s is not None and grammar.done(s)


def instance(rng, sch):
    """A random value of `sch` (properties in the schema's order)."""
    if "const" in sch:
        return sch["const"]
    if "enum" in sch:
        return rng.choice(sch["enum"])
    if "anyOf" in sch:
        return instance(rng, rng.choice(sch["anyOf"]))
    kind = sch["type"]
    if isinstance(kind, list):
        return instance(rng, {**sch, "type": rng.choice(kind)})
    if kind == "object":
        return {k: instance(rng, v) for k, v in sch["properties"].items()}
    if kind == "array":
        hi = sch.get("maxItems", 4)
        return [instance(rng, sch["items"]) for _ in range(rng.randint(sch.get("minItems", 0), hi))]
    if kind == "string":
        return "".join(rng.choice('ab "\\\n/é😀') for _ in range(rng.randrange(5)))
    if kind == "integer":
        return rng.choice([0, -3, 42, 10**12])
    if kind == "number":
        return rng.choice([0, -3, 0.25, -1.5e-7, 3e21])
    return {"boolean": rng.random() < 0.5, "null": None}[kind]


def conforms(value, sch) -> bool:
    if "const" in sch or "enum" in sch:
        options = [sch["const"]] if "const" in sch else sch["enum"]
        return any(type(value) is type(o) and value == o for o in options)
    if "anyOf" in sch:
        return any(conforms(value, b) for b in sch["anyOf"])
    kind = sch["type"]
    if isinstance(kind, list):
        return any(conforms(value, {**sch, "type": k}) for k in kind)
    if kind == "object":
        props = sch["properties"]
        return (
            isinstance(value, dict) and list(value) == list(props) and all(conforms(value[k], props[k]) for k in props)
        )
    if kind == "array":
        n = len(value) if isinstance(value, list) else -1
        return sch.get("minItems", 0) <= n <= sch.get("maxItems", n) and all(conforms(v, sch["items"]) for v in value)
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    return checks[kind](value)


def dumps(rng, value) -> str:
    indent = rng.choice([None, 0, 2])
    seps = None if indent is not None else rng.choice([None, (",", ":"), (", ", ": ")])
    return json.dumps(value, indent=indent, separators=seps, ensure_ascii=False)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_instances_complete_and_what_completes_conforms(index):
    sch = SCHEMAS[index]
    grammar = SchemaGrammar(sch)
    rng = random.Random(index)
    alphabet = '{}[]",:0123456789.-+eE \ntrufalsnbcd\\'
    accepted = 0
    for _ in range(1500):
        value = instance(rng, sch)
        text = dumps(rng, value)
        assert complete(grammar, text.encode()), text
        chars = list(text)
        for _ in range(rng.randrange(1, 3)):
            i = rng.randrange(len(chars) + 1)
            if rng.random() < 0.5 and i < len(chars):
                del chars[i]
            else:
                chars.insert(i, rng.choice(alphabet))
        edited = "".join(chars)
        if complete(grammar, edited.encode()):
            accepted += 1
            assert conforms(json.loads(edited), sch), edited
    assert accepted > 20


def test_rejections():
    g = SchemaGrammar(PERSON)
    for text in [
        '{"age": 1, "name": "x"}',  # out of the schema's order
        '{"name": "x"}',  # properties missing
        '{"name": 1}',
    ]:
        assert not complete(g, text.encode())
    ints = SchemaGrammar({"type": "integer"})
    assert complete(ints, b"-12") and not complete(ints, b"1.5") and not complete(ints, b"01")
    arr = SchemaGrammar(SCHEMAS[1])
    assert not complete(arr, b"[1]") and not complete(arr, b"[1,2,3,4,5]") and complete(arr, b"[1, 2.5]")
    enum = SchemaGrammar({"enum": [1, 12, 123]})
    assert complete(enum, b"1") and complete(enum, b"12") and not complete(enum, b"13")


@pytest.mark.parametrize(
    "sch",
    [
        [1],
        {},
        {"type": "string", "pattern": "^a$"},
        {"$ref": "#/$defs/x"},
        {"type": "object"},
        {"type": "array"},
        {"type": ["integer", "number"]},
        {"enum": []},
        {"enum": [{"a": 1}]},
        {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1},
        {"type": "tuple"},
        {"anyOf": [{"properties": {"a": {"const": 1}}}, {"properties": {"a": {"const": 1}, "b": {"type": "null"}}}]},
        {"anyOf": [{"properties": {"a": {"const": 1}}}, {"properties": {"b": {"const": 2}}}]},
        {"anyOf": [{"properties": {"a": {"type": "string"}}}, {"properties": {"a": {"type": "integer"}}}]},
    ],
)
def test_unsupported_schemas_are_refused(sch):
    with pytest.raises(InvalidRequestError):
        SchemaGrammar(sch)


def test_speculative_decoding_under_a_schema_equals_plain_and_conforms():
    target = ours_from_hf(tiny_hf("llama", seed=7))
    table = toy_table()
    sch = {
        "type": "object",
        "properties": {
            "a": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
            "b": {"enum": [True, None]},
        },
    }
    finished = 0
    for prompt in ([5, 9, 14, 3], [100, 101, 102, 100, 101, 102], [2, 12, 13]):
        runs = []
        for engine in (Engine(target), Engine(target, proposer=NgramProposer(), spec=SpecConfig(4))):
            guide = JsonGuide(table, (0,), SchemaGrammar(sch))
            steps = list(engine.generate(prompt, SamplingParams(), max_tokens=60, stop_ids=(0,), guide=guide))
            runs.append(([t for s in steps for t in s.token_ids], steps[-1].finish_reason))
        assert runs[0] == runs[1]
        toks, reason = runs[0]
        if reason == "stop":
            finished += 1
            assert conforms(json.loads(b"".join(table.bytes[t] for t in toks)), sch)
    assert finished > 0


def test_a_top_level_number_may_end_or_go_on():
    table = toy_table()
    guide = JsonGuide(table, (0,), SchemaGrammar({"type": "integer"}))
    one = table.bytes.index(b"1")
    allowed = guide.mask(torch.zeros(1, len(table.bytes)), [one])[0].isfinite()
    assert allowed[0] and allowed[table.bytes.index(b"23")] and not allowed[table.bytes.index(b".")]


RECIPE = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "minutes": {"type": "integer"},
        "vegetarian": {"type": "boolean"},
        "steps": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
    },
}


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_models_follow_a_schema(name):
    """Default speculative decoding gives plain decoding's answer under the schema, and a finished
    answer conforms to it."""
    spec, plain = default_and_plain(name)
    msgs = [{"role": "user", "content": "Give me a short recipe for pancakes."}]
    want = plain.chat(msgs, max_tokens=160, json_schema=RECIPE)
    got = spec.chat(msgs, max_tokens=160, json_schema=RECIPE)
    assert got.token_ids == want.token_ids
    if want.finish_reason == "stop":
        assert conforms(json.loads(want.text), RECIPE)
    else:
        assert want.text.lstrip().startswith('{"title"') or want.text.lstrip().startswith("{\n")
