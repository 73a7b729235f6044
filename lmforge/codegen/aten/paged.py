"""The paged path of `attention` on the `aten` backend: a ragged forward whose cache is a
block pool (`compiler.ops.PagedRows`, built by `runtime.paged`).

The new keys and values are written with `index_copy_` into their pool slots (block ×
block_size + offset), the keys and values of every request in the forward are gathered
from their blocks into one sequence, and one scaled-dot-product attention runs under a
mask that lets a query see only its own request's keys, causally by position and within
the window. One gather and one attention per layer serve any mix of decode tokens and
prefill chunks; the mask is built once per forward and window and shared by every layer.
"""

from __future__ import annotations

import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.compiler.ops import AttentionContext, PagedRows
from lmforge.errors import LmforgeError


def paged_mask(rows: PagedRows, window: int) -> torch.Tensor:
    """(1, 1, T, S): query t may attend key s of its own request at a position not after
    its own (and, with a window, less than `window` positions before it)."""
    queries, keys = rows.query_positions[:, None], rows.key_positions[None, :]
    allowed = (rows.query_requests[:, None] == rows.key_requests[None, :]) & (keys <= queries)
    if window > 0:
        allowed = allowed & (keys > queries - window)
    return allowed[None, None]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    context: AttentionContext,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    """q (1, Hq, T, D), k and v (1, Hkv, T, D) of the forward's tokens; `cache` is this
    layer's `(key, value)` pool. Returns (1, T, Hq, D) like the dense kernel."""
    if context.tree is not None:
        raise LmforgeError("draft-tree verification is not supported over a paged cache")
    if not isinstance(cache, tuple):
        raise LmforgeError(f"a paged forward needs plain (key, value) pools, not a {type(cache).__name__}")
    rows = context.paged
    key_pool, value_pool = cache
    key_pool.index_copy_(2, rows.write_slots, k)
    value_pool.index_copy_(2, rows.write_slots, v)
    keys = key_pool.index_select(2, rows.key_slots)
    values = value_pool.index_select(2, rows.key_slots)
    mask = context.cached(("paged", window), lambda: paged_mask(rows, window))
    out = attention_reference(q, keys, values, mask, scale, softcap)
    return out.transpose(1, 2).contiguous()
