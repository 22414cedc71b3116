"""JSON mode (`guided.py`): the recogniser agrees with Python's json module, a vocabulary's cached
masks equal checking every token, and constrained speculative decoding equals constrained plain
decoding (greedy and sampled) and emits JSON."""

import json
import random

import pytest
import torch

from aheadlm.drafter import DrafterConfig, MTPDrafter
from aheadlm.engine import Engine
from aheadlm.guided import DONE, MAX_DIGITS, MAX_INDENT, GuideTable, JsonGuide, advance, start
from aheadlm.proposers import MTPProposer, NgramProposer
from aheadlm.sampling import SamplingParams
from aheadlm.speculative import SpecConfig

from helpers import default_and_plain, ours_from_hf, tiny_hf, toy_table


def complete(text: str) -> bool:
    s = advance(start(), text.encode())
    return s is not None and s[0] == DONE


VALID = [
    "{}",
    '\n  {"a": 1}',
    '{"a":[1,2.5,-0.0,1e5,2E-3,0.5e+7,true,false,null,{"b":"c\\"d\\\\e\\/\\u00e9\\n"}],"":""}',
    '{"x": {"y": [[], {}]}}',
    '{"é": "ünï 🚀"}',
]
INVALID = [
    "[]",
    '"a"',
    "1",
    '{"a":01}',
    '{"a":1,}',
    "{'a':1}",
    '{"a" 1}',
    '{"a":tru}',
    '{"a":"\n"}',
    '{"a":1}}',
    '{"a":-}',
    '{"a":1.}',
    '{"a":.5}',
    '{"a":"\\x"}',
    '{"a":"\\u12g4"}',
    "{a:1}",
    '{"a":[1,]}',
    '{"a":NaN}',
    '{"a":1} ',  # nothing may follow the object (a stop token must)
    "{\n" + " " * (MAX_INDENT + 1) + "}",
    '{"a":  1}',  # whitespace is one space, or a newline and an indent
    '{\t"a": 1}',
    '{"a": ' + "1" * (MAX_DIGITS + 1) + "}",
    '{"a": 1,\n\n"b": 2}',  # one newline per whitespace run, at its start
    '{"a": 1, \n"b": 2}',
    "{\r\n}",
]


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_complete(text):
    assert complete(text)
    assert all(advance(start(), text.encode()[:i]) is not None for i in range(len(text.encode())))


@pytest.mark.parametrize("text", INVALID)
def test_invalid_texts_do_not(text):
    assert not complete(text)


def random_text(rng):
    return "".join(rng.choice('ab "\\\n\t/é€😀\x01') for _ in range(rng.randrange(6)))


def random_value(rng, depth=0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -7, 12345, 0.5, -2.5e-8, 1e21])
    if kind in (2, 3):
        return random_text(rng)
    if kind in (4, 5):
        return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_object(rng):
    obj = {f"k{i}": random_value(rng, 1) for i in range(rng.randrange(1, 4))}
    indent = rng.choice([None, 0, 1, 2])
    seps = None if indent is not None else rng.choice([None, (",", ":"), (", ", ": ")])  # no ", \n" runs
    return json.dumps(obj, indent=indent, separators=seps, ensure_ascii=rng.random() < 0.5)


def whitespace_ok(text: str) -> bool:
    """JSON mode's limits outside strings: whitespace a single space or a newline and at most
    MAX_INDENT spaces and tabs; at most MAX_DIGITS digits in a row."""
    in_string = escaped = False
    run = digits = ""
    for c in text + "x":
        if in_string:
            in_string = escaped or c != '"'
            escaped = not escaped and c == "\\"
            continue
        digits = digits + c if c.isdigit() else ""
        if len(digits) > MAX_DIGITS:
            return False
        if c in " \t\n\r":
            run += c
            continue
        if run and run != " " and not (run[0] == "\n" and set(run[1:]) <= set(" \t") and len(run) <= MAX_INDENT + 1):
            return False
        run, in_string = "", c == '"'
    return True


def python_accepts(text: str) -> bool:
    """Python's parser takes it, as one object with nothing after it, in JSON mode's whitespace."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and text == text.rstrip(" \t\n\r") and whitespace_ok(text)


def test_recogniser_agrees_with_python_json():
    """Objects json.dumps writes complete; random edits of them complete exactly when Python's
    parser takes them (an object, nothing after it)."""
    rng = random.Random(0)
    alphabet = '{}[]",:0123456789.-+eE \ntrufalsn\\ab'
    agreed = 0
    for _ in range(3000):
        text = random_object(rng)
        assert complete(text), text
        chars = list(text)
        for _ in range(rng.randrange(1, 3)):
            i = rng.randrange(len(chars) + 1)
            op = rng.randrange(3)
            if op == 0 and i < len(chars):
                del chars[i]
            elif op == 1 and i < len(chars):
                chars[i] = rng.choice(alphabet)
            else:
                chars.insert(i, rng.choice(alphabet))
        edited = "".join(chars)
        assert complete(edited) == python_accepts(edited), edited
        agreed += python_accepts(edited)
    assert agreed > 100  # the edits exercise both answers


def test_cached_masks_equal_checking_every_token():
    """Along random valid objects (nested deeper than any token closes), the table's mask equals
    advancing the state through each token's bytes."""
    table = toy_table()
    rng = random.Random(1)
    texts = [random_object(rng).encode() for _ in range(40)]
    texts.append(b'{"a":[[[[{"b":[[{"c":[1e-5,"\\u00e9"]}]]}]]]],"d":tru')
    for text in texts:
        for cut in sorted(rng.sample(range(len(text)), min(12, len(text)))):
            s = advance(start(), text[:cut])
            want = [not table.special[i] and bool(t) and advance(s, t) is not None for i, t in enumerate(table.bytes)]
            assert table.allowed(s).tolist() == want, (text[:cut], s)
    assert len(table.masks) > 20


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def target(request):
    return ours_from_hf(tiny_hf(request.param, seed=7))


def run(engine, prompt, params, table):
    toks = []
    for step in engine.generate(prompt, params, max_tokens=40, stop_ids=(0,), guide=JsonGuide(table, (0,))):
        toks += step.token_ids
        reason = step.finish_reason
    return toks, reason


def check_json(table, toks, reason):
    text = b"".join(table.bytes[t] for t in toks)
    assert advance(start(), text) is not None  # every token kept the text JSON
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    return reason == "stop"


def test_speculative_json_mode_equals_plain_and_emits_json(target):
    """Greedy: the same tokens as plain decoding under the constraint (sampled runs are checked
    for their distribution in test_distribution.py); every run's text stays JSON."""
    table = toy_table()
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=48)
    drafter = MTPDrafter(cfg).init_weights(0.2, torch.Generator().manual_seed(0)).eval()
    finished = 0
    for prompt in ([5, 9, 14, 3], [100, 101, 102, 100, 101, 102], [2, 12, 13]):
        for params in (
            SamplingParams(),
            SamplingParams(temperature=1.0, seed=3),
            SamplingParams(temperature=0.7, seed=4),
        ):
            ref, reason = run(Engine(target), prompt, params, table)
            finished += check_json(table, ref, reason)
            for proposer in (NgramProposer(), MTPProposer(drafter)):
                got, reason = run(Engine(target, proposer=proposer, spec=SpecConfig(4)), prompt, params, table)
                finished += check_json(table, got, reason)
                assert got == ref or not params.greedy
    assert finished > 0


def test_a_vocabulary_that_cannot_go_on_ends_the_output():
    """No token finishes `null` after `nu` here: only the stop token is left, not an all -inf row."""
    table = GuideTable([b"<eos>", b"{", b'"a":', b"nu"], [True, False, False, False])
    out = JsonGuide(table, (0,)).mask(torch.zeros(1, 4), [1, 2, 3])
    assert out[0].isfinite().tolist() == [True, False, False, False]


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_models_json_mode(name):
    """Each model's default speculative decoding gives plain decoding's JSON-mode answer, and a
    finished answer parses as one object."""
    spec, plain = default_and_plain(name)
    prompts = ["A JSON object describing a city, with name, country and population:", "List three colors."]
    for prompt in prompts:
        want = plain.generate(prompt, max_tokens=64, json_mode=True)
        got = spec.generate(prompt, max_tokens=64, json_mode=True)
        assert got.token_ids == want.token_ids
        if want.finish_reason == "stop":
            assert isinstance(json.loads(want.text), dict)
        else:
            assert want.text.lstrip().startswith("{")
