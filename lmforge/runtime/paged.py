"""A paged KV cache: fixed-size blocks in one pool per cache slot, handed out to requests.

A pool is a plain `(1, kv_heads, blocks * block_size, head_dim)` buffer pair per cache
index (allocated by `compiler.kv_layout`, like the static cache with one row); a request's
`BlockTable` lists the blocks holding its positions in order, so position p lives at pool
slot `blocks[p // block_size] * block_size + p % block_size`. Blocks come from one
`BlockAllocator` (a free list with reference counts, so that blocks can later be shared by
requests with a common prefix); a request that finishes or is cancelled gives its blocks
back at once. `paged_rows` turns the pieces of one ragged forward into the `PagedRows` the
attention kernel reads (`codegen/aten/paged.py`).

`block_key` chains a hash over a full block's tokens and everything before it: the key a
prefix cache looks blocks up by. Nothing looks blocks up by it yet.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from lmforge.compiler.kv_layout import allocate_kv_buffers, cache_slots
from lmforge.compiler.ops import ATTENTION_OPS, PagedRows, attention, ffn_skip_gate, tree_attention
from lmforge.errors import LmforgeError
from lmforge.runtime.kv_cache import check_cache_fits

DEFAULT_BLOCK_SIZE = 16
PAGEABLE_BACKENDS = ("aten", "fx")


def paging_unsupported_reason(graph_module: fx.GraphModule, layout: list[dict], backend: str) -> str | None:
    """Why a program cannot run over a paged cache, or None when it can: only the `aten`
    kernels of plain `attention` have a paged path; rings, merged and evicting caches keep
    per-row state a block table cannot describe; dynamic FFN skipping decides per forward,
    which in a continuous batch would couple unrelated requests."""
    if backend not in PAGEABLE_BACKENDS:
        return f"the {backend} backend has no paged attention kernel yet"
    kinds = sorted({slot.get("kind") for slot in cache_slots(layout).values() if slot.get("kind")})
    if kinds:
        return f"the KV cache has {', '.join(kinds)} slots, which cannot be paged"
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ATTENTION_OPS and node.target not in (attention, tree_attention):
            return f"{node.target._schema.name} has no paged kernel"
        if node.target is ffn_skip_gate:
            return "decode-time FFN skipping decides per forward, which would couple the requests of a batch"
    return None


def block_key(previous: int | None, tokens: Sequence[int]) -> int:
    """The key of a full block: a hash of its tokens and of the key of the block before it
    (None for the first), so equal keys mean equal prefixes."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"-" if previous is None else previous.to_bytes(8, "little"))
    digest.update(b"".join(int(token).to_bytes(4, "little", signed=True) for token in tokens))
    return int.from_bytes(digest.digest(), "little")


class BlockAllocator:
    """A free list of `count` blocks with a reference count per block; a block goes back on
    the free list when its last reference is released."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise LmforgeError(f"a paged KV cache needs at least one block (got {count})")
        self.count = count
        self.free_blocks: deque[int] = deque(range(count))
        self.references = [0] * count

    @property
    def free(self) -> int:
        return len(self.free_blocks)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks, or None (and nothing taken) when fewer are free."""
        if count > len(self.free_blocks):
            return None
        blocks = [self.free_blocks.popleft() for _ in range(count)]
        for block in blocks:
            self.references[block] = 1
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if self.references[block] < 1:
                raise LmforgeError(f"block {block} was released more often than it was taken")
            self.references[block] -= 1
            if self.references[block] == 0:
                self.free_blocks.append(block)


@dataclass
class BlockTable:
    """One request's blocks, in position order."""

    blocks: list[int] = field(default_factory=list)

    def slots(self, start: int, end: int, block_size: int) -> list[int]:
        """Pool slots of positions `start..end`."""
        return [self.blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]


class PagedKVCache:
    """The pools of every cache slot and the allocator of their blocks. A block index means
    the same slots in every pool, so one table serves all layers."""

    def __init__(self, layout: list[dict], blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if block_size < 1:
            raise LmforgeError(f"the KV block size must be >= 1 (got {block_size})")
        self.block_size = block_size
        self.allocator = BlockAllocator(blocks)
        check_cache_fits(layout, 1, blocks * block_size, dtype, device)
        self.pools = allocate_kv_buffers(layout, 1, blocks * block_size, dtype, device)
        self.device = device

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.allocator.count * self.block_size

    def reserve(self, table: BlockTable, length: int) -> bool:
        """Grow `table` to hold `length` positions; False (table unchanged) when the blocks
        are not there."""
        missing = math.ceil(length / self.block_size) - len(table.blocks)
        if missing <= 0:
            return True
        blocks = self.allocator.allocate(missing)
        if blocks is None:
            return False
        table.blocks.extend(blocks)
        return True

    def release(self, table: BlockTable) -> None:
        self.allocator.release(table.blocks)
        table.blocks.clear()


def paged_rows(pieces: Sequence[tuple[BlockTable, int, int]], block_size: int, device: torch.device,
               logit_rows: Sequence[int] | None = None) -> PagedRows:
    """The layout of one ragged forward: per request in order, its table, the first position
    it feeds and how many tokens (its table must already hold them); `logit_rows`, the query
    tokens whose logits are wanted (None: all)."""
    write, keys, query_requests, query_positions, key_requests, key_positions = [], [], [], [], [], []
    for request, (table, start, count) in enumerate(pieces):
        end = start + count
        write += table.slots(start, end, block_size)
        keys += table.slots(0, end, block_size)
        query_requests += [request] * count
        query_positions += range(start, end)
        key_requests += [request] * end
        key_positions += range(end)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    logits = None if logit_rows is None else tensor(list(logit_rows))
    return PagedRows(tensor(write), tensor(keys), tensor(query_requests), tensor(query_positions),
                     tensor(key_requests), tensor(key_positions), logits)

