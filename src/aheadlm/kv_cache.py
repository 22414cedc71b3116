"""The KV cache: an explicit, preallocated object passed to the model (and read by the MTP drafter).

Each layer stores K and V as `[B, kv_heads, S + 1, head_dim]`. Full-attention layers have one slot
per position (`S = max_len`). Sliding-window layers keep a ring of `window + max_step` slots
(slot = position % S). Every layer type ("group") keeps `pos[B, S + 1]`, the position held by each
slot (-1 = empty), so masks come from positions alone, and rolling back is forgetting positions: a
ring still holds the whole window after a rollback of up to `max_step` tokens.

Rows of a batch advance independently. A position of -1 in a forward marks padding: its K/V go to
the scratch slot S, which no query ever sees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import SLIDING, ModelConfig
from .errors import ContextLengthError

DEFAULT_MAX_STEP = 256
"""Most tokens one forward may add; a sliding layer's ring keeps window + this many slots."""


@dataclass
class Group:
    """Slots shared by all layers of one type."""

    size: int
    ring: bool
    window: int | None
    pos: torch.Tensor
    """[B, size] position stored in each slot, -1 when empty."""


@dataclass
class AttnView:
    """What attention needs for one layer type: where new K/V go and which cached keys each query
    may see, expressed by positions (the compiled kernel reads them directly)."""

    slots: torch.Tensor | None
    """[B, T] slot index of each new token (None for read-only views, e.g. the drafter's)."""
    end: int
    """Slots [0, end) are read."""
    qpos: torch.Tensor
    """[B, T] query positions."""
    kpos: torch.Tensor
    """[B, end] position held by each slot, -1 when empty."""
    window: int | None = None
    strict: bool = False
    """Keys strictly before the query (the drafter's query is not in the cache)."""

    @property
    def mask(self) -> torch.Tensor:
        """[B, 1, T, end] True where attention is allowed (for the SDPA fallback)."""
        k, q = self.kpos[:, None, :], self.qpos[:, :, None]
        allowed = (k >= 0) & ((k < q) if self.strict else (k <= q))
        if self.window is not None:
            allowed &= q - k < self.window
        return allowed[:, None]


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        max_len: int,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_step: int = DEFAULT_MAX_STEP,
    ):
        self.config = config
        self.max_len = max_len
        self.batch_size = batch_size
        self.max_step = max_step
        self.lengths = [0] * batch_size
        self._max_written = [-1] * batch_size
        self.groups: dict[str, Group] = {}
        for t in config.group_types:
            window = config.sliding_window if t == SLIDING else None
            ring = window is not None and window + max_step < max_len
            size = window + max_step if ring else max_len
            pos = torch.full((batch_size, size + 1), -1, dtype=torch.long, device=device)
            self.groups[t] = Group(size, ring, window, pos)
        self.k, self.v = [], []
        for layer, t in enumerate(config.layer_types):
            src = config.kv_source(layer)
            if src != layer:  # KV-shared layers read their source layer's tensors
                self.k.append(self.k[src])
                self.v.append(self.v[src])
                continue
            shape = (batch_size, config.type_kv_heads(t), self.groups[t].size + 1, config.type_head_dim(t))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    @property
    def length(self) -> int:
        """Tokens cached in row 0 (the single-sequence case)."""
        return self.lengths[0]

    @property
    def nbytes(self) -> int:
        unique = {id(t): t for t in self.k + self.v}.values()
        return sum(t.numel() * t.element_size() for t in unique)

    def prepare(self, positions: torch.Tensor) -> dict[str, AttnView]:
        """Reserve slots for new tokens at `positions` [B, T] (each row's valid positions consecutive
        from its current length; -1 = padding) and build the attention views. Called once per
        forward, before the layers run."""
        B, T = positions.shape
        rows = positions.tolist()
        padded = False
        for b, row in enumerate(rows):
            valid = [p for p in row if p >= 0]
            padded |= len(valid) != T
            if not valid:
                continue
            if valid[0] != self.lengths[b] or valid[-1] != valid[0] + len(valid) - 1:
                raise ValueError(f"row {b}: new tokens must continue at position {self.lengths[b]}")
            if valid[-1] >= self.max_len:
                raise ContextLengthError(f"position {valid[-1]} is past the KV cache size {self.max_len}")
            self.lengths[b] = valid[-1] + 1
            self._max_written[b] = max(self._max_written[b], valid[-1])
        if T > self.max_step and any(g.ring for g in self.groups.values()):
            raise ValueError(f"a forward may add at most {self.max_step} tokens (got {T})")
        views = {}
        for name, g in self.groups.items():
            slots = positions % g.size if g.ring else positions.clamp_min(0)
            if padded:
                slots = torch.where(positions >= 0, slots, g.size)
            g.pos.scatter_(1, slots, positions.clamp_min(-1))
            end = g.size if g.ring else max(self.lengths)
            end = min(end, max(self._max_written) + 1)
            views[name] = AttnView(slots, end, positions, g.pos[:, :end], g.window)
        return views

    def read_view(
        self, layer_type: str, qpos: torch.Tensor, strict: bool = True, window: int | None = None
    ) -> AttnView:
        """A read-only view of one layer type's slots for queries at `qpos` [B, T] (the drafter),
        with the layers' own window unless `window` is given (it may exceed it by up to
        `max_step - 1`: the ring keeps that much more)."""
        g = self.groups[layer_type]
        end = min(g.size, max(self._max_written) + 1) if g.ring else max(self.lengths)
        return AttnView(None, end, qpos, g.pos[:, :end], window or g.window, strict)

    def write(self, layer: int, view: AttnView, k: torch.Tensor, v: torch.Tensor):
        """Store new `k`, `v` [B, kv_heads, T, head_dim] and return the readable K/V slices."""
        ck, cv = self.k[layer], self.v[layer]
        k, v = k.to(ck.dtype), v.to(cv.dtype)  # a bfloat16 cache rounds them as the kernels do
        B, _, T, _ = k.shape
        if B == 1 and view.slots.shape[1] == T:
            s = view.slots[0]
            start = int(s[0])
            if int(s[-1]) == start + T - 1 and start + T <= ck.shape[2] - 1:  # contiguous: slice copy
                ck[:, :, start : start + T] = k
                cv[:, :, start : start + T] = v
            else:
                ck[0].index_copy_(1, s, k[0])
                cv[0].index_copy_(1, s, v[0])
        else:
            for b in range(B):
                ck[b].index_copy_(1, view.slots[b], k[b])
                cv[b].index_copy_(1, view.slots[b], v[b])
        return ck[:, :, : view.end], cv[:, :, : view.end]

    def read(self, layer: int, end: int):
        """K/V of one layer's first `end` slots (views, no copy)."""
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def min_length(self, row: int = 0) -> int:
        """Shortest length row `row` can be trimmed to without losing sliding-window entries."""
        if not any(g.ring for g in self.groups.values()):
            return 0
        return max(0, self._max_written[row] + 1 - self.max_step)

    def trim(self, length: int, row: int = 0) -> None:
        """Roll row `row` back to its first `length` tokens."""
        if length > self.lengths[row]:
            raise ValueError(f"cannot trim to {length}: only {self.lengths[row]} tokens cached")
        if length < self.min_length(row):
            raise ValueError(
                f"cannot trim to {length}: sliding-window entries before {self.min_length(row)} were overwritten"
            )
        for g in self.groups.values():
            p = g.pos[row]
            p.masked_fill_(p >= length, -1)
        self.lengths[row] = length

    def copy_row_from(self, src: KVCache, src_row: int, row: int) -> None:
        """Make row `row` hold what row `src_row` of `src` holds (same config and slot layout)."""
        n = src.lengths[src_row]
        for name, g in self.groups.items():
            sg = src.groups[name]
            if (sg.size, sg.ring) != (g.size, g.ring):
                raise ValueError("caches have different slot layouts")
            used = g.size if g.ring else n
            g.pos[row].fill_(-1)
            g.pos[row, :used] = sg.pos[src_row, :used]
        for layer, t in enumerate(self.config.layer_types):
            if self.config.kv_source(layer) != layer:
                continue
            used = self.groups[t].size if self.groups[t].ring else n
            self.k[layer][row, :, :used] = src.k[layer][src_row, :, :used]
            self.v[layer][row, :, :used] = src.v[layer][src_row, :, :used]
        self.lengths[row] = n
        self._max_written[row] = src._max_written[src_row]

    def first_rows(self, n: int) -> KVCache:
        """A view of rows [0, n) sharing this cache's storage and bookkeeping, so that a batch whose
        later rows are empty computes only the rows in use."""
        if n == self.batch_size:
            return self
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)  # the lengths lists are shared, not copied
        view.batch_size = n
        view.groups = {t: replace(g, pos=g.pos[:n]) for t, g in self.groups.items()}
        view.k = [k[:n] for k in self.k]
        view.v = [v[:n] for v in self.v]
        return view

    def reset(self, row: int | None = None) -> None:
        rows = range(self.batch_size) if row is None else [row]
        for r in rows:
            for g in self.groups.values():
                g.pos[r].fill_(-1)
            self.lengths[r] = 0
            self._max_written[r] = -1
