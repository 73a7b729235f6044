"""`sparse_attention` on the `aten` backend, and the block-sparse prefill kernel it and
streaming heads share.

`block_sparse_attention` computes, for each block of queries, attention over only the key
blocks a pattern selected (`compiler/sparse_patterns.py`): the keys of those blocks are
gathered and one scaled-dot-product call runs per query block, so the work done is
proportional to the blocks kept, not to the square of the length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.codegen.aten.attention import aten_tree_attention
from lmforge.compiler.ops import current_context
from lmforge.compiler.sparse_patterns import first_real_slot, pattern_blocks, streaming_allowed


def _scores_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    if softcap <= 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, -math.inf)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    block: int,
    scale: float,
    softcap: float = 0.0,
    pad: torch.Tensor | None = None,
    streaming: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Prefill attention (queries at slots 0..T-1) over the selected key blocks only.

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D); blocks: bool (B or 1, Hq or 1, NQ, NK) with
    NQ = NK = ceil(T / block), which key blocks each query block computes (the diagonal
    block must be selected). Within the selected blocks the causal mask, left padding and,
    with `streaming=(sink, window)`, the streaming mask apply token by token. Returns
    (B, Hq, T, D)."""
    batch, heads, length, dim = q.shape
    groups = heads // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    count = -(-length // block)
    padded = count * block
    if padded != length:
        q, k, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (q, k, v))
    blocks = blocks.expand(batch, heads, -1, -1)
    counts = blocks.sum(-1)
    # selected blocks first, in ascending order, so each query block gathers a prefix
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    # keys and values as rows of whole blocks, so gathering a block is one contiguous copy
    key_rows = k.contiguous().view(batch * heads * count, block * dim)
    value_rows = v.contiguous().view(batch * heads * count, block * dim)
    first_row = (torch.arange(batch * heads) * count).view(batch, heads, 1)
    table = _relative_masks(block, count, streaming) if pad is None and (streaming is None or streaming[0] <= block) else None
    offsets = torch.arange(block)
    out = torch.empty_like(q)
    for index in range(count):
        width = int(counts[:, :, index].max())
        chosen = order[:, :, index, :width]
        valid = torch.arange(width) < counts[:, :, index, None]
        rows = (first_row + chosen).flatten()
        keys = key_rows.index_select(0, rows).view(batch, heads, width * block, dim)
        values = value_rows.index_select(0, rows).view(batch, heads, width * block, dim)
        if table is not None:
            entry = torch.where(valid, 1 + index - chosen + (count if streaming else 0) * (chosen == 0), 0)
            allowed = table.index_select(0, entry.flatten()).view(batch, heads, width, block, block)
            allowed = allowed.transpose(2, 3).reshape(batch, heads, block, width * block)
        else:
            key_slots = (chosen[..., None] * block + offsets).flatten(-2)[:, :, None, :]
            query_slots = torch.arange(index * block, (index + 1) * block)[:, None]
            if streaming is not None:
                allowed = streaming_allowed(query_slots, key_slots, first_real_slot(pad), *streaming)
            else:
                allowed = (key_slots <= query_slots) & (key_slots >= first_real_slot(pad)) | (key_slots == query_slots)
            allowed = allowed & valid.repeat_interleave(block, -1)[:, :, None, :]
        queries = slice(index * block, (index + 1) * block)
        out[:, :, queries] = _scores_attention(q[:, :, queries], keys, values, allowed, scale, softcap)
    return out[:, :, :length]


def _relative_masks(block: int, count: int, streaming: tuple[int, int] | None) -> torch.Tensor:
    """Token masks of a (query block, key block) pair without padding, which depend only on
    their distance d: entry 0 masks everything (an unselected block), entry 1 + d is key
    block i - d seen from query block i, and with streaming, entry 1 + count + d the same
    for key block 0, whose first `sink` tokens stay visible (sink <= block)."""
    distance = torch.arange(count).view(-1, 1, 1) * block + torch.arange(block).view(1, -1, 1) - torch.arange(block)
    allowed = distance >= 0
    masks = [torch.zeros(1, block, block, dtype=torch.bool)]
    if streaming is None:
        return torch.cat(masks + [allowed])
    sink, window = streaming
    recent = allowed & (distance < window)
    sinks = allowed & (torch.arange(block) < sink)
    return torch.cat(masks + [recent, recent | sinks])


def aten_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    scale: float,
    window: int,
    softcap: float,
    patterns: list[int],
    budget: int,
    block: int,
    min_length: int,
) -> torch.Tensor:
    """`attention` whose prefill of `min_length` tokens or more computes, per query head,
    only the `budget` key blocks per query block its MInference pattern selects (indices
    estimated from this prefill's own queries and keys). Decoding, verification and short
    prompts are dense and exact."""
    ctx = current_context()
    if ctx.start != 0 or q.shape[2] < min_length or ctx.tree is not None:
        return aten_tree_attention(q, k, v, cache_index, scale, window, softcap)
    if ctx.kv is not None:
        key_cache, value_cache = ctx.kv[cache_index]
        key_cache[:, :, : q.shape[2]] = k
        value_cache[:, :, : q.shape[2]] = v
    groups = q.shape[1] // k.shape[1]
    expanded = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    selected = pattern_blocks(patterns, q, expanded, block, budget, scale)
    out = block_sparse_attention(q, k, v, selected, block, scale, softcap, ctx.pad)
    return out.transpose(1, 2).contiguous()
