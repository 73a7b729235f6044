"""`streaming_attention` on the `aten` backend (DuoAttention streaming heads): a forward from
slot 0 attends under the sink + window mask, block-sparse over the blocks that mask reaches
once that is faster; later forwards attend over the head's fixed-size ring cache
(`kv_layout.RingSlot`) and then write it."""

from __future__ import annotations

import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.codegen.aten.sparse import block_sparse_attention
from lmforge.compiler.ops import current_context
from lmforge.compiler.sparse_patterns import first_real_slot, streaming_allowed, streaming_blocks
from lmforge.errors import LmforgeError

STREAMING_BLOCK = 64


def _streaming_full(q, k, v, pad, sink: int, window: int, scale: float, softcap: float) -> torch.Tensor:
    """Streaming attention of a sequence starting at slot 0: block-sparse over the sink and
    window blocks once that is faster than one dense masked call (measured here from about
    four windows on), else dense masked."""
    length = q.shape[2]
    if length >= 4 * (sink + window):
        blocks = streaming_blocks(length, STREAMING_BLOCK, sink, window, pad)
        return block_sparse_attention(q, k, v, blocks, STREAMING_BLOCK, scale, softcap, pad, (sink, window))
    slots = torch.arange(length, device=q.device)
    allowed = streaming_allowed(slots.view(1, 1, -1, 1), slots.view(1, 1, 1, -1), first_real_slot(pad), sink, window)
    return attention_reference(q, k, v, allowed, scale, softcap)


def aten_streaming_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    sink: int,
    window: int,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention of streaming heads (DuoAttention): each query sees its row's first `sink`
    real tokens and the last `window` tokens. With a cache the heads read and write a
    fixed-size `RingSlot`, so their memory and decode cost do not grow with the context."""
    ctx = current_context()
    if ctx.tree is not None:
        raise LmforgeError("tree verification is not supported with streaming heads; draft a chain instead")
    if ctx.kv is None or ctx.start == 0:
        out = _streaming_full(q, k, v, ctx.pad, sink, window, scale, softcap)
    else:
        ring = ctx.kv[cache_index]

        def build_mask() -> torch.Tensor:
            past = torch.where(ring.slots < ctx.start, ring.slots, -1)  # stale entries are hidden like empty ones
            new = torch.arange(ctx.start, ctx.start + q.shape[2], device=q.device)
            key_slots = torch.cat([past, new.expand(q.shape[0], -1)], dim=1).view(q.shape[0], 1, 1, -1)
            return streaming_allowed(new.view(1, 1, -1, 1), key_slots, first_real_slot(ctx.pad), sink, window)

        # every ring of the same shape holds the same slots before this forward writes it: one mask for all layers
        allowed = ctx.cached(("streaming", sink, window, ring.keys.shape[2]), build_mask)
        keys, values = torch.cat([ring.keys, k], dim=2), torch.cat([ring.values, v], dim=2)
        out = attention_reference(q, keys, values, allowed, scale, softcap)
    if ctx.kv is not None:
        ctx.kv[cache_index].write(k, v, ctx.start, ctx.pad)
    return out.transpose(1, 2).contiguous()



def _streaming_setup_context(ctx, inputs, output) -> None:
    q, k, v, _, sink, window, scale, softcap = inputs
    context = current_context()
    if context.kv is not None:
        raise LmforgeError("gradients through lmforge::streaming_attention need a cache-free forward (kv=None)")
    ctx.save_for_backward(q, k, v)
    ctx.pad, ctx.options = context.pad, (sink, window, scale, softcap)


def _streaming_backward(ctx, grad: torch.Tensor):
    """Recompute under autograd, as `attention` does: head-gate training needs gradients."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        out = _streaming_full(q, k, v, ctx.pad, *ctx.options).transpose(1, 2)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd(
    "lmforge::streaming_attention", _streaming_backward, setup_context=_streaming_setup_context
)
