"""KV cache layout: what the attention ops of a Program expect to find in the cache.

`meta["kv_cache"]` has one entry per layer: `{layer, cache, kv_heads, head_dim}` and, for
layers whose cache is merged with a neighbour's (`kv_share` mode `merge`, MiniCache),
`{kind: "merged", member: 0|1, t, retain_threshold, retain_fraction}`. A layer whose KV heads
are split into retrieval and streaming heads (`streaming_heads`, DuoAttention) keeps its
retrieval heads in its own slot (`kv_heads` counts only them; 0 when every head streams)
and has `streaming: {cache, kv_heads, head_dim, sink, window, capacity}` for a `RingSlot`. A
layer whose cache evicts by attention score (`kv_evict`) has `{kind: "evict", capacity,
recent, decay, observe}` and an `EvictingSlot`. A layer whose cache is quantized (`quantize`
`kv_cache:`, KIVI) has `{kind: "quantized", dtype, granularity, residual, slack}` and a
`QuantizedSlot` (`kv_quantized.py`).
A plain slot is a `(key, value)` pair of `(batch, kv_heads, max_len, head_dim)` buffers; a
merged slot is a `MergedSlot`. Both the runtime's cache and the passes that measure cached
decoding allocate through `allocate_kv_buffers`, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from lmforge.compiler.kv_quantized import QuantizedSlot, quantized_slot_entry
from lmforge.errors import LmforgeError


@dataclass
class MergedSlot:
    """Two adjacent layers' keys and values stored as one direction per token and head plus
    each layer's norms (MiniCache). Tokens whose two directions are too far apart are kept
    exactly, up to `capacity` per head, in `retained_*`; `retained_index` maps a position
    to its retained row (-1: merged). `staged_*` hold the first layer's keys and values of
    the tokens being written until the second layer merges them."""

    direction_k: torch.Tensor   # (B, H, L, D)
    direction_v: torch.Tensor   # (B, H, L, D)
    norms: torch.Tensor         # (B, H, L, 4): |k| and |v| of each member
    retained_k: torch.Tensor    # (B, H, R, 2, D)
    retained_v: torch.Tensor    # (B, H, R, 2, D)
    retained_index: torch.Tensor  # (B, H, L) int32
    retained_count: torch.Tensor  # (B, H) int64
    staged_k: torch.Tensor | None = None
    staged_v: torch.Tensor | None = None

    @classmethod
    def allocate(cls, batch: int, heads: int, max_len: int, head_dim: int, capacity: int, dtype: torch.dtype) -> MergedSlot:
        return cls(
            direction_k=torch.zeros(batch, heads, max_len, head_dim, dtype=dtype),
            direction_v=torch.zeros(batch, heads, max_len, head_dim, dtype=dtype),
            norms=torch.zeros(batch, heads, max_len, 4, dtype=dtype),
            retained_k=torch.zeros(batch, heads, capacity, 2, head_dim, dtype=dtype),
            retained_v=torch.zeros(batch, heads, capacity, 2, head_dim, dtype=dtype),
            retained_index=torch.full((batch, heads, max_len), -1, dtype=torch.int32),
            retained_count=torch.zeros(batch, heads, dtype=torch.long),
        )

    def nbytes(self) -> int:
        """Bytes of the stored state (the staging tensors are transient, one step's tokens)."""
        return sum(getattr(self, f.name).nbytes for f in fields(self) if not f.name.startswith("staged"))


@dataclass
class RingSlot:
    """A streaming head group's cache, of fixed size whatever the sequence length: the first
    `sink` real tokens of each row, then a ring of the most recent tokens (position p at
    entry `sink + p % (capacity - sink)`). `slots[b, i]` is the sequence slot entry i holds,
    -1 when empty; entries at or after a forward's start are stale (rejected drafts) and are
    masked, then overwritten. The ring holds `window` plus slack for the tokens of one
    forward, so a verification forward never overwrites a token a later query still sees."""

    keys: torch.Tensor    # (B, H, C, D)
    values: torch.Tensor  # (B, H, C, D)
    slots: torch.Tensor   # (B, C) int64
    sink: int
    window: int

    @classmethod
    def allocate(cls, batch: int, heads: int, head_dim: int, sink: int, window: int, capacity: int,
                 dtype: torch.dtype) -> RingSlot:
        return cls(
            keys=torch.zeros(batch, heads, capacity, head_dim, dtype=dtype),
            values=torch.zeros(batch, heads, capacity, head_dim, dtype=dtype),
            slots=torch.full((batch, capacity), -1, dtype=torch.long),
            sink=sink,
            window=window,
        )

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.slots.nbytes

    def write(self, keys: torch.Tensor, values: torch.Tensor, start: int, pad: torch.Tensor | None) -> None:
        """Store the tokens of slots `start..` that a later query can still see: each row's
        first `sink` real tokens and the last `capacity - sink` of the rest."""
        capacity = self.keys.shape[2]
        ring = capacity - self.sink
        length = keys.shape[2]
        end = start + length
        if start == 0:
            self.slots.fill_(-1)  # a new sequence: nothing of the previous one may stay visible
        elif length - 1 > ring - self.window:
            raise LmforgeError(
                f"streaming heads: a forward of {length} tokens after a cached prefix needs a ring slack of at least "
                f"{length - 1}, this cache has {ring - self.window}; raise `slack` in streaming_heads"
            )
        positions = torch.arange(start, end, device=keys.device)
        relative = positions - (pad[:, None] if pad is not None else 0)
        relative = relative.expand(keys.shape[0], -1)
        entry = torch.where(relative < self.sink, relative, self.sink + positions % ring)
        keep = (relative >= 0) & ((relative < self.sink) | (positions >= end - ring))
        rows, tokens = keep.nonzero(as_tuple=True)
        entries = entry[rows, tokens]
        self.keys[rows, :, entries] = keys[rows, :, tokens]
        self.values[rows, :, entries] = values[rows, :, tokens]
        self.slots[rows, entries] = positions[tokens]


@dataclass
class EvictingSlot:
    """A cache of fixed `capacity` per KV head that evicts by accumulated attention (H2O /
    A2SF / SCOPE style): after the prefill it keeps, per head, the `recent` last tokens and
    the tokens the last queries attended to most; while decoding, each entry's score decays
    by `decay` per step and gains the attention it receives, and a new token replaces the
    lowest-scoring entry outside the recent ones. `slots[b, h, i]` is the sequence slot
    entry i holds (-1: empty)."""

    keys: torch.Tensor    # (B, H, C, D)
    values: torch.Tensor  # (B, H, C, D)
    slots: torch.Tensor   # (B, H, C) int64
    scores: torch.Tensor  # (B, H, C) float32
    recent: int
    decay: float
    observe: int

    @classmethod
    def allocate(cls, batch: int, heads: int, head_dim: int, capacity: int, recent: int, decay: float, observe: int,
                 dtype: torch.dtype) -> EvictingSlot:
        return cls(
            keys=torch.zeros(batch, heads, capacity, head_dim, dtype=dtype),
            values=torch.zeros(batch, heads, capacity, head_dim, dtype=dtype),
            slots=torch.full((batch, heads, capacity), -1, dtype=torch.long),
            scores=torch.zeros(batch, heads, capacity),
            recent=recent, decay=decay, observe=observe,
        )

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.slots.nbytes + self.scores.nbytes

    def fill(self, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor) -> None:
        """After a prefill of T tokens: keep each head's `recent` last tokens and the rest of
        the capacity by `importance` (B, H, T; -inf: never keep)."""
        length, capacity = keys.shape[2], self.keys.shape[2]
        self.slots.fill_(-1)
        self.scores.zero_()
        ranked = importance.clone()
        ranked[..., max(0, length - self.recent):] = torch.inf
        kept = ranked.topk(min(capacity, length), dim=-1).indices.sort(dim=-1).values
        count = kept.shape[-1]
        gather = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
        self.keys[:, :, :count] = keys.gather(2, gather)
        self.values[:, :, :count] = values.gather(2, gather)
        self.slots[:, :, :count] = torch.where(importance.gather(-1, kept) > -torch.inf, kept, -1)
        self.scores[:, :, :count] = importance.gather(-1, kept).clamp_min(0)

    def insert(self, keys: torch.Tensor, values: torch.Tensor, position: int, attention: torch.Tensor) -> None:
        """After one decode step: decay and add the attention each entry got (`attention`
        (B, H, C + 1), the new token's own last), then store the new token (B, H, 1, D) at an
        empty entry or over the lowest-scoring one that is not among the `recent` last tokens."""
        self.scores.mul_(self.decay).add_(attention[..., :-1])
        candidates = torch.where(self.slots < 0, -torch.inf,
                                 torch.where(self.slots > position - self.recent, torch.inf, self.scores))
        entry = candidates.argmin(-1, keepdim=True)
        self.keys.scatter_(2, entry[..., None].expand(-1, -1, -1, keys.shape[-1]), keys)
        self.values.scatter_(2, entry[..., None].expand(-1, -1, -1, values.shape[-1]), values)
        self.slots.scatter_(2, entry, position)
        self.scores.scatter_(2, entry, attention[..., -1:])


def retained_capacity(entry: dict, max_len: int) -> int:
    return math.ceil(entry.get("retain_fraction", 0.0) * max_len)


def cache_slots(layout: list[dict]) -> dict[int, dict]:
    """Distinct cache slots of a layout, with their shapes (streaming rings included, with
    `kind: "ring"`; slots without heads left out)."""
    slots: dict[int, dict] = {}
    for entry in layout:
        if entry["kv_heads"] > 0:
            slots.setdefault(entry["cache"], entry)
        if "streaming" in entry:
            slots[entry["streaming"]["cache"]] = {**entry["streaming"], "kind": "ring"}
    return slots


def allocate_kv_buffers(layout: list[dict], batch: int, max_len: int, dtype: torch.dtype,
                        device: torch.device | None = None) -> list:
    """Zeroed buffers for `AttentionContext.kv`, one per cache slot (None at indices no
    layer uses): a `(key, value)` pair, or a `MergedSlot` for merged layers. On `device`
    (default: torch's current default device), positions and counters included."""
    if device is not None:
        with torch.device(device):
            return allocate_kv_buffers(layout, batch, max_len, dtype)
    slots = cache_slots(layout)
    buffers: list = [None] * (max(slots) + 1)
    for index, slot in slots.items():
        if slot.get("kind") == "merged":
            buffers[index] = MergedSlot.allocate(batch, slot["kv_heads"], max_len, slot["head_dim"],
                                                 retained_capacity(slot, max_len), dtype)
        elif slot.get("kind") == "evict":
            buffers[index] = EvictingSlot.allocate(batch, slot["kv_heads"], slot["head_dim"], slot["capacity"],
                                                   slot["recent"], slot["decay"], slot["observe"], dtype)
        elif slot.get("kind") == "quantized":
            spec, slack = quantized_slot_entry(slot)
            buffers[index] = QuantizedSlot.allocate(batch, slot["kv_heads"], max_len, slot["head_dim"], spec, slack,
                                                    dtype)
        elif slot.get("kind") == "ring":
            buffers[index] = RingSlot.allocate(batch, slot["kv_heads"], slot["head_dim"], slot["sink"], slot["window"],
                                               slot["capacity"], dtype)
        else:
            shape = (batch, slot["kv_heads"], max_len, slot["head_dim"])
            buffers[index] = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    return buffers


def buffer_bytes(buffer) -> int:
    if isinstance(buffer, (MergedSlot, RingSlot, EvictingSlot, QuantizedSlot)):
        return buffer.nbytes()
    return 0 if buffer is None else buffer[0].nbytes + buffer[1].nbytes


def kv_cache_bytes(layout: list[dict], max_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the cache of `layout` takes for `max_len` tokens at `batch` (allocated on the
    meta device, so nothing is really allocated). Sizes past what a tensor can hold (a length
    from a stranger's artifact or a command line) are an LmforgeError, not torch's TypeError."""
    try:
        with torch.device("meta"):
            return sum(buffer_bytes(buffer) for buffer in allocate_kv_buffers(layout, batch, max_len, dtype))
    except (RuntimeError, TypeError, OverflowError):
        raise LmforgeError(f"a KV cache of {max_len:,} tokens at batch {batch:,} is larger than a tensor can "
                           "hold") from None


def _slerp_directions(first: torch.Tensor, second: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit direction on the great circle from `first` to `second` at fraction `t`, and
    the angle between them (per vector); nearly parallel pairs fall back to a normalised
    linear blend, where the spherical formula divides by ~0."""
    a = first / first.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = second / second.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    spherical = (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / sine.clamp_min(1e-6)
    linear = (1 - t) * a + t * b
    direction = torch.where(sine > 1e-4, spherical, linear)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12), angle.squeeze(-1)


def merge_into(slot: MergedSlot, start: int, keys: tuple, values: tuple, t: float, retain_threshold: float) -> None:
    """Store the two members' keys and values of positions `start..` as merged directions
    plus norms, keeping exactly (while capacity lasts) the token-heads whose key or value
    directions are more than `retain_threshold` radians apart."""
    end = start + keys[0].shape[2]
    # Rows are handed out in position order, so rewriting from `start` (a new sequence, or
    # drafts rejected by speculative decoding) frees exactly the rows of positions >= start.
    slot.retained_count = (slot.retained_index[:, :, :start] >= 0).sum(-1)
    direction_k, angle_k = _slerp_directions(*keys, t)
    direction_v, angle_v = _slerp_directions(*values, t)
    slot.direction_k[:, :, start:end] = direction_k
    slot.direction_v[:, :, start:end] = direction_v
    slot.norms[:, :, start:end] = torch.stack([keys[0].norm(dim=-1), keys[1].norm(dim=-1),
                                               values[0].norm(dim=-1), values[1].norm(dim=-1)], dim=-1)
    keep = torch.maximum(angle_k, angle_v) > retain_threshold
    rows = slot.retained_count[..., None] + keep.long().cumsum(-1) - 1
    keep &= rows < slot.retained_k.shape[2]
    slot.retained_index[:, :, start:end] = torch.where(keep, rows, -1).to(torch.int32)
    if bool(keep.any()):
        b, h, j = keep.nonzero(as_tuple=True)
        row = rows[b, h, j]
        for member in (0, 1):
            slot.retained_k[b, h, row, member] = keys[member][b, h, j]
            slot.retained_v[b, h, row, member] = values[member][b, h, j]
    slot.retained_count += keep.sum(-1)


def restore(slot: MergedSlot, member: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One member's keys and values of positions `0..length`: merged direction times the
    member's own norms, with retained token-heads put back exactly."""
    norms = slot.norms[:, :, :length]
    keys = slot.direction_k[:, :, :length] * norms[..., member : member + 1]
    values = slot.direction_v[:, :, :length] * norms[..., 2 + member : 3 + member]
    index = slot.retained_index[:, :, :length]
    kept = index >= 0
    if bool(kept.any()):
        b, h, j = kept.nonzero(as_tuple=True)
        row = index[b, h, j].long()
        keys[b, h, j] = slot.retained_k[b, h, row, member]
        values[b, h, j] = slot.retained_v[b, h, row, member]
    return keys, values
