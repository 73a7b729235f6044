"""`evicting_attention` on the `aten` backend: a cache that keeps a fixed number of tokens per
KV head (`kv_layout.EvictingSlot`), filled after the prefill by `prefill_importance` and
updated at each decode step with the attention every kept entry received."""

from __future__ import annotations

import math

import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.compiler.ops import current_context
from lmforge.errors import LmforgeError


def prefill_importance(q: torch.Tensor, k: torch.Tensor, pad: torch.Tensor | None, scale: float, observe: int,
                       decay: float) -> torch.Tensor:
    """(B, Hkv, T): attention the last `observe` queries pay each key, summed over the query
    heads of each KV head, later queries weighted more (A2SF's forgetting factor `decay`);
    padding keys get -inf."""
    length, groups = k.shape[2], q.shape[1] // k.shape[1]
    queries = q[:, :, -observe:].float()
    count = queries.shape[2]
    logits = torch.matmul(queries, k.float().repeat_interleave(groups, dim=1).transpose(-1, -2)) * scale
    future = torch.arange(length, device=q.device)[None, :] > torch.arange(length - count, length, device=q.device)[:, None]
    probabilities = torch.softmax(logits.masked_fill(future, -math.inf), dim=-1)
    weights = decay ** torch.arange(count - 1, -1, -1, dtype=torch.float32, device=q.device)
    importance = torch.einsum("bhqt,q->bht", probabilities, weights)
    importance = importance.view(k.shape[0], k.shape[1], groups, length).sum(2)
    if pad is not None:
        importance = importance.masked_fill(torch.arange(length, device=q.device)[None, None] < pad.view(-1, 1, 1),
                                            -math.inf)
    return importance


def aten_evicting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    """Attention whose cache keeps a fixed number of tokens per KV head, evicting by
    accumulated attention (`kv_layout.EvictingSlot`). Prefill and cache-free forwards are
    exact; decoding sees only what the cache kept, one token per forward."""
    ctx = current_context()
    if ctx.kv is None or ctx.start == 0:
        out = attention_reference(q, k, v, ctx.mask(window), scale, softcap)
        if ctx.kv is not None:
            slot = ctx.kv[cache_index]
            slot.fill(k, v, prefill_importance(q, k, ctx.pad, scale, slot.observe, slot.decay))
        return out.transpose(1, 2).contiguous()
    if q.shape[2] != 1:
        raise LmforgeError("kv_evict decodes one token per forward; speculative verification would evict tokens "
                           "for drafts that are then rejected")
    slot = ctx.kv[cache_index]
    groups = q.shape[1] // k.shape[1]
    keys = torch.cat([slot.keys, k], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([slot.values, v], dim=2).repeat_interleave(groups, dim=1)
    present = torch.cat([slot.slots >= 0, torch.ones_like(slot.slots[..., :1], dtype=torch.bool)], dim=-1)
    logits = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap > 0.0:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~present.repeat_interleave(groups, dim=1)[:, :, None], -math.inf)
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
    out = torch.matmul(probabilities.to(q.dtype), values)
    slot.insert(k, v, ctx.start, probabilities[:, :, 0].view(k.shape[0], k.shape[1], groups, -1).sum(2))
    return out.transpose(1, 2).contiguous()
