"""`fuse_projections`: linears that read the same activation become one GEMM.

Attention's q/k/v projections and a gated FFN's gate/up projections all read the same
normalised hidden state. One linear over the concatenated weights, then a split, replaces
two or three: fewer operator launches per decode step (what dominates small models on
CPU) and one larger matrix multiply. The weights are concatenated once at compile time and
the originals leave the artifact.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from pydantic import Field
from torch import fx

from lmforge.compiler.layermap import role_of, set_role
from lmforge.compiler.program import Program
from lmforge.passes.base import Pass, PassConfig, PassContext, PassResult, register_pass

aten = torch.ops.aten
_ATTENTION_ROLES = {"q", "k", "v"}


class FuseProjectionsConfig(PassConfig):
    attention: bool = Field(True, description="fuse the q, k and v projections of each layer")
    ffn: bool = Field(True, description="fuse FFN projections that share an input (gate and up)")


def _weight_of(graph_module: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    """The constant a get_attr node reads (`_fusable_groups` admits only those), or None."""
    return None if node is None else getattr(graph_module, node.target)


def _fusable_groups(program: Program, config: FuseProjectionsConfig) -> list[list[fx.Node]]:
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        layer, role = role_of(node)
        wanted = (config.attention and role in _ATTENTION_ROLES) or (config.ffn and role == "ffn")
        weights_are_constants = all(
            arg is None or (isinstance(arg, fx.Node) and arg.op == "get_attr") for arg in node.args[1:3]
        )
        if layer is None or not wanted or not weights_are_constants:
            continue
        has_bias = len(node.args) > 2 and node.args[2] is not None
        kind = "attention" if role in _ATTENTION_ROLES else "ffn"
        groups[(layer, kind, node.args[0], has_bias)].append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def _fuse(program: Program, nodes: list[fx.Node]) -> None:
    module, graph = program.graph_module, program.graph_module.graph
    first = nodes[0]
    layer, role = role_of(first)
    weights = [_weight_of(module, n.args[1]) for n in nodes]
    biases = [_weight_of(module, n.args[2]) if len(n.args) > 2 else None for n in nodes]
    stem = first.args[1].target.rsplit("__", 2)[0]
    kind = "qkv" if role in _ATTENTION_ROLES else "ffn"
    weight_name = program.add_weight(f"{stem}__fused_{kind}__weight", torch.cat(weights, 0))
    bias_name = program.add_weight(f"{stem}__fused_{kind}__bias", torch.cat(biases, 0)) if biases[0] is not None else None
    sizes = [w.shape[0] for w in weights]
    with graph.inserting_before(first):
        weight = graph.get_attr(weight_name)
        bias = graph.get_attr(bias_name) if bias_name else None
        args = (first.args[0], weight) if bias is None else (first.args[0], weight, bias)
        fused = graph.call_function(aten.linear.default, args)
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(nodes))]
    for new in (weight, fused, split, *parts):
        new.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
    set_role(fused, layer, kind)
    for new in (split, *parts):
        set_role(new, layer, "attention_other" if kind == "qkv" else "ffn")
    for node, part in zip(nodes, parts):
        node.replace_all_uses_with(part)
        graph.erase_node(node)


@register_pass("fuse_projections")
class FuseProjections(Pass):
    description = "one GEMM for q/k/v and one for gate/up; removes the separate weights"
    Config = FuseProjectionsConfig

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        groups = [
            nodes for nodes in _fusable_groups(program, self.config)
            if ctx.allow_rewrite(self.name, f"fuse {', '.join(n.name for n in nodes)}", role_of(nodes[0])[0])
        ]
        for nodes in groups:
            _fuse(program, nodes)
        program.graph_module.graph.eliminate_dead_code()
        removed = program.drop_unused_weights()
        fused = sum(len(nodes) for nodes in groups)
        return PassResult(
            rewrites=len(groups),
            measurements={"groups": len(groups), "linears_fused": fused, "weights_removed": removed},
        )
