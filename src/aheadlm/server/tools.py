"""Function calling on `/v1/chat/completions` (`tools` with `tool_choice` "required" or a named
function): the functions are described to the model in a system message, its answer is held to
`{"name": ..., "arguments": {...}}` by a JSON schema (one object per function, told apart by
the name), and the answer comes back as `tool_calls`.

`tool_choice: "auto"` (the default when tools are sent) is refused: deciding between text and a
call needs a model-specific call format that neither registered model has. Earlier calls and
their results in the conversation are written as text any chat template reads.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

CALL_FORMAT = 'To call one, answer with only a JSON object: {"name": <function name>, "arguments": <its arguments>}.'


def call_schema(functions: list[dict]) -> dict:
    """The JSON schema of one call to any of `functions` (OpenAI function objects)."""

    def one(f: dict) -> dict:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params}}

    return one(functions[0]) if len(functions) == 1 else {"anyOf": [one(f) for f in functions]}


def system_prompt(functions: list[dict]) -> str:
    listed = [{k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None} for f in functions]
    return "You can call these functions:\n" + json.dumps(listed, ensure_ascii=False) + "\n" + CALL_FORMAT


def conversation(messages: list[Any], functions: list[dict] | None) -> list[dict]:
    """Messages as `{role, content}` text for the chat template: earlier calls as the JSON the
    model wrote, results as user turns, and (with `functions`) their description in the system
    message."""
    out = []
    for m in messages:
        role, text = ("system" if m.role == "developer" else m.role), m.text()
        calls = (m.model_extra or {}).get("tool_calls") if role == "assistant" else None
        if calls:
            text = "\n".join(_call_text(c) for c in calls)
        if role == "tool":
            role, text = "user", f"Function result: {text}"
        out.append({"role": role, "content": text})
    if functions:
        prompt = system_prompt(functions)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _call_text(call: Any) -> str:
    f = call.get("function", {}) if isinstance(call, dict) else {}
    args = f.get("arguments", "{}")
    with contextlib.suppress(ValueError):  # else shown as the string it was
        args = json.loads(args) if isinstance(args, str) else args
    return json.dumps({"name": f.get("name", ""), "arguments": args}, ensure_ascii=False)


def tool_calls(text: str) -> list[dict]:
    """OpenAI's `tool_calls` for a finished answer held to `call_schema`."""
    call = json.loads(text)
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": arguments},
        }
    ]
