"""Static KV cache: preallocated buffers, one pair per cache slot in the layout.

The layout comes from the Program's `meta["kv_cache"]` (saved in the manifest), so a pass
that makes layers share a cache shrinks what is allocated here without the runtime knowing
why.
"""

from __future__ import annotations

import torch

import os

from lmforge.compiler.kv_layout import allocate_kv_buffers, buffer_bytes, kv_cache_bytes
from lmforge.errors import LmforgeError

__all__ = ["StaticKVCache", "available_memory", "check_cache_fits", "kv_cache_bytes"]


def available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated on `device` now (the kernel's MemAvailable on a CPU, free
    memory on a GPU); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_fits(layout: list[dict], batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> int:
    """The cache's bytes, counted before anything is allocated, or an LmforgeError naming the
    figure when it exceeds the memory available: a recipe or an artifact from a stranger may
    ask for any length, and an allocation that large fails deep in torch or gets the process
    killed."""
    needed = kv_cache_bytes(layout, max_len, batch, dtype)
    available = available_memory(device)
    if available is not None and needed > available:
        raise LmforgeError(f"the KV cache for {max_len:,} tokens at batch {batch} needs {needed:,} bytes; "
                           f"{device.type} has {available:,} available: lower runtime.max_seq_len")
    return needed


class StaticKVCache:
    """The buffers of every cache slot (see `compiler.kv_layout`), written by index."""

    def __init__(self, layout: list[dict], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        check_cache_fits(layout, batch, max_len, dtype, torch.device(device) if device is not None
                         else torch.get_default_device())
        self.buffers = allocate_kv_buffers(layout, batch, max_len, dtype, device)

    def nbytes(self) -> int:
        return sum(buffer_bytes(buffer) for buffer in self.buffers)

    def fits(self, batch: int, length: int) -> bool:
        return batch == self.batch and length <= self.max_len
