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
from .packed import QTensor

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


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, n: int, width: int) -> np.ndarray:
    """Low then high nibbles of `qs` [n, groups * width // 2] -> [n, groups * width] uint8."""
    q = qs.reshape(n, -1, 1, width // 2) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _k_scales(scales: np.ndarray):
    """The 6-bit (scale, min) pairs of Q4_K/Q5_K super-blocks -> two [n, 8] uint8 arrays."""
    n = scales.shape[0]
    d, m, md = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1).reshape(n, 8)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1).reshape(n, 8)
    return sc, mn


SPLITTABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _split_blocks(name: str, blocks: np.ndarray):
    """Raw GGUF blocks [n, bytes] -> (q int8 [n, values], scale [n, subs], offset or None, sub-block
    size) with w = q * scale + offset reproducing the dequantizer bit for bit; None if unsupported."""
    n = blocks.shape[0]
    if name == "Q8_0":
        return blocks[:, 2:].view(np.int8), _f16(blocks[:, :2]), None, 32
    if name in ("Q4_0", "Q4_1"):
        head = 2 if name == "Q4_0" else 4
        q = _nibbles(blocks[:, head:], n, 32).astype(np.int8)
        if name == "Q4_0":
            return q - np.int8(8), _f16(blocks[:, :2]), None, 32
        return q, _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), 32
    if name in ("Q5_0", "Q5_1"):
        head = 2 if name == "Q5_0" else 4
        qh = blocks[:, head : head + 4].copy().view(np.uint32)
        qh = (qh >> np.arange(32, dtype=np.uint32)[None]) & np.uint32(1)
        q = (_nibbles(blocks[:, head + 4 :], n, 32) | (qh.astype(np.uint8) << np.uint8(4))).astype(np.int8)
        if name == "Q5_0":
            return q - np.int8(16), _f16(blocks[:, :2]), None, 32
        return q, _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), 32
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales(blocks[:, 4:16])
        if name == "Q4_K":
            q = blocks[:, 16:].reshape(n, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
            q = (q & np.uint8(0x0F)).reshape(n, 256)
        else:
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            ql = blocks[:, 48:].reshape(n, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
            q = (ql & np.uint8(0x0F)).reshape(n, 8, 32) | ((qh & np.uint8(1)) << np.uint8(4))
            q = q.reshape(n, 256)
        return q.astype(np.int8), d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)), 32
    if name == "Q6_K":
        ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], blocks[:, 208:]
        shifts2 = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        shifts4 = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        lo = (ql.reshape(n, -1, 1, 64) >> shifts2) & np.uint8(0x0F)
        hi = (qh.reshape(n, -1, 1, 32) >> shifts4) & np.uint8(3)
        q = (lo.reshape(n, -1, 32) | (hi.reshape(n, -1, 32) << np.uint8(4))).astype(np.int8) - np.int8(32)
        return q.reshape(n, 256), _f16(d) * scales.view(np.int8).astype(np.float32), None, 16
    raise ValueError(name)


def split_quantized(t) -> tuple | None:
    """(q [rows, cols] int8, scale, offset, block) for a GGUF tensor, checked bit-exact against
    the `gguf` dequantizer; None for formats we keep as float32."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    if t.tensor_type.name not in SPLITTABLE:
        return None
    _, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
    raw = np.asarray(t.data).view(np.uint8).reshape(-1, block_bytes)
    q, scale, offset, sub = _split_blocks(t.tensor_type.name, raw)
    cols = int(t.shape[0])
    rows = int(np.prod(t.shape[1:]))
    q = q.reshape(rows, cols)
    scale = scale.reshape(rows, cols // sub)
    offset = None if offset is None else offset.reshape(rows, cols // sub)
    w = q.reshape(rows, -1, sub).astype(np.float32) * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    if not np.array_equal(w.reshape(rows, cols), dequantize(t.data, t.tensor_type).reshape(rows, cols)):
        return None
    return q, scale, offset, sub


def _rows(a: np.ndarray | None, heads: int) -> torch.Tensor | None:
    """Tensor from a numpy array, with llama.cpp's q/k row permutation undone when `heads`."""
    if a is None:
        return None
    return torch.from_numpy(np.array(_unpermute(a, heads) if heads else a, order="C"))


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
        except (TypeError, ValueError, ZeroDivisionError, WeightsError) as e:  # keys of the wrong type
            raise WeightsError(f"{self.path}: malformed GGUF metadata ({e})") from None

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
        """Yield (our name, weight) for every used tensor: a QTensor when the format splits exactly
        into int8 blocks, else a float32 tensor."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        for t in self.reader.tensors:
            name = map_name(t.name)
            if name is None:
                continue
            heads = 0
            if config.arch == "llama" and ".attn.q." in name:
                heads = config.num_heads
            elif config.arch == "llama" and ".attn.k." in name:
                heads = config.num_kv_heads
            try:
                parts = split_quantized(t) if t.tensor_type not in (Q.F32, Q.F16, Q.BF16) else None
                if parts is not None:
                    q, scale, offset = (_rows(a, heads) for a in parts[:3])
                    block = parts[3]
                    yield name, QTensor(q, scale, offset, block)
                    continue
                if t.tensor_type in (Q.F32, Q.F16):
                    arr = np.asarray(t.data, dtype=np.float32).reshape(t.shape[::-1].tolist())
                else:
                    arr = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise UnsupportedModelError(
                    f"{self.path}: tensor type {t.tensor_type.name} ({t.name}) is not supported"
                ) from None
            yield name, _rows(np.asarray(arr, dtype=np.float32), heads)

    def num_tensors(self) -> int:
        return len(self.reader.tensors)

    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts
