"""Read GGUF files: metadata, tensor names mapped to ours, dequantization through the `gguf` package."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig, from_gguf_metadata
from .errors import UnsupportedModelError, WeightsError

GGUF_MAGIC = b"GGUF"

# GGUF (llama.cpp) tensor names -> ours; `{i}` is the layer index.
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q",
    "attn_k": "attn.k",
    "attn_v": "attn.v",
    "attn_output": "attn.o",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate",
    "ffn_up": "mlp.up",
    "ffn_down": "mlp.down",
    "post_ffw_norm": "post_mlp_norm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def map_name(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name, or None for tensors we do not use."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation so that RoPE rotates halves (the HF layout)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """An opened GGUF file. Raises WeightsError on anything malformed."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGUFReader

        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise WeightsError(f"{self.path}: not a GGUF file (bad magic bytes)")
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, struct.error, OSError, TypeError) as e:
            raise WeightsError(f"{self.path}: corrupt or truncated GGUF file ({e})") from None
        self._check_complete()
        self.metadata = self._read_metadata()

    def _check_complete(self) -> None:
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            end = t.data_offset + t.n_bytes
            if end > size or t.data.nbytes != t.n_bytes:
                raise WeightsError(
                    f"{self.path}: truncated GGUF file (tensor {t.name} ends at byte {end}, "
                    f"file has {size}); download or assemble it again"
                )

    def _read_metadata(self) -> dict[str, Any]:
        md = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                md[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise WeightsError(f"{self.path}: unreadable metadata key {key} ({e})") from None
        return md

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def config(self) -> ModelConfig:
        try:
            return from_gguf_metadata(self.metadata, "output.weight" in self.tensor_names)
        except KeyError as e:
            raise WeightsError(f"{self.path}: GGUF metadata lacks {e}") from None

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (our name, float32 tensor) for every used tensor, dequantized."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        for t in self.reader.tensors:
            name = map_name(t.name)
            if name is None:
                continue
            try:
                if t.tensor_type in (Q.F32, Q.F16):
                    arr = np.asarray(t.data, dtype=np.float32).reshape(t.shape[::-1].tolist())
                else:
                    arr = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise UnsupportedModelError(
                    f"{self.path}: tensor type {t.tensor_type.name} ({t.name}) is not supported"
                ) from None
            if config.arch == "llama" and name.endswith(("attn.q.weight", "attn.q.bias")):
                arr = _unpermute(arr, config.num_heads)
            elif config.arch == "llama" and name.endswith(("attn.k.weight", "attn.k.bias")):
                arr = _unpermute(arr, config.num_kv_heads)
            yield name, torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))

    def num_tensors(self) -> int:
        return len(self.reader.tensors)

    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts
