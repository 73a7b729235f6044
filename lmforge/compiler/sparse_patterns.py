"""Which keys sparse and streaming attention keep: MInference's prefill patterns at block
granularity and the streaming (sink + window) mask. These rules are part of what the ops
mean, so every backend's kernels (`codegen/aten/sparse.py`, `codegen/triton/attention.py`)
and the passes that choose patterns and streaming heads share them.

The patterns (every pattern keeps the same number of key blocks per query block, so they
cost the same and are compared by how much attention they keep):

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
