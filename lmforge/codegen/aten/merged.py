"""`merged_attention` on the `aten` backend: attention for one of two layers whose caches are
merged (MiniCache), with the earlier tokens restored from the merged slot
(`kv_layout.restore`) and the slot re-merged once both layers of a forward have run."""

from __future__ import annotations

import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.compiler.kv_layout import merge_into, restore
from lmforge.compiler.ops import current_context


def aten_merged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    member: int,
    t: float,
    retain_threshold: float,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    """Attention for one of two layers whose caches are merged (MiniCache). The tokens of
    this forward attend with their exact keys and values; earlier tokens come back from the
    merged slot with this layer's own norms. Member 0 stages its new keys and values in the
    slot; member 1, which runs later in the same forward, merges both into it. Without a
    cache this is plain attention, so merging only affects decoding after the prefill."""
    ctx = current_context()
    if ctx.kv is not None:
        slot = ctx.kv[cache_index]
        past_k, past_v = restore(slot, member, ctx.start)
        if member == 0:
            slot.staged_k, slot.staged_v = k, v
        else:
            merge_into(slot, ctx.start, (slot.staged_k, k), (slot.staged_v, v), t, retain_threshold)
            slot.staged_k = slot.staged_v = None
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    out = attention_reference(q, k, v, ctx.mask(window), scale, softcap)
    return out.transpose(1, 2).contiguous()
