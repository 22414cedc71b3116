"""Compact weights for CPU decoding: block-scaled int8 (bit-exact GGUF dequantization) and
bfloat16, multiplied with float32 activations by the compiled kernels in `aheadlm.kernels`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kernels import cpu_kernels


@dataclass
class QTensor:
    """A `[N, K]` matrix stored as int8 `q` with per-block float32 `scale` and optional `offset`:
    w[n, k] = q[n, k] * scale[n, k // block] (+ offset[n, k // block]), rounded to float32."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    block: int

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 weights (optionally only `rows`), identical to the GGUF dequantizer's."""
        q, s, o = self.q, self.scale, self.offset
        if rows is not None:
            q, s = q[rows], s[rows]
            o = None if o is None else o[rows]
        shape = q.shape
        w = q.float().reshape(*shape[:-1], -1, self.block) * s[..., None]
        if o is not None:
            w = w + o[..., None]
        return w.reshape(shape)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Flat safetensors entries for `name`."""
        out = {f"{name}.q{self.block}": self.q, f"{name}.scale": self.scale}
        if self.offset is not None:
            out[f"{name}.offset"] = self.offset
        return out

    @classmethod
    def collect(cls, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QTensor]:
        """Inverse of `tensors` over a whole state dict."""
        out: dict[str, torch.Tensor | QTensor] = {}
        for key, t in flat.items():
            for block in (16, 32):
                if key.endswith(f".q{block}"):
                    name = key[: -len(f".q{block}")]
                    out[name] = cls(t, flat[f"{name}.scale"], flat.get(f"{name}.offset"), block)
        for key, t in flat.items():
            base = key.rsplit(".", 1)[0]
            if base not in out or not isinstance(out[base], QTensor):
                out.setdefault(key, t)
        return out


class PackedLinear(nn.Module):
    """y = x @ W^T (+ b) with W as a QTensor or bfloat16, float32 activations."""

    def __init__(self, weight: QTensor | torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.kernels = cpu_kernels()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        if isinstance(weight, QTensor):
            self.block = weight.block
            self.register_buffer("q", weight.q.contiguous())
            self.register_buffer("scale", weight.scale.float().contiguous())
            self.register_buffer("offset", (weight.offset if weight.offset is not None else torch.empty(0)).float())
            self.w16 = None
        else:
            self.block = 0
            self.register_buffer("w16", weight.to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        if self.block:
            return QTensor(self.q, self.scale, self.offset if self.offset.numel() else None, self.block).dequantize()
        return self.w16.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.block:
            y = self.kernels.q8_linear(x2, self.q, self.scale, self.offset, self.block)
        else:
            y = self.kernels.bf16_linear(x2, self.w16)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class PackedEmbedding(nn.Module):
    """Embedding lookups (and the tied output head) from a packed table."""

    def __init__(self, weight: QTensor | torch.Tensor):
        super().__init__()
        self.table = PackedLinear(weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dense_weight()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.table
        if t.block:
            off = t.offset if t.offset.numel() else None
            return QTensor(t.q, t.scale, off, t.block).dequantize(tokens)
        return t.w16[tokens].float()

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return self.table(h)


def packable(weight: torch.Tensor | QTensor) -> bool:
    """Whether the kernels can multiply this weight (and are available)."""
    if cpu_kernels() is None:
        return False
    if isinstance(weight, QTensor):
        return weight.shape[1] % weight.block == 0
    return weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] % 32 == 0


def dense(weight: torch.Tensor | QTensor) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, QTensor) else weight
