"""Tokenizers: the `tokenizers` library at run time, transformers' converters once for GGUF files,
BOS/EOS rules, chat templates (Jinja, sandboxed) and streaming detokenization."""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, WeightsError

# Tokens that end an assistant turn in common chat formats; used as extra stop ids when present.
_END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<turn|>")

# Chat format for models without a template (Gemma 3 270M is a base model): plain completion.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_CHAT_STOP = ("\nUser:",)


class ChatTemplateError(InvalidRequestError, ValueError):
    """The chat template refused a conversation (`raise_exception`, e.g. roles that do not
    alternate). Also a ValueError, which callers that skip such conversations catch."""


class Tokenizer:
    """Encode/decode with explicit BOS handling and a chat template."""

    def __init__(
        self,
        backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        chat_template: str | None = None,
        extra_eos_ids: tuple[int, ...] = (),
        template_source: str | None = None,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.template_source = template_source  # the file named when the template is broken
        ids = [eos_id] if eos_id is not None else []
        for tok in _END_OF_TURN:
            tid = backend.token_to_id(tok)
            if tid is not None:
                ids.append(tid)
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(ids + list(extra_eos_ids)))
        self._template = None
        self._byte_level: bool | None = None  # read from the decoder on first `token_bytes`
        self._added: dict | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust tokenizer refuses lone surrogates (undecodable input bytes)
            raise InvalidRequestError(
                "the text is not valid UTF-8 (it holds undecodable bytes or lone surrogates)"
            ) from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text, its leading space included (for log-probabilities,
        where a token may hold part of a UTF-8 character). Special and added tokens read as written."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is None:
            self._byte_level = '"ByteLevel"' in self.backend.decoder.__getstate__().decode()
        if self._byte_level:  # GPT-2 style: each byte is stored as one printable character
            if token_id in self._added_ids():
                return piece.encode()
            table = _byte_level_table()
            return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece's byte fallback
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()

    def is_special(self, token_id: int) -> bool:
        """Whether `decode` leaves this token out of the text (BOS, EOS, turn markers)."""
        added = self._added_ids().get(token_id)
        return added is not None and added.special

    def _added_ids(self) -> dict:
        if self._added is None:
            self._added = self.backend.get_added_tokens_decoder()
        return self._added

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, using the model's template or the plain format."""
        from jinja2 import TemplateError

        template = self.compiled_template()
        special = {}
        for name, tid in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            special[name] = self.backend.id_to_token(tid) if tid is not None else ""
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
        except TemplateError as e:  # e.g. a variable the sandbox refuses, a filter on the wrong type
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None

    def compiled_template(self):
        """The Jinja template, compiled on first use; a broken one is the model's fault (WeightsError)."""
        if self._template is None:
            from jinja2 import TemplateSyntaxError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ChatTemplateError(f"chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.chat_template or PLAIN_CHAT_TEMPLATE)
            except TemplateSyntaxError as e:
                where = self.template_source or "the model's chat template"
                raise WeightsError(
                    f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message})"
                ) from None
        return self._template

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.render_chat(messages)
        # Templates that write BOS themselves must not get a second one.
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else None
        add_bos = self.add_bos and not (bos and text.startswith(bos))
        return self.encode(text, add_bos=add_bos)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        self.backend.save(str(d / "tokenizer.json"))
        cfg = {
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }
        (d / "aheadlm_tokenizer.json").write_text(json.dumps(cfg, indent=1))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer saved by `save`, or a Hugging Face model folder's tokenizer."""
        d = Path(directory)
        ours = d / "aheadlm_tokenizer.json"
        if ours.exists():
            cfg = _read_json(ours)
            return cls(_read_backend(d / "tokenizer.json"), **cfg)
        return _from_hf_folder(d)

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike) -> Tokenizer:
        """Convert a GGUF file's tokenizer with transformers' converters (slow: cache the result)."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        p = Path(gguf_path)
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except (ValueError, KeyError, OSError) as e:
            raise WeightsError(f"{p}: cannot build the tokenizer from GGUF metadata ({e})") from None
        return _from_hf_tokenizer(tok)


def _from_hf_tokenizer(tok) -> Tokenizer:
    backend = tok.backend_tokenizer
    add_bos = getattr(tok, "add_bos_token", None)
    if add_bos is None:
        add_bos = bool(tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id])
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return Tokenizer(
        backend,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        add_bos=bool(add_bos),
        chat_template=template,
    )


def _read_backend(path: Path):
    from tokenizers import Tokenizer as Backend

    try:
        return Backend.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for any unreadable or malformed file
        raise WeightsError(f"{path}: missing or unreadable ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data


def _from_hf_folder(d: Path) -> Tokenizer:
    tj = d / "tokenizer.json"
    cfg_path = d / "tokenizer_config.json"
    if not tj.exists():  # a folder with only a SentencePiece model: transformers converts it
        from transformers import AutoTokenizer

        try:
            return _from_hf_tokenizer(AutoTokenizer.from_pretrained(str(d)))
        except (ValueError, OSError) as e:
            # transformers' message spans lines; one line keeps the CLI's `error:` readable
            why = " ".join(str(e).split())
            raise WeightsError(f"{tj}: missing or unreadable (no such file, and transformers: {why})") from None
    backend = _read_backend(tj)
    cfg = _read_json(cfg_path) if cfg_path.exists() else {}

    def token_id(value):
        if isinstance(value, dict):
            value = value.get("content")
        return backend.token_to_id(value) if isinstance(value, str) else None

    bos_id, eos_id = token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token"))
    extra: list[int] = []
    gen = d / "generation_config.json"
    if gen.exists():
        g = _read_json(gen)
        e = g.get("eos_token_id")
        extra = [e] if isinstance(e, int) else list(e or [])
        if bos_id is None and isinstance(g.get("bos_token_id"), int):
            bos_id = g["bos_token_id"]
    if eos_id is None and extra:
        eos_id = extra[0]
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        with_special = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_special[:1] == [bos_id]
    template, source = cfg.get("chat_template"), cfg_path
    tpl_file = d / "chat_template.jinja"
    if template is None and tpl_file.exists():
        template, source = tpl_file.read_text(), tpl_file
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(add_bos),
        chat_template=template if isinstance(template, str) else None,
        extra_eos_ids=tuple(extra),
        template_source=str(source),
    )


@cache
def _byte_level_table() -> dict[str, int]:
    """Character -> byte of byte-level BPE (GPT-2): printable Latin-1 bytes stand for themselves,
    the other bytes for the characters from U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


class TextStream:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters or
    losing the leading space that SentencePiece decoders drop at the start of a slice."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, ids) -> str:
        self.ids.extend(ids)
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read])
        new_text = self.tok.decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read])
        new_text = self.tok.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]
