"""Static KV cache: preallocated buffers, one pair per cache slot in the layout.

The layout comes from the Program's `meta["kv_cache"]` (saved in the manifest), so a pass
that makes layers share a cache shrinks what is allocated here without the runtime knowing
why.
"""

from __future__ import annotations

import torch

from lmforge.compiler.kv_layout import allocate_kv_buffers, buffer_bytes, kv_cache_bytes

__all__ = ["StaticKVCache", "kv_cache_bytes"]


class StaticKVCache:
    """The buffers of every cache slot (see `compiler.kv_layout`), written by index."""

    def __init__(self, layout: list[dict], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.buffers = allocate_kv_buffers(layout, batch, max_len, dtype, device)

    def nbytes(self) -> int:
        return sum(buffer_bytes(buffer) for buffer in self.buffers)

    def fits(self, batch: int, length: int) -> bool:
        return batch == self.batch and length <= self.max_len
