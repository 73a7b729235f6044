"""`quantized_attention` on the `aten` backend: attention over a quantized KV cache
(`compiler.kv_quantized.QuantizedSlot`, KIVI).

A query at slot p reads its own group of tokens exact and every earlier complete group as it
reads back from its codes (the module docstring of `kv_quantized` says why). Keys are split
into three parts: the committed groups (dequantized block by block as they are read), the
groups of this forward's exact slots that are complete before some query (quantized and read
back on the fly, exactly as they will be committed), and the exact slots. Forwards of a few
queries (decoding, verifying drafts) combine the blocks with an online softmax, so a step
never holds more than one dequantized block; longer forwards (prefills) concatenate the parts
under one mask for scaled-dot-product attention.
"""

from __future__ import annotations

import itertools
import math

import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.compiler.kv_quantized import KVQuantSpec, QuantizedSlot, fake_quantize
from lmforge.compiler.ops import AttentionContext, current_context, quantized_attention
from lmforge.errors import LmforgeError

DEQUANTIZE_BLOCK = 2048  # cache slots dequantized at a time (rounded to whole groups); one layer's, not the cache's
BLOCKED_QUERIES = 64  # forwards of at most this many queries use the blocked online softmax

BACKENDS = ("aten", "fx", "inductor")
_WHY_NOT = "its cache slots hold codes, scales and a ring of exact tokens that only the aten kernel reads"


def refuse_on_backend(graph_module: torch.fx.GraphModule, backend: str) -> None:
    """One LmforgeError naming the op and the backend when a program with a quantized KV
    cache is lowered for a backend that has no kernel for it (triton, cpp)."""
    if backend in BACKENDS:
        return
    if any(node.target is quantized_attention for node in graph_module.graph.nodes):
        raise LmforgeError(f"codegen backend {backend} has no kernel for lmforge::quantized_attention (quantize "
                           f"kv_cache): {_WHY_NOT}; use backend aten for this recipe")


def _allowed(ctx: AttentionContext, window: int, start: int, queries: int,
             device: torch.device) -> torch.Tensor | None:
    """Which slots `0 .. start + queries` each query may see, (B or 1, 1, T, S): the
    context's mask, or the causal mask it leaves implicit; None when one query sees them all."""
    mask = ctx.mask(window)
    if mask is not None or queries == 1:
        return mask
    query_slots = torch.arange(start, start + queries, device=device)[:, None]
    return (torch.arange(start + queries, device=device)[None, :] <= query_slots)[None, None]


def _valid(pad: torch.Tensor | None, first: int, last: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1, last - first): slots that are not left padding."""
    if pad is None:
        return None
    return (torch.arange(first, last, device=device)[None, :] >= pad[:, None])[:, None]


def _online_softmax(q: torch.Tensor, parts, scale: float, softcap: float) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) over `parts`, an iterable of (keys, values, allowed) with
    keys and values (B, Hkv, S, D) and allowed (B or 1, 1, T, S) or None (all), one part at a
    time (flash style: running maximum, normaliser and output). The query heads of a KV head
    are stacked as rows of one matrix, so each part is two batched matrix products without
    copies of its keys. Returns (B, Hq, T, D)."""
    batch, heads, queries, dim = q.shape
    rows = maximum = normaliser = output = None
    for keys, values, allowed in parts:
        kv_heads = keys.shape[1]
        if rows is None:
            rows = q.reshape(batch, kv_heads, heads // kv_heads * queries, dim)
            maximum = torch.full((*rows.shape[:3], 1), -math.inf, device=q.device)
            normaliser = torch.zeros_like(maximum)
            output = torch.zeros(rows.shape, dtype=torch.float32, device=q.device)
        scores = torch.matmul(rows, keys.transpose(-1, -2)).float() * scale
        if softcap > 0.0:
            scores = torch.tanh(scores / softcap) * softcap
        if allowed is not None:
            grouped = scores.view(batch, kv_heads, heads // kv_heads, queries, -1)
            scores = grouped.masked_fill(~allowed.unsqueeze(2), -math.inf).view(scores.shape)
        new_maximum = torch.maximum(maximum, scores.amax(-1, keepdim=True))
        shift = new_maximum.masked_fill(new_maximum == -math.inf, 0.0)
        weights = torch.exp(scores - shift)
        decay = torch.exp(maximum - shift)
        normaliser = normaliser * decay + weights.sum(-1, keepdim=True)
        output = output * decay + torch.matmul(weights.to(values.dtype), values).float()
        maximum = new_maximum
    return (output / normaliser).to(q.dtype).view(batch, heads, queries, dim)


def _committed_blocks(slot: QuantizedSlot, frontier: int, allowed: torch.Tensor | None, window: int, start: int,
                      dtype: torch.dtype):
    """The committed slots `0 .. frontier` dequantized one block at a time, skipping blocks
    a sliding window hides from every query."""
    group = slot.spec.group
    block = max(group, DEQUANTIZE_BLOCK // group * group)
    for first in range(0, frontier, block):
        last = min(first + block, frontier)
        if window > 0 and last <= start - window + 1:
            continue
        keys, values = slot.committed(first, last, dtype)
        yield keys, values, None if allowed is None else allowed[..., first:last]


def aten_quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    scale: float,
    window: int,
    softcap: float,
    dtype: str,
    granularity: str,
    group: int,
    tree: bool,
) -> torch.Tensor:
    """Attention over a quantized KV cache (see the module docstring); `tree`: the op
    verifies draft trees (honours the context's ancestor mask), as `tree_attention` does."""
    ctx = current_context()
    if ctx.tree is not None and not tree:
        raise LmforgeError("this program verifies draft trees but its attention was not rewritten for them; compile "
                           "with draft_heads `tree:` so every layer uses lmforge::tree_attention")
    if ctx.slots is not None:
        raise LmforgeError("lmforge::quantized_attention cannot run in a captured CUDA graph step (its cache is "
                           "updated by host-side logic)")
    spec = KVQuantSpec(dtype, granularity, group)
    slot: QuantizedSlot | None = ctx.kv[cache_index] if ctx.kv is not None else None
    start, queries, device = (ctx.start if slot is not None else 0), q.shape[2], q.device
    end = start + queries
    if slot is not None:
        if slot.spec != spec:
            raise LmforgeError(f"quantized KV cache slot {cache_index} holds {slot.spec}, the op asks for {spec}")
        if start == 0:
            slot.frontier = slot.end = 0
        if start < slot.frontier or start > slot.end:
            raise LmforgeError(
                f"quantized KV cache: a forward from slot {start} after slots 0..{slot.end} were written, of which "
                f"0..{slot.frontier} are committed to codes; a speculative rollback of more than `slack` "
                f"({slot.slack}) tokens needs a larger slack in quantize kv_cache"
            )
    frontier = slot.frontier if slot is not None else 0
    if start > frontier:
        old_keys, old_values = slot.exact(frontier, start)
        exact_keys, exact_values = torch.cat([old_keys, k], dim=2), torch.cat([old_values, v], dim=2)
    else:
        exact_keys, exact_values = k, v
    allowed = _allowed(ctx, window, start, queries, device)
    complete = spec.group_start(end - 1) - frontier  # exact slots whose group ends before the last query's
    if allowed is None:  # one query seeing every slot: its own group exact, the rest read back
        parts = [(exact_keys[:, :, complete:], exact_values[:, :, complete:], None)]
    else:
        query_groups = torch.arange(start, end, device=device)[:, None] // group
        key_groups = torch.arange(frontier, end, device=device)[None, :] // group
        parts = [(exact_keys, exact_values, allowed[..., frontier:end] & (key_groups == query_groups))]
    if complete > 0:
        read_back = fake_quantize(exact_keys[:, :, :complete], exact_values[:, :, :complete], spec,
                                  _valid(ctx.pad, frontier, frontier + complete, device))
        earlier = None if allowed is None else (allowed[..., frontier : frontier + complete]
                                                & (key_groups[:, :complete] < query_groups))
        parts.insert(0, (*read_back, earlier))
    if slot is not None and frontier > 0:
        committed = _committed_blocks(slot, frontier, allowed, window, start, q.dtype)
    else:
        committed = iter(())
    if queries <= BLOCKED_QUERIES:
        out = _online_softmax(q, itertools.chain(committed, parts), scale, softcap)
    else:
        chunks = [*committed, *parts]
        keys, values, mask = (torch.cat([chunk[i] for chunk in chunks], dim=-1 if i == 2 else 2) for i in range(3))
        out = attention_reference(q, keys, values, mask.expand(q.shape[0], -1, -1, -1), scale, softcap)
    if slot is not None:
        _advance(slot, exact_keys, exact_values, start, end, ctx.pad)
    return out.transpose(1, 2).contiguous()


def _advance(slot: QuantizedSlot, exact_keys: torch.Tensor, exact_values: torch.Tensor, start: int, end: int,
             pad: torch.Tensor | None) -> None:
    """Commit the groups no later forward can roll back into (those before `start`, and those
    ending more than `slack` slots before `end`) and keep the rest exact in the ring."""
    spec, frontier = slot.spec, slot.frontier
    new_frontier = max(frontier, spec.group_start(start), spec.group_start(max(end - slot.slack, 0)))
    if new_frontier > frontier:
        count = new_frontier - frontier
        slot.commit(exact_keys[:, :, :count], exact_values[:, :, :count], frontier,
                    _valid(pad, frontier, new_frontier, exact_keys.device))
    slot.keep_exact(exact_keys[:, :, new_frontier - frontier :], exact_values[:, :, new_frontier - frontier :],
                    new_frontier)
    slot.frontier, slot.end = new_frontier, end
