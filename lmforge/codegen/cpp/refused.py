"""The ops the `cpp` backend does not compile, each with the pass that puts it in a program
and why, and the check that refuses such a program when it is lowered (`codegen.lower`, at
compile, before any bucket is exported): the recipe fails with that reason instead of at
its first forward, minutes into a compile.

What the compiled step can hold is dense cache slots written and read through slot tensors
(`cpp/step_graph.py`); each op below keeps state the step cannot express that way, or sizes
its work by data, so it has no lowering yet. The reasons live here, and only here.

This module imports no Inductor, so the check runs before the backend is loaded.
"""

from __future__ import annotations

import torch
from torch import fx

from lmforge.compiler.ops import (
    attention,
    evicting_attention,
    ffn_skip_gate,
    last_position,
    merged_attention,
    quantized_attention,
    sparse_attention,
    streaming_attention,
    tree_attention,
)
from lmforge.errors import LmforgeError

COMPILED_LMFORGE_OPS = (attention, tree_attention, last_position)
"""The lmforge ops the step graph rewrites to aten (`cpp/step_graph.py`)."""

CPP_REFUSED: dict[object, tuple[str, str]] = {
    streaming_attention: (
        "streaming_heads",
        "a streaming head's ring slot (kv_layout.RingSlot) places its sink entries by each row's left padding, "
        "bookkeeping the cache object does in Python, and its long prefills switch to block-sparse by length",
    ),
    sparse_attention: (
        "sparse_prefill",
        "a prefill of min_length tokens or more picks each query block's key blocks from its own scores and "
        "runs one call per block, sized by the data; the any-length step cannot branch on its token count",
    ),
    merged_attention: (
        "kv_merge",
        "the merged slot (MiniCache) is restored and re-merged in Python once both layers of a forward have run, "
        "keeping a data-dependent set of token-heads apart",
    ),
    evicting_attention: (
        "kv_evict",
        "the evicting slot (kv_layout.EvictingSlot) keeps a data-chosen set of tokens per KV head and re-ranks "
        "it at every decode step, state held by a Python object",
    ),
    ffn_skip_gate: (
        "ffn_skip mode: dynamic",
        "the gate reads the decode count and records skips in the engine's Python context, and torch.cond "
        "branches on its answer between operators",
    ),
    torch.ops.higher_order.cond: (
        "ffn_skip mode: dynamic",
        "torch.cond branches on a host-side answer between operators",
    ),
    quantized_attention: (
        "quantize kv_cache",
        "its cache slots hold integer codes, scales and a ring of exact tokens that only the aten kernel reads",
    ),
}
"""Each op the `cpp` backend refuses: (the pass that puts it in a program, why)."""


def refusal(node: fx.Node) -> str | None:
    """Why the `cpp` backend cannot compile `node`, or None when it can."""
    if node.op != "call_function":
        return None
    if node.target in CPP_REFUSED:
        pass_name, reason = CPP_REFUSED[node.target]
        return f"lmforge::{_op_name(node.target)} (pass {pass_name}): {reason}"
    if getattr(node.target, "namespace", None) == "lmforge" and node.target not in COMPILED_LMFORGE_OPS:
        return f"lmforge::{_op_name(node.target)}: no lowering to aten"
    return None


def refuse_on_cpp(graph_module: fx.GraphModule) -> None:
    """One LmforgeError naming the first op of the graph the `cpp` backend cannot compile,
    the pass that put it there and why (`CPP_REFUSED`)."""
    for node in graph_module.graph.nodes:
        reason = refusal(node)
        if reason is not None:
            raise LmforgeError(f"codegen backend cpp has no kernel for {reason}; use backend aten for this recipe")


def _op_name(target) -> str:
    schema = getattr(target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else getattr(target, "__name__", str(target))
