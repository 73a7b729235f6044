"""lmforge's custom ops (`attention` and its siblings `tree_attention`, `merged_attention`,
`streaming_attention`, `sparse_attention`, `evicting_attention`; `ffn_skip_gate`,
`last_position`) and the forward context they read.

Attention is one opaque op in the captured graph so that passes can rewrite it by changing
its arguments (which cache slot, which window) instead of pattern-matching dozens of aten
nodes, and so that the KV cache stays outside the graph: the runtime owns the cache and
hands it to the op through `AttentionContext`, keyed by the op's integer `cache_index`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.compiler.kv_layout import merge_into, restore
from lmforge.compiler.sparse_attention import (
    block_sparse_attention,
    first_real_slot,
    pattern_blocks,
    streaming_allowed,
    streaming_blocks,
)
from lmforge.errors import LmforgeError

ATTENTION_SCHEMA = (
    "attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, "
    "float softcap) -> Tensor"
)

_lib = torch.library.Library("lmforge", "DEF")
_lib.define(ATTENTION_SCHEMA)


@dataclass
class AttentionContext:
    """Everything the attention op needs that is not a graph value.

    `kv` holds one `(key, value)` pair of preallocated `(batch, kv_heads, max_len, head_dim)`
    buffers per cache index, or is None for a cache-free full-sequence forward. The new
    keys/values are written at slots `start .. start + q_len`. `pad` gives, per batch row,
    the number of left-padding slots that no query may attend to (None: no padding).
    Masks are built once per forward and per window size, not once per layer.
    `generated` counts the tokens decoded before this forward (0 for a prefill), which
    decode-time decisions such as dynamic FFN skipping use for their warm-up; when
    `skip_counts` is a dict, those decisions count the layers they skipped into it.
    `tree` (q_len, q_len), when set, says which of this forward's tokens each one may
    see (itself and its ancestors): a tree of draft candidates verified in one forward.
    `last_only` asks for the logits of the last position only (a prefill that verifies
    nothing), so the LM head is not applied to every prompt token. `device` is where the
    masks are built: the program's device (the engine's), else the cache's or the padding's.
    `slots` (q_len,), when set, holds the cache slots this forward writes as a tensor: a step
    captured in a CUDA graph (`runtime.cuda_graphs`) cannot take `start` as a Python int,
    which capture would freeze, so `attention` and `tree_attention` then write with
    `index_copy_` and attend over the whole cache under a mask computed from `slots`, `pad`
    and `tree` (static buffers the runtime refills before each replay).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    start: int
    q_len: int
    pad: torch.Tensor | None = None
    generated: int = 0
    skip_counts: dict[int, int] | None = None
    tree: torch.Tensor | None = None
    last_only: bool = False
    device: torch.device | None = None
    slots: torch.Tensor | None = None
    _masks: dict[Hashable, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int) -> torch.Tensor | None:
        """Boolean mask `(batch, 1, q_len, start + q_len)`, or None where plain causal
        attention (or no mask at all, for one query) is exact; with `slots`, the mask over
        the whole cache `(batch, 1, q_len, max_len)`."""
        if self.slots is not None:
            return self.cached(("slots", window), lambda: self._build_slot_mask(window))
        return self.cached(window, lambda: self._build_mask(window))

    def _build_slot_mask(self, window: int) -> torch.Tensor:
        """`_build_mask` from tensors only (no Python int that a CUDA graph would freeze):
        causal by slot, the window, the draft tree among the new slots, and padding (`pad`
        is then a tensor, zeros for unpadded rows)."""
        if self.tree is not None and window > 0:
            raise LmforgeError("tree verification with sliding-window attention is not supported; draft a chain instead")
        max_len = self.kv[next(i for i, slot in enumerate(self.kv) if slot is not None)][0].shape[2]
        query_slots = self.slots[:, None]
        key_slots = torch.arange(max_len, device=self.slots.device)[None, :]
        allowed = key_slots <= query_slots
        if window > 0:
            allowed = allowed & (key_slots > query_slots - window)
        if self.tree is not None:
            relative = key_slots - self.slots[0]
            among_new = (relative >= 0) & (relative < self.q_len)
            allowed = torch.where(among_new, self.tree[:, relative.clamp(0, self.q_len - 1)[0]], allowed)
        allowed = allowed[None, None] & (key_slots[None, None] >= self.pad[:, None, None, None])
        return allowed | (key_slots == query_slots)[None, None]

    def cached(self, key: Hashable, build: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """A mask built once per forward under `key`, shared by every layer that asks."""
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def _build_mask(self, window: int) -> torch.Tensor | None:
        kv_len = self.start + self.q_len
        window_active = 0 < window < kv_len
        if self.tree is not None and window_active:
            raise LmforgeError("tree verification with sliding-window attention is not supported; draft a chain instead")
        if self.pad is None and self.tree is None and not window_active and (self.q_len == 1 or self.start == 0):
            return None
        device = self.device or (self.pad.device if self.pad is not None else None)
        query_slots = torch.arange(self.start, kv_len, device=device)[:, None]
        key_slots = torch.arange(kv_len, device=device)[None, :]
        allowed = key_slots <= query_slots
        if window_active:
            allowed = allowed & (key_slots > query_slots - window)
        if self.tree is not None:
            allowed[:, self.start :] = self.tree
        allowed = allowed[None, None]
        if self.pad is not None:
            allowed = allowed & (key_slots[None, None] >= self.pad[:, None, None, None])
            # A padding query would otherwise see no key at all and turn NaN, and the NaN
            # would reach real tokens through its cached value; let it see itself.
            allowed = allowed | (key_slots == query_slots)[None, None]
        return allowed


class _ContextStack(threading.local):
    """The forward contexts entered in this thread, innermost last. Per thread, so that
    engines running forwards in two threads at once each see their own cache and masks."""

    def __init__(self) -> None:
        self.contexts: list[AttentionContext] = []


_active = _ContextStack()


@contextlib.contextmanager
def attention_context(ctx: AttentionContext) -> Iterator[AttentionContext]:
    """Make `ctx` the context every `lmforge::attention` call in this forward (in this
    thread) reads."""
    _active.contexts.append(ctx)
    try:
        yield ctx
    finally:
        _active.contexts.pop()


def current_context() -> AttentionContext:
    if not _active.contexts:
        raise LmforgeError(
            "lmforge::attention was called outside a forward context; run the program through "
            "lmforge's runtime (Engine or CompiledModel) or wrap the call in "
            "`with lmforge.compiler.ops.attention_context(AttentionContext(kv=None, start=0, "
            "q_len=T)):`"
        )
    return _active.contexts[-1]


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


def _dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_index: int,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    ctx = current_context()
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


def _attention(
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
    return _dense_attention(q, k, v, cache_index, scale, window, softcap)


_lib.impl("attention", _attention, "CompositeExplicitAutograd")


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


attention = torch.ops.lmforge.attention.default

TREE_ATTENTION_SCHEMA = (
    "tree_attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, float softcap) -> Tensor"
)
_lib.define(TREE_ATTENTION_SCHEMA)
# `attention` that also honours the context's ancestor mask, so one forward verifies a tree
# of drafts: `draft_heads` with a tree swaps every layer's attention for it.
_lib.impl("tree_attention", _dense_attention, "CompositeExplicitAutograd")


tree_attention = torch.ops.lmforge.tree_attention.default

FFN_SKIP_GATE_SCHEMA = "ffn_skip_gate(Tensor before, Tensor after, float threshold, int warmup, int layer) -> Tensor"
_lib.define(FFN_SKIP_GATE_SCHEMA)


def _ffn_skip_gate(before: torch.Tensor, after: torch.Tensor, threshold: float, warmup: int, layer: int) -> torch.Tensor:
    """Whether `layer` may skip its FFN for this forward: only when decoding one token
    per row with a cache, after `warmup` decode steps, and when the residual stream of
    every row barely turned across the previous FFN (cosine of its input and output at
    the last position >= `threshold`). Prefill, verification of several tokens and
    cache-free forwards always compute every FFN, so skipping is a decode-time decision."""
    context = current_context()
    if context.kv is None or context.q_len != 1 or context.generated < warmup:
        return torch.tensor(False)  # a host-side predicate: `torch.cond` branches on it in Python
    cosine = F.cosine_similarity(before[:, -1].float(), after[:, -1].float(), dim=-1)
    skip = bool((cosine >= threshold).all())
    if skip and context.skip_counts is not None:
        context.skip_counts[layer] = context.skip_counts.get(layer, 0) + 1
    return torch.tensor(skip)


_lib.impl("ffn_skip_gate", _ffn_skip_gate, "CompositeExplicitAutograd")


@torch.library.register_fake("lmforge::ffn_skip_gate")
def _ffn_skip_gate_fake(before, after, threshold, warmup, layer):
    return before.new_empty((), dtype=torch.bool)


ffn_skip_gate = torch.ops.lmforge.ffn_skip_gate.default

MERGED_ATTENTION_SCHEMA = (
    "merged_attention(Tensor q, Tensor k, Tensor v, int cache_index, int member, float t, float retain_threshold, "
    "float scale, int window, float softcap) -> Tensor"
)
_lib.define(MERGED_ATTENTION_SCHEMA)


def _merged_attention(
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


_lib.impl("merged_attention", _merged_attention, "CompositeExplicitAutograd")


merged_attention = torch.ops.lmforge.merged_attention.default

STREAMING_ATTENTION_SCHEMA = (
    "streaming_attention(Tensor q, Tensor k, Tensor v, int cache_index, int sink, int window, float scale, "
    "float softcap) -> Tensor"
)
_lib.define(STREAMING_ATTENTION_SCHEMA)
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


def _streaming_attention(
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


_lib.impl("streaming_attention", _streaming_attention, "CompositeExplicitAutograd")


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


streaming_attention = torch.ops.lmforge.streaming_attention.default

SPARSE_ATTENTION_SCHEMA = (
    "sparse_attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, float softcap, "
    "int[] patterns, int budget, int block, int min_length) -> Tensor"
)
_lib.define(SPARSE_ATTENTION_SCHEMA)


def _sparse_attention(
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
        return _dense_attention(q, k, v, cache_index, scale, window, softcap)
    if ctx.kv is not None:
        key_cache, value_cache = ctx.kv[cache_index]
        key_cache[:, :, : q.shape[2]] = k
        value_cache[:, :, : q.shape[2]] = v
    groups = q.shape[1] // k.shape[1]
    expanded = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    selected = pattern_blocks(patterns, q, expanded, block, budget, scale)
    out = block_sparse_attention(q, k, v, selected, block, scale, softcap, ctx.pad)
    return out.transpose(1, 2).contiguous()


_lib.impl("sparse_attention", _sparse_attention, "CompositeExplicitAutograd")


sparse_attention = torch.ops.lmforge.sparse_attention.default

EVICTING_ATTENTION_SCHEMA = (
    "evicting_attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, float softcap) -> Tensor"
)
_lib.define(EVICTING_ATTENTION_SCHEMA)


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


def _evicting_attention(
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


_lib.impl("evicting_attention", _evicting_attention, "CompositeExplicitAutograd")


evicting_attention = torch.ops.lmforge.evicting_attention.default

LAST_POSITION_SCHEMA = "last_position(Tensor hidden) -> Tensor"
_lib.define(LAST_POSITION_SCHEMA)


def _last_position(hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's input: only the last position when the forward asks for `last_only`
    (as Hugging Face's `logits_to_keep=1` in a prefill), else every position."""
    return hidden[:, -1:].clone() if current_context().last_only else hidden.clone()


_lib.impl("last_position", _last_position, "CompositeExplicitAutograd")


def _last_position_setup_context(ctx, inputs, output) -> None:
    ctx.shape, ctx.last_only = inputs[0].shape, current_context().last_only


def _last_position_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    if not ctx.last_only:
        return grad
    full = grad.new_zeros(ctx.shape)
    full[:, -1:] = grad
    return full


torch.library.register_autograd(
    "lmforge::last_position", _last_position_backward, setup_context=_last_position_setup_context
)


@torch.library.register_fake("lmforge::last_position")
def _last_position_fake(hidden):
    return hidden.new_empty(hidden.shape)


last_position = torch.ops.lmforge.last_position.default
ATTENTION_OPS = (attention, tree_attention, merged_attention, streaming_attention, sparse_attention, evicting_attention)

def _attention_output_fake(q: torch.Tensor, *arguments) -> torch.Tensor:
    """Every attention op returns (batch, q_len, heads, head_dim) for q (batch, heads, q_len, head_dim)."""
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, heads, head_dim)


for _op in ATTENTION_OPS:
    torch.library.register_fake(_op._name)(_attention_output_fake)

# Each op's Python kernel by op, for code generators that call it without the dispatcher.
PYTHON_KERNELS = {
    attention: _attention,
    tree_attention: _dense_attention,
    ffn_skip_gate: _ffn_skip_gate,
    merged_attention: _merged_attention,
    streaming_attention: _streaming_attention,
    sparse_attention: _sparse_attention,
    evicting_attention: _evicting_attention,
    last_position: _last_position,
}
