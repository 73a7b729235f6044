"""A paged KV cache: fixed-size blocks in one pool per cache slot, handed out to requests.

A pool is a plain `(1, kv_heads, blocks * block_size, head_dim)` buffer pair per cache
index (allocated by `compiler.kv_layout`, like the static cache with one row); a request's
`BlockTable` lists the blocks holding its positions in order, so position p lives at pool
slot `blocks[p // block_size] * block_size + p % block_size`. Blocks come from one
`BlockAllocator` (a free list with reference counts, so that blocks can later be shared by
requests with a common prefix); a request that finishes or is cancelled gives its blocks
back at once. `paged_rows` turns the pieces of one ragged forward into the `PagedRows` the
attention kernel reads (`codegen/aten/paged.py`).

Prefix caching: `block_key` chains a hash over a full block's tokens and everything before
it, so equal keys mean equal prefixes. A block is registered under its key once it is full
and written (`BlockAllocator.register`); a later request whose tokens start with the same
blocks takes them (`BlockAllocator.lookup`, one more reference each) instead of computing
them again. A cached block whose last reference is released keeps its keys and values and
waits, least recently used first, until the allocator runs out of never-cached blocks and
evicts it; a block that is still referenced is never evicted.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from lmforge.compiler.kv_layout import allocate_kv_buffers, cache_slots
from lmforge.compiler.ops import ATTENTION_OPS, PagedRows, attention, ffn_skip_gate, tree_attention
from lmforge.errors import LmforgeError
from lmforge.runtime.kv_cache import check_cache_fits

DEFAULT_BLOCK_SIZE = 16
PAGEABLE_BACKENDS = ("aten", "fx", "triton")


def paging_unsupported_reason(graph_module: fx.GraphModule, layout: list[dict], backend: str) -> str | None:
    """Why a program cannot run over a paged cache, or None when it can: only the `aten`
    and `triton` kernels of plain `attention` have a paged path (`codegen/aten/paged.py`,
    `codegen/triton/paged_attention.py`); rings, merged and evicting caches keep
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


def block_keys(tokens: Sequence[int], block_size: int, previous: int | None = None) -> list[int]:
    """The chained keys of the full blocks of `tokens` (a partial last block has none),
    continuing from the key `previous` of the block before them."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = block_key(previous, tokens[start : start + block_size])
        keys.append(previous)
    return keys


class BlockAllocator:
    """`count` blocks with a reference count each. A released block with no key goes back on
    the free list; one registered under a key stays cached, evictable in least-recently-used
    order, and is handed out again (its key dropped) only once the free list is empty."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise LmforgeError(f"a paged KV cache needs at least one block (got {count})")
        self.count = count
        self.free_blocks: deque[int] = deque(range(count))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.references = [0] * count
        self.block_of_key: dict[int, int] = {}
        self.key_of_block: dict[int, int] = {}

    @property
    def free(self) -> int:
        """Blocks `allocate` can hand out: never-cached ones and evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def cached(self) -> int:
        """Blocks registered under a key, referenced or not."""
        return len(self.key_of_block)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks, or None (and nothing taken) when fewer are free; cached blocks
        are evicted least recently used first, after the free list."""
        if count > self.free:
            return None
        blocks = [self._take() for _ in range(count)]
        for block in blocks:
            self.references[block] = 1
        return blocks

    def _take(self) -> int:
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self.evictable.popitem(last=False)
        del self.block_of_key[self.key_of_block.pop(block)]
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; the last one frees it (a cached block is kept
        as the most recently used evictable one). Blocks are given in position order, so
        releasing them last first makes a prefix's tail evicted before its head."""
        for block in reversed(blocks):
            if self.references[block] < 1:
                raise LmforgeError(f"block {block} was released more often than it was taken")
            self.references[block] -= 1
            if self.references[block] == 0:
                if block in self.key_of_block:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)

    def register(self, block: int, key: int) -> None:
        """Cache `block` (full and written, referenced) under `key`; a no-op when the block
        already has a key or another block holds the same key (the same prefix computed
        twice at once: the copy stays private and is freed as usual)."""
        if self.references[block] < 1:
            raise LmforgeError(f"block {block} is not in use and cannot be cached")
        if block in self.key_of_block or key in self.block_of_key:
            return
        self.block_of_key[key] = block
        self.key_of_block[block] = key

    def lookup(self, keys: Sequence[int]) -> list[int]:
        """The blocks of the longest run of `keys` cached from the first, each now referenced
        once more (an evictable one stops being evictable)."""
        blocks = []
        for key in keys:
            block = self.block_of_key.get(key)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self.references[block] += 1
            self.evictable.pop(block, None)
        return blocks


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
    tables, spans = [], []
    for request, (table, start, count) in enumerate(pieces):
        end = start + count
        tables.append(table.blocks[: math.ceil(end / block_size)])
        spans.append((len(query_positions), start, count))
        write += table.slots(start, end, block_size)
        keys += table.slots(0, end, block_size)
        query_requests += [request] * count
        query_positions += range(start, end)
        key_requests += [request] * end
        key_positions += range(end)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    logits = None if logit_rows is None else tensor(list(logit_rows))
    width = max((len(blocks) for blocks in tables), default=0)
    block_tables = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in tables], dtype=torch.int32,
                                device=device).reshape(len(tables), width)
    return PagedRows(tensor(write), tensor(keys), tensor(query_requests), tensor(query_positions),
                     tensor(key_requests), tensor(key_positions), logits, block_tables, block_size, tuple(spans))

