"""Static KV cache: preallocated buffers, one pair per cache slot in the layout.

The layout comes from the Program's `meta["kv_cache"]` (saved in the manifest), so a pass
that makes layers share a cache shrinks what is allocated here without the runtime knowing
why.
"""

from __future__ import annotations

import torch

from lmforge.compiler.ops import allocate_kv_buffers, cache_slots


def kv_cache_bytes(layout: list[dict], max_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes `StaticKVCache` allocates for `max_len` tokens at `batch`."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(
        2 * batch * slot["kv_heads"] * max_len * slot["head_dim"] * element
        for slot in cache_slots(layout).values()
    )


class StaticKVCache:
    """`(batch, kv_heads, max_len, head_dim)` key and value buffers, written by index."""

    def __init__(self, layout: list[dict], batch: int, max_len: int, dtype: torch.dtype) -> None:
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.buffers = allocate_kv_buffers(layout, batch, max_len, dtype)

    def nbytes(self) -> int:
        return sum(pair[0].nbytes + pair[1].nbytes for pair in self.buffers if pair is not None)

    def fits(self, batch: int, length: int) -> bool:
        return batch == self.batch and length <= self.max_len
