"""CPU kernel selection for the `aten` backend: a graph copy that calls faster oneDNN
kernels for the same arithmetic. The Program, and the weights an artifact saves, stay as
they are; only the callable the runtime executes changes.

Packed linear weights: every linear layer's fp32 weight is reordered once into oneDNN's
blocked layout and multiplied by `mkldnn::_linear_pointwise`, including the linear layers
inside `torch.cond` branches (dynamic `ffn_skip`), whose weights arrive as operands. At
batch 1 the weights stream from DRAM every step (28 MB for ref-llama-py, more than this
machine's cache holds); the plain matrix-vector product runs on one thread at ~9 GB/s, the packed one on
every core, and a few-row verify forward no longer repacks the weights on every call.
Measured on ref-llama-py's 33 weights per step (benchmarks/decode.py): 3.2 → 1.2–1.6 ms
at one row, 4.2 → 1.9–2.8 ms at 11 rows. Results differ from the plain product by float
rounding (~1e-5); the `verify` pass checks greedy tokens as usual. The packed copy is held
beside the plain weights, so the linear weights take twice their size in memory.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from lmforge.codegen.cpu_quantized import select_quantized_kernels

aten = torch.ops.aten


def can_pack_weights() -> bool:
    return torch.backends.mkldnn.is_available()


def _packable(weight: torch.Tensor) -> bool:
    return can_pack_weights() and weight.dtype == torch.float32 and weight.ndim == 2 and weight.device.type == "cpu"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> F.linear(x, weight, bias)` on a packed copy of the weight where it can be
    packed (for the weights the runtime multiplies outside the program: Hydra heads)."""
    if not _packable(weight):
        return lambda x: F.linear(x, weight, bias)
    packed = _pack(weight)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def select_cpu_kernels(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of `graph_module` with packed linear weights and kernels for weights stored in
    a low precision (`cpu_quantized.py`); the same graph where this torch build has no oneDNN."""
    graph = copy.deepcopy(graph_module.graph)
    selected = fx.GraphModule(graph_module, graph)
    if can_pack_weights():
        select_quantized_kernels(selected)
    pack_linear_weights(selected)
    graph.eliminate_dead_code()
    selected.recompile()
    return selected


def _attribute(module: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = functools.reduce(getattr, node.target.split("."), module)
    return value if isinstance(value, torch.Tensor) else None


def _packed_attribute(module: fx.GraphModule, weight_node: fx.Node, before: fx.Node) -> fx.Node:
    """A `get_attr` (inserted before `before`) of the packed copy of `weight_node`'s weight,
    registered on `module` once however many nodes read it."""
    name = f"{weight_node.target.replace('.', '_')}_packed"
    if not hasattr(module, name):
        module.register_buffer(name, _pack(_attribute(module, weight_node)))
    with module.graph.inserting_before(before):
        return module.graph.get_attr(name)


def _to_packed_call(node: fx.Node, packed_weight: fx.Node) -> None:
    bias = node.args[2] if len(node.args) > 2 else None
    node.target = torch.ops.mkldnn._linear_pointwise.default
    node.args = (node.args[0], packed_weight, bias, "none", [], "")


def _only_linear_weight(placeholder: fx.Node) -> bool:
    return all(user.target is aten.linear.default and user.args[1] is placeholder and placeholder not in user.args[::2]
               for user in placeholder.users)


def _pack_branch_weights(module: fx.GraphModule, cond: fx.Node) -> None:
    """Pack the weights a `torch.cond` hands its branches (dynamic `ffn_skip`): inside a
    branch they are placeholders, not attributes, so the packed copy is made at the call
    site from the operand's top-level attribute, and copies of both branches multiply it
    with `mkldnn::_linear_pointwise`. An operand is packed only if every branch uses it as
    a linear weight and nothing else."""
    predicate, on_true, on_false, operands = cond.args
    branches = [functools.reduce(getattr, node.target.split("."), module) for node in (on_true, on_false)]
    inputs = [[node for node in branch.graph.nodes if node.op == "placeholder"] for branch in branches]
    chosen = [
        index for index, operand in enumerate(operands)
        if (weight := _attribute(module, operand)) is not None and _packable(weight)
        and all(_only_linear_weight(placeholders[index]) for placeholders in inputs)
        and any(placeholders[index].users for placeholders in inputs)
    ]
    if not chosen:
        return
    targets = []
    for branch_node, branch in zip((on_true, on_false), branches):
        graph = copy.deepcopy(branch.graph)
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        for index in chosen:
            for user in list(placeholders[index].users):
                _to_packed_call(user, placeholders[index])
        name = f"{branch_node.target.replace('.', '_')}_packed"
        module.add_module(name, fx.GraphModule(branch, graph))
        targets.append(name)
    with module.graph.inserting_before(cond):
        on_true, on_false = (module.graph.get_attr(name) for name in targets)
    operands = list(operands)
    for index in chosen:
        operands[index] = _packed_attribute(module, operands[index], cond)
    cond.args = (predicate, on_true, on_false, tuple(operands))


def pack_linear_weights(module: fx.GraphModule) -> None:
    """Point every `aten.linear` whose weight is a 2-D fp32 CPU attribute, in the graph or
    in a `torch.cond` branch it calls, at `mkldnn::_linear_pointwise` on a packed copy of
    that weight (in place on `module`; the branch modules it calls are replaced by copies)."""
    for node in list(module.graph.nodes):
        if node.target is torch.ops.higher_order.cond:
            _pack_branch_weights(module, node)
            continue
        if node.target is not aten.linear.default:
            continue
        weight = _attribute(module, node.args[1])
        if weight is None or not _packable(weight):
            continue
        _to_packed_call(node, _packed_attribute(module, node.args[1], node))
