"""Typed errors. Each carries one actionable line; the CLI prints it and exits non-zero."""


class AheadlmError(Exception):
    """Base class for every error aheadlm raises on purpose."""


class ModelNotFoundError(AheadlmError):
    """A model name or path that resolves to nothing."""


class WeightsError(AheadlmError):
    """A weight file that is truncated, corrupt or does not match its config."""


class UnsupportedModelError(AheadlmError):
    """An architecture, tensor type or option the engine does not implement."""


class ContextLengthError(AheadlmError):
    """A prompt (plus the tokens asked for) that does not fit the context."""


class DrafterMismatchError(AheadlmError):
    """A drafter that was trained for a different target model."""


class InvalidRequestError(AheadlmError):
    """Out-of-range sampling values or other malformed generation arguments."""
