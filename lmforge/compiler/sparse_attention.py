"""Sparse attention kernels for the CPU: block-sparse prefill and streaming (sink + window) masks.

`block_sparse_attention` computes, for each block of queries, attention over only the key
blocks a pattern selected: the keys of those blocks are gathered and one scaled-dot-product
call runs per query block, so the work done is proportional to the blocks kept, not to the
square of the length. The patterns are MInference's, at block granularity (every pattern
keeps the same number of key blocks per query block, so they cost the same and are
compared by how much attention they keep):

- `a_shape`: the first block (attention sinks) and the most recent blocks;
- `vertical_slash`: the key blocks and the diagonals (query-key offsets) that the last
  `ESTIMATE_QUERIES` queries attend to most — estimated at run time from those queries;
- `block_sparse`: per query block, the key blocks with the highest score between
  block-mean-pooled queries and keys — also estimated at run time.

Streaming heads (DuoAttention) see the first `sink` real tokens of their row and the last
`window` tokens up to themselves; `streaming_allowed` is that mask for any query/key slots,
used both for a full-sequence forward and for decoding against a ring cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
ESTIMATE_QUERIES = 64


def first_real_slot(pad: torch.Tensor | None) -> torch.Tensor | int:
    """Each row's first real slot (its left-padding count), shaped (B, 1, 1, 1) to broadcast
    against (B, H, T, S) masks; 0 without padding."""
    return pad.view(-1, 1, 1, 1) if pad is not None else 0


def streaming_allowed(
    query_slots: torch.Tensor, key_slots: torch.Tensor, first_real: torch.Tensor | int, sink: int, window: int
) -> torch.Tensor:
    """Which keys a streaming head's queries may see, for broadcastable query slots, key
    slots (< 0: an empty entry) and first real slots: causal, real, and either one of the
    row's first `sink` real tokens or within the last `window` slots."""
    sinks = (key_slots - first_real) < sink
    recent = key_slots > query_slots - window
    allowed = (key_slots >= first_real) & (key_slots <= query_slots) & (sinks | recent)
    # a padding query would see nothing and turn NaN (which its cached value would spread): it sees itself
    return allowed | (key_slots == query_slots)


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


def causal_blocks(length: int, block: int) -> torch.Tensor:
    count = -(-length // block)
    return torch.ones(count, count, dtype=torch.bool).tril()


def a_shape_blocks(length: int, block: int, budget: int) -> torch.Tensor:
    """(NQ, NK): the first key block and the `budget - 1` most recent ones."""
    count = -(-length // block)
    query, key = torch.arange(count)[:, None], torch.arange(count)[None, :]
    return (key <= query) & ((key == 0) | (key > query - budget))


def streaming_blocks(length: int, block: int, sink: int, window: int, pad: torch.Tensor | None) -> torch.Tensor:
    """(NQ, NK): the key blocks a streaming head's queries can reach (the blocks holding
    the sinks of the most padded row, and the blocks overlapping the window)."""
    count = -(-length // block)
    query, key = torch.arange(count)[:, None], torch.arange(count)[None, :]
    last_sink = sink + (int(pad.max()) if pad is not None else 0)
    sink_blocks = -(-last_sink // block) if sink > 0 else 0
    recent = (key + 1) * block > query * block - window + 1
    return (key <= query) & ((key < sink_blocks) | recent)


def _causal_probabilities(q_last: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities of the last queries (B, H, Q, T) under the causal mask."""
    length, queries = k.shape[2], q_last.shape[2]
    scores = torch.matmul(q_last, k.transpose(-1, -2)) * scale
    query_slots = torch.arange(length - queries, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > query_slots, -math.inf)
    return torch.softmax(scores.float(), dim=-1)


def _top_blocks(scores: torch.Tensor, count: int, forced: list[int]) -> torch.Tensor:
    """Boolean (..., N) of the `count` highest-scoring entries, `forced` ones always in."""
    scores = scores.clone()
    scores[..., forced] = math.inf
    top = scores.topk(min(count, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def vertical_slash_blocks(q: torch.Tensor, k: torch.Tensor, block: int, budget: int, scale: float) -> torch.Tensor:
    """(B, H, NQ, NK): half the budget to the key blocks the last queries attend to most
    (verticals, block 0 always), half to the block diagonals they attend along most
    (slashes, the diagonal and the one below always)."""
    length = k.shape[2]
    count = -(-length // block)
    probabilities = _causal_probabilities(q[:, :, -ESTIMATE_QUERIES:], k, scale)
    queries = probabilities.shape[2]
    vertical = F.pad(probabilities.sum(2), (0, count * block - length)).view(*probabilities.shape[:2], count, block).sum(-1)
    offsets = (torch.arange(length - queries, length)[:, None] // block - torch.arange(length)[None, :] // block).clamp_min(0)
    slash = torch.zeros(*probabilities.shape[:2], count).scatter_add_(
        -1, offsets.flatten().expand(*probabilities.shape[:2], -1), probabilities.flatten(-2)
    )
    verticals = _top_blocks(vertical, max(1, budget // 2), [0])
    slashes = _top_blocks(slash, max(2, budget - budget // 2), [0, 1])
    query, key = torch.arange(count)[:, None], torch.arange(count)[None, :]
    on_slash = slashes[..., None, :].expand(-1, -1, count, -1).gather(-1, (query - key).clamp(0, count - 1).expand(
        *slashes.shape[:2], -1, -1))
    return (key <= query) & (verticals[..., None, :] | on_slash)


def block_sparse_blocks(q: torch.Tensor, k: torch.Tensor, block: int, budget: int, scale: float) -> torch.Tensor:
    """(B, H, NQ, NK): per query block, the `budget` key blocks whose mean-pooled keys score
    highest against the block's mean-pooled queries (block 0 and the diagonal always)."""
    length = k.shape[2]
    count = -(-length // block)
    padding = (0, 0, 0, count * block - length)
    pooled_q = F.pad(q, padding).view(*q.shape[:2], count, block, -1).mean(3)
    pooled_k = F.pad(k, padding).view(*k.shape[:2], count, block, -1).mean(3)
    scores = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)).float() * scale
    query, key = torch.arange(count)[:, None], torch.arange(count)[None, :]
    scores = scores.masked_fill(key > query, -math.inf)
    scores = torch.where((key == query) | (key == 0), torch.tensor(math.inf), scores)
    top = scores.topk(min(budget, count), dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return chosen & (key <= query)


def pattern_blocks(
    patterns: list[int], q: torch.Tensor, k: torch.Tensor, block: int, budget: int, scale: float
) -> torch.Tensor:
    """(B, Hq, NQ, NK) selected key blocks for each query head's pattern (an index into
    `PATTERNS`), estimated from this forward's queries and keys (k expanded to Hq heads)."""
    length = k.shape[2]
    selected = a_shape_blocks(length, block, budget).expand(q.shape[0], q.shape[1], -1, -1).clone()
    for code, estimate in ((1, vertical_slash_blocks), (2, block_sparse_blocks)):
        heads = [head for head, pattern in enumerate(patterns) if pattern == code]
        if heads:
            selected[:, heads] = estimate(q[:, heads], k[:, heads], block, budget, scale)
    return selected
