"""The program's graph as a step Inductor can compile: lmforge's attention ops rewritten to
aten on graph inputs (see `codegen/cpp_backend.py` for why and how; what cannot be rewritten
is refused by `cpp/refused.py`)."""

from __future__ import annotations

import copy
import math

import torch
from torch import fx

from lmforge.compiler.ops import attention, last_position, slot_mask, tree_attention

LOWERED_ATTENTION = (attention, tree_attention)  # the attention ops the compiled step expresses


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    write_slots: torch.Tensor,
    key_slots: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    window: int,
    softcap: float,
    tree: torch.Tensor | None = None,
) -> torch.Tensor:
    """`lmforge::attention` with its cache and mask as tensors: writes k, v (B, Hkv, T, D) at
    `write_slots` (T,), attends q (B, Hq, T, D) to cache slots `key_slots` (S,) = 0..S-1 with
    the same mask as `AttentionContext.mask` (causal by slot, window, left padding hidden, a
    padding query sees itself). Returns (B, T, Hq, D)."""
    key_cache.index_copy_(2, write_slots, k)
    value_cache.index_copy_(2, write_slots, v)
    length = key_slots.shape[0]
    keys, values = key_cache.index_select(2, key_slots), value_cache.index_select(2, key_slots)
    batch, heads, tokens, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    allowed = slot_mask(write_slots, key_slots, pad, window, tree)  # (B, T, S)
    queries = q.reshape(batch, kv_heads, groups * tokens, head_dim)
    static = isinstance(tokens, int)  # a decode or verify bucket; a prefill's token count is symbolic
    scores = (_products_as_loops(queries, keys.transpose(2, 3)) if static else torch.matmul(queries, keys.transpose(2, 3)))
    scores = scores * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, tokens, length).masked_fill(~allowed[:, None, None], -math.inf)
    probabilities = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(batch, kv_heads, groups * tokens, length)
    out = _products_as_loops(probabilities, values) if static else torch.matmul(probabilities, values)
    return out.view(batch, heads, tokens, head_dim).transpose(1, 2).contiguous()


def _products_as_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for (B, H, M, K) @ (B, H, K, N) written as a broadcast product summed over K.

    Why, for a bucket of a few query tokens (M = query heads per KV head × tokens): Inductor
    lowers a matmul of the cache to an external `bmm` call, which needs its operand in a
    buffer of its own, so every layer copied its keys and values out of the cache
    (`index_select`) before calling it — 16 copies and 16 library calls per step on an 8-layer
    model. As a reduction, Inductor writes the product as a loop that reads the cache slots
    in place (the gather fused into it), with no call out and no copy; at these sizes a
    library GEMM has nothing to gain. A prefill keeps `matmul` (M and K in the hundreds)."""
    return (a.unsqueeze(-1) * b.unsqueeze(2)).sum(3)


def cache_indices(graph_module: fx.GraphModule) -> list[int]:
    """The cache slots the program's attention nodes use, in order."""
    return sorted({node.args[3] for node in graph_module.graph.nodes if node.target in LOWERED_ATTENTION})


def has_tree(graph_module: fx.GraphModule) -> bool:
    """Whether the program verifies draft trees (`draft_heads` with a tree put `tree_attention` in it)."""
    return any(node.target is tree_attention for node in graph_module.graph.nodes)


def step_graph(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the program's graph with signature `(input_ids, position_ids, write_slots,
    key_slots, pad, [tree,] key_0, value_0, key_1, …) -> output` for the cache slots of
    `cache_indices` (`tree`, the (T, T) ancestor mask, when `has_tree`), every `attention`
    and `tree_attention` node replaced by `cached_attention` and every position
    kept (`last_position` dropped: the engine takes the last row of a prefill itself, so one
    prefill step of dynamic length serves prefills and cache-free forwards alike)."""
    graph = copy.deepcopy(graph_module.graph)
    indices = cache_indices(graph_module)
    anchor = [node for node in graph.nodes if node.op == "placeholder"][-1]
    inputs: dict[str, fx.Node] = {}
    names = ["write_slots", "key_slots", "pad"] + (["tree"] if has_tree(graph_module) else [])
    names += [f"{kind}_{i}" for i in indices for kind in ("key", "value")]
    for name in names:
        with graph.inserting_after(anchor):
            anchor = inputs[name] = graph.placeholder(name)
    for node in list(graph.nodes):
        if node.target in LOWERED_ATTENTION:
            q, k, v, index, scale, window, softcap = node.args
            arguments = (q, k, v, inputs[f"key_{index}"], inputs[f"value_{index}"], inputs["write_slots"],
                         inputs["key_slots"], inputs["pad"], scale, window, softcap)
            arguments += (inputs["tree"],) if node.target is tree_attention else ()
            with graph.inserting_before(node):
                replacement = graph.call_function(cached_attention, arguments)
        elif node.target is last_position:
            replacement = node.args[0]
        else:
            continue
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(graph_module, graph)
