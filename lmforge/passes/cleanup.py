"""`cleanup`: remove what export leaves in the graph that the runtime does not need.

torch.export keeps input guards and tensor-metadata assertions, and HF modelling code
leaves casts to the dtype a tensor already has and multiplications by 1.0. At this model
size a decode step costs per operator, so each of these is real time. The pass then runs
common-subexpression and dead-code elimination.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import fx

from lmforge.compiler.layermap import role_of
from lmforge.compiler.ops import ATTENTION_OPS
from lmforge.compiler.program import RUNTIME_CHECKS, Program
from lmforge.passes.base import Pass, PassConfig, PassContext, PassResult, register_pass

aten = torch.ops.aten

_NEVER_MERGED = set(ATTENTION_OPS)
Allow = Callable[[fx.Node, str], bool]


class CleanupConfig(PassConfig):
    remove_checks: bool = Field(True, description="drop export's tensor-metadata and shape assertions")
    fold_identities: bool = Field(True, description="replace same-dtype casts, x*1.0 and aliases by x")
    cse: bool = Field(True, description="merge identical pure computations")


def _value(node: fx.Node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _identity_source(node: fx.Node) -> fx.Node | None:
    """The input `node` merely passes through, or None if it does real work."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, out, src = node.args[0], _value(node), _value(node.args[0])
    if node.target is aten.alias.default:
        return source
    if node.target in (aten.mul.Tensor, aten.div.Tensor) and len(node.args) == 2 and node.args[1] == 1.0:
        return source if out is not None and src is not None and out.dtype == src.dtype else None
    if node.target in (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default):
        if node.kwargs.get("copy") or (len(node.args) > 3 and node.args[-1] is True):
            return None
        same = out is not None and src is not None
        same = same and (out.dtype, out.device, out.layout) == (src.dtype, src.device, src.layout)
        return source if same else None
    return None


def _remove_checks(graph: fx.Graph, allow: Allow) -> int:
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in RUNTIME_CHECKS and allow(node, "remove check"):
            graph.erase_node(node)
            removed += 1
    return removed


def _fold_identities(graph: fx.Graph, allow: Allow) -> int:
    folded = 0
    for node in list(graph.nodes):
        source = _identity_source(node)
        if source is not None and allow(node, f"fold identity {node.name}"):
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            folded += 1
    return folded


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    return value


def _eliminate_common_subexpressions(graph: fx.Graph, allow: Allow) -> int:
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target in _NEVER_MERGED or node.is_impure():
            continue
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        try:
            hash(key)
        except TypeError:
            continue
        if key in seen and allow(node, f"merge {node.name} into {seen[key].name}"):
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        elif key not in seen:
            seen[key] = node
    return merged


@register_pass("cleanup")
class Cleanup(Pass):
    description = "dead-code and common-subexpression elimination; drops export assertions and no-op casts"
    Config = CleanupConfig

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        graph, counts = program.graph_module.graph, {}

        def allow(node: fx.Node, what: str) -> bool:
            return ctx.allow_rewrite(self.name, what, role_of(node)[0])

        if self.config.remove_checks:
            counts["checks_removed"] = _remove_checks(graph, allow)
        if self.config.fold_identities:
            counts["identities_folded"] = _fold_identities(graph, allow)
        if self.config.cse:
            counts["subexpressions_merged"] = _eliminate_common_subexpressions(graph, allow)
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        program.drop_unused_weights()
        counts["dead_nodes_removed"] = before - len(graph.nodes)
        rewrites = sum(count for name, count in counts.items() if name != "dead_nodes_removed")  # DCE follows from them
        return PassResult(rewrites=rewrites, measurements=counts)
