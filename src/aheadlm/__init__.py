"""aheadlm: fast local LLM inference with MTP drafters and lossless speculative decoding."""

from .api import LLM, Completion, load
from .engine import GenerationStats, Step
from .errors import (
    AheadlmError,
    ContextLengthError,
    DrafterMismatchError,
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightsError,
)
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "AheadlmError",
    "Completion",
    "ContextLengthError",
    "DrafterMismatchError",
    "GenerationStats",
    "InvalidRequestError",
    "ModelNotFoundError",
    "SamplingParams",
    "Step",
    "UnsupportedModelError",
    "WeightsError",
    "load",
]
