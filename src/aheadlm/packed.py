"""Compact weights for CPU decoding: block-scaled int8 (bit-exact GGUF dequantization) and
bfloat16, multiplied with float32 activations by the compiled kernels in `aheadlm.kernels`."""

from __future__ import annotations

import os
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
            base, _, leaf = key.rpartition(".")
            part = leaf in ("scale", "offset") or leaf.startswith("q")  # a block tensor's own entry
            if not (part and isinstance(out.get(base), QTensor)):  # a bias beside it stays
                out.setdefault(key, t)
        return out


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int values 0..15 [..., K] (K a multiple of 32) -> uint8 [..., K / 2]: byte j of each block of
    32 holds value j in its low nibble and value j + 16 in its high one (the kernels' 4-bit layout)."""
    b = q.to(torch.uint8).reshape(*q.shape[:-1], -1, 2, 16)
    return (b[..., 0, :] | (b[..., 1, :] << 4)).reshape(*q.shape[:-1], -1)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`, as int8."""
    b = p.reshape(*p.shape[:-1], -1, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=-2).reshape(*p.shape[:-1], -1).to(torch.int8)


def int_products() -> bool:
    """Whether int8 and 4-bit weights multiply with integer dot products (`kernels/intgemm.h`):
    where the kernels were built with AVX-512 VNNI, unless AHEADLM_INT_PRODUCTS=0. They round each
    row of x to 16-bit integers per block of 32, which moves a whole model's logits by about 1e-4
    of the largest (benchmarks/int_products.py), and a few rows cost little more than one:
    verifying 4 drafts costs about 1.3 decode steps instead of 2.1. Each row is still computed
    alone (batch-invariant), so verification matches decoding exactly."""
    if os.environ.get("AHEADLM_INT_PRODUCTS", "1") == "0":
        return False
    kernels = cpu_kernels()
    return kernels is not None and kernels.int_products_compiled()


class PackedLinear(nn.Module):
    """y = x @ W^T (+ b) with W as a QTensor or bfloat16, float32 activations. Int8 blocks of 32
    whose values span at most 16 integers (GGUF's 4-bit formats) are kept two values to a byte
    (`bits` 4), which halves the bytes a decode step streams; their float32 products are
    bit-identical to the int8 form's. With `integer` (default `int_products()`) both multiply with
    integer dot products instead and are kept only in the kernels' regrouped form, unless `rows`
    keeps the rows too (for embedding lookups and draft heads, which read rows in place)."""

    def __init__(
        self,
        weight: QTensor | torch.Tensor,
        bias: torch.Tensor | None = None,
        nibbles: bool = True,
        integer: bool | None = None,
        rows: bool = False,
    ):
        super().__init__()
        self.kernels = cpu_kernels()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.bits, self.zero = 8, 0
        self.linear = self.ints = None
        for name in ("q", "scale", "offset", "w16"):  # the buffers this weight's form keeps
            self.register_buffer(name, None)
        if isinstance(weight, QTensor):
            self.block = weight.block
            q = weight.q
            if nibbles and self.block == 32 and q.numel():
                lo, hi = int(q.min()), int(q.max())
                zero = 0 if lo >= 0 and hi <= 15 else 8 if lo >= -8 and hi <= 7 else None
                if zero is not None:
                    self.bits, self.zero, q = 4, zero, pack_nibbles(q.to(torch.int16) + zero)
            q = q.contiguous()
            scale = weight.scale.float().contiguous()
            offset = (weight.offset if weight.offset is not None else torch.empty(0)).float().contiguous()
            integer = int_products() if integer is None else integer
            if integer and self.block in (16, 32) and self.in_features % 32 == 0:
                self.ints = self.kernels.Linear(q, scale, offset, self.block, self.bits, self.zero, True)
            if rows or self.ints is None:
                self.q, self.scale, self.offset = q, scale, offset
                self.linear = self.kernels.Linear(self.q, self.scale, self.offset, self.block, self.bits, self.zero)
        else:
            self.block = 0
            self.w16 = weight.to(torch.bfloat16).contiguous()
            empty = torch.empty(0)
            self.linear = self.kernels.Linear(self.w16, empty, empty, 0)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @property
    def kernel(self):
        """The kernels' Linear that computes `forward` (integer form where there is one)."""
        return self.ints if self.ints is not None else self.linear

    def dense_weight(self) -> torch.Tensor:
        return self.qtensor().dequantize() if self.block else self.w16.float()

    def rows_linear(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [H] @ W[ids]^T -> [n]: scores against a subset of rows (a clustered draft head). The
        kernels read the rows in place: copying them out first added about a quarter to the time."""
        if self.linear is None:  # integer form only: rows come back through unpack (slow, rare)
            y = self.rows(ids) @ x.float()
            return y if self.bias is None else y + self.bias.index_select(0, ids)
        y = self.linear(x.float()[None], ids.long().contiguous())
        return y[0] if self.bias is None else y[0] + self.bias.index_select(0, ids)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 weight rows `ids` (any shape of indices)."""
        return self.qtensor(ids).dequantize() if self.block else self.w16[ids].float()

    def qtensor(self, rows: torch.Tensor | None = None) -> QTensor:
        """The weights (or rows `rows` of them) as an int8 QTensor."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        q, scale, offset = (self.q, self.scale, self.offset) if self.q is not None else self.ints.unpack()
        q = pick(q)
        if self.bits == 4:
            q = (unpack_nibbles(q).to(torch.int16) - self.zero).to(torch.int8)
        return QTensor(q, pick(scale), pick(offset) if offset.numel() else None, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.kernel(x.reshape(-1, shape[-1]).float())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def dense_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every PackedLinear given back as float32 `weight` (and `bias`),
    i.e. the names and values of the module before packing."""
    state = module.state_dict()
    for name, child in module.named_modules():
        if isinstance(child, PackedLinear):
            prefix = f"{name}." if name else ""
            for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix) :]]:
                del state[key]
            state[f"{prefix}weight"] = child.dense_weight()
            if child.bias is not None:
                state[f"{prefix}bias"] = child.bias.detach()
    return state


class PackedEmbedding(nn.Module):
    """Embedding lookups (and, with `head`, the tied output head) from a packed table. The table
    keeps its rows for lookups and draft heads; a head also gets the integer form for its products
    (a second copy of the table, where the build has integer products)."""

    def __init__(self, weight: QTensor | torch.Tensor, nibbles: bool = True, head: bool = False):
        super().__init__()
        self.table = PackedLinear(weight, nibbles=nibbles, integer=None if head else False, rows=True)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dense_weight()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        return self.table(h)

    def rows_linear(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows_linear(x, ids)


def quantize_q8(w: torch.Tensor, block: int = 32) -> QTensor:
    """Symmetric block-scaled int8 in GGUF Q8_0's layout: each run of `block` inputs of a row keeps
    int8 values and one float16 scale (absmax / 127), about 8.5 bits per weight."""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // block, block)
    scale = (blocks.abs().amax(-1) / 127).to(torch.float16)
    s = scale.float()[..., None]
    q = torch.where(s > 0, blocks / s.clamp_min(1e-30), 0).round().clamp(-127, 127).to(torch.int8)
    return QTensor(q.reshape(n, k), scale, None, block)


def packable(weight: torch.Tensor | QTensor) -> bool:
    """Whether the kernels can multiply this weight (and are available)."""
    if cpu_kernels() is None:
        return False
    if isinstance(weight, QTensor):
        return weight.shape[1] % weight.block == 0
    return weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] % 32 == 0


def dense(weight: torch.Tensor | QTensor) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, QTensor) else weight


def _as_block(t: QTensor, block: int, with_offset: bool) -> QTensor:
    """Re-express a QTensor with a smaller block and/or an explicit zero offset (exact)."""
    scale, offset = t.scale, t.offset
    if block != t.block:
        rep = t.block // block
        scale = scale.repeat_interleave(rep, dim=1)
        offset = None if offset is None else offset.repeat_interleave(rep, dim=1)
    if with_offset and offset is None:
        offset = torch.zeros_like(scale)
    return QTensor(t.q, scale, offset, block)


def fuse(modules: list[nn.Module]) -> nn.Module | None:
    """One linear computing the concatenated outputs of `modules` (same input), or None when
    they cannot be combined. Saves kernel launches per layer (q/k/v, gate/up)."""
    if all(type(m) is nn.Linear for m in modules):
        if any((m.bias is None) != (modules[0].bias is None) for m in modules):
            return None
        w = torch.cat([m.weight for m in modules])
        out = nn.Linear(w.shape[1], w.shape[0], bias=modules[0].bias is not None, device=w.device, dtype=w.dtype)
        out.weight = nn.Parameter(w, requires_grad=False)
        if out.bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias for m in modules]), requires_grad=False)
        return out
    if not all(isinstance(m, PackedLinear) and m.bias is None for m in modules):
        return None
    if all(m.block == 0 for m in modules):
        return PackedLinear(torch.cat([m.w16 for m in modules]))
    if any(m.block == 0 for m in modules):
        return None
    parts = [m.qtensor() for m in modules]
    block = min(p.block for p in parts)
    with_offset = any(p.offset is not None for p in parts)
    parts = [_as_block(p, block, with_offset) for p in parts]
    offset = torch.cat([p.offset for p in parts]) if with_offset else None
    fused = QTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offset, block)
    return PackedLinear(fused, nibbles=all(m.bits == 4 for m in modules))
