"""Request schemas (OpenAI and Ollama) with strict validation, and error bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from ..errors import InvalidRequestError
from ..sampling import MAX_TOP_LOGPROBS
from ..schema import SchemaGrammar
from .tools import call_schema


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


Number = float | int
Stop = str | list[str] | None


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)

    @field_validator("stop", mode="before", check_fields=False)
    @classmethod
    def _stop(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) <= 16:
            return v
        raise ValueError("stop must be a string or a list of at most 16 strings")


def texts_or_ids(v: str | list) -> list[str | list[int]]:
    """OpenAI's one-or-many input (a string, token ids, or a list of either) as a list of them."""
    return [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else list(v)


MAX_CHOICES = 16
"""Choices (`n`) one request may ask for; each decodes as a request of its own."""
MAX_PROMPTS = 64
"""Prompts times choices one /v1/completions request may ask for."""


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


# Fields that would change the answer but that this server does not implement, with the values
# that mean "off" (clients often send those): anything else is a 400, not a silent wrong answer.
UNSUPPORTED_OPENAI = {
    "functions": (None, []),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
UNSUPPORTED_OLLAMA = {"images": (None, []), "tools": (None, []), "template": (None, ""), "context": (None, [])}


def refuse_unsupported(extra: dict[str, Any] | None, table: dict[str, tuple]) -> None:
    for name, off in table.items():
        if name in (extra or {}) and not any(extra[name] == o and type(extra[name]) is type(o) for o in off):
            raise ValueError(f"{name} is not supported by this server")


def _check_schema(schema: dict) -> None:
    try:
        SchemaGrammar(schema)
    except InvalidRequestError as e:
        raise ValueError(f"JSON schema: {e}") from None


class SamplingFields(_Base):
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=0)
    min_p: Number | None = Field(default=None, ge=0, le=1)
    seed: StrictInt | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    repetition_penalty: Number | None = Field(default=None, gt=0, le=10)
    """vLLM's extra field (llama.cpp style); the engine implements it."""
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Number] | None = None
    """OpenAI's shape: token ids as strings -> a value in [-100, 100] added to the logit."""
    response_format: dict[str, Any] | None = None
    """`{"type": "text"}`, `{"type": "json_object"}` (JSON mode) or `{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}` (output following the schema)."""

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        kind = None if v is None else v.get("type")
        if v is not None and kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("response_format.json_schema needs a `schema` object")
            _check_schema(spec["schema"])
        return v

    def json_format(self) -> bool | dict:
        """False (free text), True (any JSON object) or the schema the output must follow."""
        kind = (self.response_format or {}).get("type")
        return self.response_format["json_schema"]["schema"] if kind == "json_schema" else kind == "json_object"

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return None
        for tok, b in v.items():
            if not (tok.isascii() and tok.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {tok!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {tok}")
        return {int(tok): float(b) for tok, b in v.items()}

    @model_validator(mode="after")
    def _supported(self):
        refuse_unsupported(self.model_extra, UNSUPPORTED_OPENAI)
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept, so that Ollama's `images` can be refused

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        # the engine reads text only: dropping an image part would answer a question never asked
        if isinstance(v, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in v):
            raise ValueError("only text content parts are supported (this server runs a text model)")
        if isinstance(v, list) and any(not isinstance(p.get("text"), str) for p in v):
            raise ValueError("a text content part needs a string `text`")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict) and p.get("type") == "text")
        return self.content or ""


class _TopLogprobs(_Base):
    """Chat-style log-probabilities (OpenAI chat, Ollama): `logprobs` on or off, `top_logprobs`
    alternatives per token, which need `logprobs` (as OpenAI requires)."""

    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def logprob_count(self) -> int | None:
        """None (no log-probabilities) or the number of alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(_TopLogprobs, SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    """Read past: an answer makes one call."""

    @model_validator(mode="after")
    def _tools(self):
        if not self.tools:
            if self.tool_choice not in (None, "none", "auto"):
                raise ValueError("tool_choice needs tools")
            return self
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct names")
        choice = self.tool_choice
        if choice in (None, "auto"):
            raise ValueError(
                'tool_choice "auto" (the default with tools) is not supported: this server cannot tell a '
                'model\'s calls from its text; send tool_choice "required" or {"type": "function", '
                '"function": {"name": ...}}'
            )
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in names:
                raise ValueError(
                    'tool_choice must be "none", "required" or {"type": "function", "function": {"name": <a tool>}}'
                )
        if choice != "none" and self.json_format():
            raise ValueError("tools and a JSON response_format cannot be used together")
        functions = self.functions()
        if functions:
            _check_schema(call_schema(functions))
        return self

    def functions(self) -> list[dict] | None:
        """The functions the answer must call one of (OpenAI function objects), or None for text."""
        if not self.tools or self.tool_choice == "none":
            return None
        named = self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None
        return [t.function.model_dump(exclude_none=True) for t in self.tools if named in (None, t.function.name)]


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """The legacy API's form: the number of alternatives per token (the chosen token is added)."""
    echo: StrictBool = False
    """Return the prompt before the completion, and with `logprobs` the prompt tokens' too."""
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    """0 only with `echo`: score the prompt, generate nothing (as evaluation harnesses ask)."""

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(x, list) and not x for x in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _limits(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo (it scores the prompt and generates nothing)")
        if len(self.prompts()) * self.n > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts times n per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids."""
        return texts_or_ids(self.prompt)


class OllamaOptions(_Base):
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=0)
    min_p: Number | None = Field(default=None, ge=0, le=1)
    repeat_penalty: Number | None = Field(default=None, gt=0, le=10)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    seed: StrictInt | None = None
    num_predict: StrictInt | None = Field(default=None)
    stop: Stop = None


class _OllamaRequest(_Base):
    format: str | dict[str, Any] | None = None
    """`"json"` (JSON mode), a JSON schema the output must follow, or nothing."""

    @field_validator("format")
    @classmethod
    def _format(cls, v):
        if isinstance(v, dict):
            _check_schema(v)
        elif v not in (None, "", "json"):
            raise ValueError('format must be "json" or a JSON schema')
        return v

    def json_format(self) -> bool | dict:
        return self.format if isinstance(self.format, dict) else self.format == "json"

    @model_validator(mode="after")
    def _supported(self):
        refuse_unsupported(self.model_extra, UNSUPPORTED_OLLAMA)
        for m in getattr(self, "messages", None) or []:
            refuse_unsupported(m.model_extra, UNSUPPORTED_OLLAMA)  # images ride on chat messages
        return self


class OllamaGenerate(_TopLogprobs, _OllamaRequest):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: StrictBool = False
    stream: StrictBool = True
    options: OllamaOptions | None = None


class OllamaChat(_TopLogprobs, _OllamaRequest):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = True
    options: OllamaOptions | None = None


class OllamaShow(_Base):
    model: str | None = None
    name: str | None = None


def check_max_tokens(value: int | None, limit: int, default: int) -> int:
    if value is None:
        return default
    if value > limit:
        raise InvalidRequestError(f"max_tokens {value} exceeds the context size {limit}")
    return value


class TokenizeRequest(_Base):
    """vLLM's `/tokenize` (`prompt` or `messages`, `add_special_tokens`, default on) or llama.cpp
    server's (`content`, `add_special`, default off; `with_pieces`)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    content: str | None = None
    add_special_tokens: StrictBool = True
    add_special: StrictBool = False
    with_pieces: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("prompt", "messages", "content") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, messages (vLLM) or content (llama.cpp)")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[StrictInt]


MAX_EMBED_INPUTS = 256
"""Texts one embeddings request may hold."""


class EmbeddingRequest(_Base):
    """OpenAI's `/v1/embeddings`."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        items = texts_or_ids(v)
        if not items or len(items) > MAX_EMBED_INPUTS:
            raise ValueError(f"input must hold 1 to {MAX_EMBED_INPUTS} texts")
        if any(len(x) == 0 for x in items):
            raise ValueError("input must not hold an empty text")
        return v

    def inputs(self) -> list[str | list[int]]:
        return texts_or_ids(self.input)


class OllamaEmbed(_Base):
    """Ollama's `/api/embed` (`input`) and its older `/api/embeddings` (`prompt`)."""

    model: str
    input: str | list[str] | None = None
    prompt: str | None = None
    truncate: StrictBool = True

    @model_validator(mode="after")
    def _texts(self):
        texts = self.texts()
        if not texts or len(texts) > MAX_EMBED_INPUTS or any(not t for t in texts):
            raise ValueError(f"give 1 to {MAX_EMBED_INPUTS} non-empty texts (input, or prompt)")
        return self

    def texts(self) -> list[str]:
        if self.input is not None:
            return [self.input] if isinstance(self.input, str) else list(self.input)
        return [] if self.prompt is None else [self.prompt]
