"""The attention ops on the `triton` backend: the same signatures, forward context and cache
writes as the `aten` backend's kernels (`codegen/aten/`), with the attention itself computed by the
split-K decode kernel (one query per row) or the flash prefill kernel (anything longer).

The kernels read the cache in place, so a forward never copies the context, and they write
the forward's new keys and values into it themselves (the cache then holds exactly what the
Python kernels' torch indexing writes), so a decode step launches no copies of its own. A
streaming ring is written first by `RingSlot.write` (torch indexing: which entry a token
takes depends on the row's padding, and the ring's positions change with it) and then read
the same way, its slots' positions handed to the kernels (`RingSlot.slots`): written first,
it still holds every key this forward's queries see, because the ring keeps `window` plus
one forward's worth of slack.

`TRITON_KERNELS` mirrors `aten.PYTHON_KERNELS` but for the ops in `refused.TRITON_REFUSED`,
which a program may not call on this backend; the ops in `PYTHON_FALLBACKS` run their
Python kernel on this backend, for the reason given there.
"""

import torch

from lmforge.codegen.aten import PYTHON_KERNELS
from lmforge.codegen.triton.decode_attention import decode_attention
from lmforge.codegen.triton.evicting_attention import triton_evicting_attention
from lmforge.codegen.triton.merged_attention import triton_merged_attention
from lmforge.codegen.triton.paged_attention import paged_attention
from lmforge.codegen.triton.prefill_attention import prefill_attention
from lmforge.compiler.ops import (
    AttentionContext,
    attention,
    current_context,
    evicting_attention,
    ffn_skip_gate,
    last_position,
    merged_attention,
    sparse_attention,
    streaming_attention,
    tree_attention,
)
from lmforge.compiler.sparse_patterns import pattern_blocks
from lmforge.errors import LmforgeError

PYTHON_FALLBACKS = {
    ffn_skip_gate: "not attention: a host-side decision on one cosine per row",
}


def _pad(ctx: AttentionContext) -> torch.Tensor | None:
    """Each row's first real position as the int32 the kernels read, converted once per forward."""
    if ctx.pad is None:
        return None
    return ctx.cached("triton_pad", lambda: ctx.pad.to(torch.int32).contiguous())


def _start(ctx: AttentionContext) -> int | torch.Tensor:
    """The forward's first cache slot as the kernels take it: the slots tensor of a step
    captured in a CUDA graph (`AttentionContext.slots`; the kernels read it on the device,
    where a Python int would be frozen at capture), else the context's `start`."""
    return ctx.slots if ctx.slots is not None else ctx.start


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int | torch.Tensor, scale: float,
            window: int, softcap: float, pad: torch.Tensor | None, sink: int = 0, tree: torch.Tensor | None = None,
            key_positions: torch.Tensor | None = None,
            new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, T, Hq, D) attention of q (B, Hq, T, D) at positions start.. over keys in place
    (`start`: an int, or a tensor of the forward's slots read on the device: `_start`);
    `new`: this forward's (keys, values), which the kernel writes at slots start.. first."""
    new_keys, new_values = new if new is not None else (None, None)
    if q.shape[2] == 1 and tree is None:
        out = decode_attention(q, keys, values, start, scale, window, softcap, sink, pad, key_positions,
                               new_keys, new_values)
    else:
        out = prefill_attention(q, keys, values, start, scale, window, softcap, sink, pad, tree, key_positions,
                                new_keys=new_keys, new_values=new_values)
    return out.transpose(1, 2).contiguous()


def _cache_and_new(ctx: AttentionContext, cache_index: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """(keys, values, new) for `_attend`: the cache of `cache_index` and this forward's keys
    and values for the kernel to write into it; without a cache, the keys and values
    themselves (a forward from slot 0) and nothing to write."""
    if ctx.kv is None:
        if ctx.start != 0:
            raise LmforgeError(f"a cache-free forward starts at position 0, this one starts at {ctx.start}")
        return k, v, None
    key_cache, value_cache = ctx.kv[cache_index]
    return key_cache, value_cache, (k, v)


def _paged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, cache_index: int,
           scale: float, window: int, softcap: float) -> torch.Tensor:
    """A serving step's ragged forward over a block pool (`AttentionContext.paged`), read
    through the requests' block tables (`paged_attention`)."""
    if ctx.tree is not None:
        raise LmforgeError("draft-tree verification is not supported over a paged cache")
    cache = ctx.kv[cache_index]
    if not isinstance(cache, tuple):
        raise LmforgeError(f"a paged forward needs plain (key, value) pools, not a {type(cache).__name__}")
    return paged_attention(q, k, v, cache[0], cache[1], ctx.paged, scale, window, softcap)


def triton_tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_index: int, scale: float,
                          window: int, softcap: float) -> torch.Tensor:
    """`tree_attention`: dense attention honouring the context's draft tree, if any."""
    ctx = current_context()
    if ctx.paged is not None:
        return _paged(q, k, v, ctx, cache_index, scale, window, softcap)
    # a captured step (slots) does not know its length on the host: any window is refused, as on aten
    windowed = window > 0 and (ctx.slots is not None or window < ctx.start + q.shape[2])
    if ctx.tree is not None and windowed:
        raise LmforgeError("tree verification with sliding-window attention is not supported; draft a chain instead")
    keys, values, new = _cache_and_new(ctx, cache_index, k, v)
    return _attend(q, keys, values, _start(ctx), scale, window, softcap, _pad(ctx), tree=ctx.tree, new=new)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_index: int, scale: float,
                     window: int, softcap: float) -> torch.Tensor:
    """`attention`: causal attention with an optional sliding window and soft-cap."""
    if current_context().tree is not None:
        raise LmforgeError("this program verifies draft trees but its attention was not rewritten for them; compile "
                           "with draft_heads `tree:` so every layer uses lmforge::tree_attention")
    return triton_tree_attention(q, k, v, cache_index, scale, window, softcap)


def triton_streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_index: int, sink: int,
                               window: int, scale: float, softcap: float) -> torch.Tensor:
    """`streaming_attention` (DuoAttention streaming heads): each query sees its row's first
    `sink` real tokens and the last `window`. A forward from slot 0 reads its own keys; a
    later one writes the ring first and reads it with its slots' positions. A forward whose
    new tokens include left padding (a padded prompt prefilled in chunks) runs the Python
    kernel: the ring never stores padding, yet a padding query must see its own key."""
    ctx = current_context()
    if ctx.tree is not None:
        raise LmforgeError("tree verification is not supported with streaming heads; draft a chain instead")
    if ctx.kv is None or ctx.start == 0:
        out = _attend(q, k, v, 0, scale, window, softcap, _pad(ctx), sink=sink)
        if ctx.kv is not None:
            ctx.kv[cache_index].write(k, v, ctx.start, ctx.pad)
        return out
    if ctx.pad is not None and bool((ctx.pad > ctx.start).any()):
        return PYTHON_KERNELS[streaming_attention](q, k, v, cache_index, sink, window, scale, softcap)
    ring = ctx.kv[cache_index]
    ring.write(k, v, ctx.start, ctx.pad)
    return _attend(q, ring.keys, ring.values, ctx.start, scale, window, softcap, _pad(ctx), sink=sink,
                   key_positions=ring.slots.to(torch.int32))


def _block_lists(selected: torch.Tensor) -> torch.Tensor:
    """(B, H, NQ, K) int32 ascending key-block indices, -1 after the last, from a boolean
    (B, H, NQ, NK) selection (K: the most blocks any query block selected)."""
    width = max(1, int(selected.sum(-1).max()))
    order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    chosen = selected.gather(-1, order)
    return torch.where(chosen, order, -1).to(torch.int32)


def triton_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_index: int, scale: float,
                            window: int, softcap: float, patterns: list[int], budget: int, block: int,
                            min_length: int) -> torch.Tensor:
    """`sparse_attention` (MInference patterns): a prefill of `min_length` tokens or more
    computes only the key blocks its heads' patterns select (estimated in PyTorch from this
    prefill's queries and keys, as the Python kernel does); everything else is dense."""
    ctx = current_context()
    if ctx.start != 0 or q.shape[2] < min_length or ctx.tree is not None:
        return triton_tree_attention(q, k, v, cache_index, scale, window, softcap)
    keys, values, new = _cache_and_new(ctx, cache_index, k, v)
    groups = q.shape[1] // k.shape[1]
    expanded = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    blocks = _block_lists(pattern_blocks(patterns, q, expanded, block, budget, scale))
    new_keys, new_values = new if new is not None else (None, None)
    out = prefill_attention(q, keys, values, 0, scale, 0, softcap, 0, _pad(ctx), blocks=blocks, block=block,
                            new_keys=new_keys, new_values=new_values)
    return out.transpose(1, 2).contiguous()


def triton_last_position(hidden: torch.Tensor) -> torch.Tensor:
    """`last_position` as a view: the custom op must copy (an op's output may not alias its
    input), which on a GPU is one more launch per step; the lowered graph is plain Python, so
    the LM head can read the slice in place; a paged step keeps the rows it samples from
    (`PagedRows.logit_rows`)."""
    context = current_context()
    if context.paged is not None and context.paged.logit_rows is not None:
        return hidden[:, context.paged.logit_rows]
    return hidden[:, -1:] if context.last_only else hidden


TRITON_KERNELS = {
    attention: triton_attention,
    last_position: triton_last_position,
    tree_attention: triton_tree_attention,
    streaming_attention: triton_streaming_attention,
    sparse_attention: triton_sparse_attention,
    merged_attention: triton_merged_attention,
    evicting_attention: triton_evicting_attention,
    **{op: PYTHON_KERNELS[op] for op in PYTHON_FALLBACKS},
}
"""Each op's implementation on the `triton` backend, keyed like `aten.PYTHON_KERNELS`."""
