"""`attention` and `tree_attention` on the `aten` backend: the new keys and values written
into the runtime's cache at slots `start ..`, then scaled-dot-product attention over the
cache under the forward context's mask (`AttentionContext.mask`). `tree_attention` is the
same kernel honouring the context's draft tree; `attention` refuses a tree, so a program
whose layers were not rewritten for tree verification fails instead of ignoring the tree.
`attention_reference` is the attention itself, which the other kernels and the tests reuse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.compiler.ops import current_context
from lmforge.errors import LmforgeError


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Scaled dot-product attention with optional logit soft-capping and GQA.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D); mask: bool (B, 1, T, S) or None for causal
    attention aligned to the last key. Returns (B, Hq, T, D).
    """
    groups = q.shape[1] // k.shape[1]
    if softcap > 0.0:
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if mask is None:
            t, s = scores.shape[-2:]
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~mask, -math.inf)
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=groups > 1
    )


def aten_tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    ctx = current_context()
    if ctx.paged is not None:
        return paged_attention(q, k, v, ctx.kv[cache_index], ctx, scale, window, softcap)
    if ctx.slots is not None:
        key_cache, value_cache = ctx.kv[cache_index]
        key_cache.index_copy_(2, ctx.slots, k)
        value_cache.index_copy_(2, ctx.slots, v)
        out = attention_reference(q, key_cache, value_cache, ctx.mask(window), scale, softcap)
        return out.transpose(1, 2).contiguous()
    if ctx.kv is not None:
        key_cache, value_cache = ctx.kv[cache_index]
        end = ctx.start + q.shape[2]
        key_cache[:, :, ctx.start : end] = k
        value_cache[:, :, ctx.start : end] = v
        k = key_cache[:, :, :end]
        v = value_cache[:, :, :end]
    out = attention_reference(q, k, v, ctx.mask(window), scale, softcap)
    return out.transpose(1, 2).contiguous()


def aten_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    if current_context().tree is not None:
        raise LmforgeError("this program verifies draft trees but its attention was not rewritten for them; compile "
                           "with draft_heads `tree:` so every layer uses lmforge::tree_attention")
    return aten_tree_attention(q, k, v, cache_index, scale, window, softcap)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, _, scale, window, softcap = inputs
    context = current_context()
    if context.kv is not None:
        raise LmforgeError("gradients through lmforge::attention need a cache-free forward (kv=None)")
    ctx.save_for_backward(q, k, v)
    ctx.mask, ctx.scale, ctx.softcap = context.mask(window), scale, softcap


def _attention_backward(ctx, grad: torch.Tensor):
    """Recompute the attention under autograd: passes that fine-tune through the graph
    (KV-sharing heal, head gates) need gradients, and at calibration sizes recomputing is
    cheaper than keeping the probabilities of every layer."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        out = attention_reference(q, k, v, ctx.mask, ctx.scale, ctx.softcap).transpose(1, 2)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    return (*grads, None, None, None, None)


torch.library.register_autograd(
    "lmforge::attention", _attention_backward, setup_context=_attention_setup_context
)

# The paged path reuses `attention_reference`, so it is imported once that is defined.
from lmforge.codegen.aten.paged import paged_attention  # noqa: E402
