"""LayerMap: per decoder layer, which graph nodes play which role.

Roles are read once from `nn_module_stack` at capture and stored on each node in
`node.meta["custom"]` (which torch.export keeps through save and load); passes that create
nodes call `set_role`, so the map can be rebuilt after any rewrite or after loading an
artifact, without the original module tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from lmforge.compiler.architectures import ArchitectureSpec
from lmforge.compiler.ops import ATTENTION_OPS, attention

LAYER_KEY = "lmforge_layer"
ROLE_KEY = "lmforge_role"
PROJECTION_ROLES = ("q", "k", "v", "o", "qkv")
_MATMUL_TARGETS = {
    torch.ops.aten.linear.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.matmul.default,
}


@dataclass
class LayerEntry:
    """The nodes of one decoder layer, by role."""

    index: int
    attention: fx.Node | None = None
    projections: dict[str, fx.Node] = field(default_factory=dict)
    ffn: list[fx.Node] = field(default_factory=list)
    norms: list[fx.Node] = field(default_factory=list)
    residual_adds: list[fx.Node] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "attention": self.attention.name if self.attention is not None else None,
            "projections": {role: node.name for role, node in self.projections.items()},
            "ffn_nodes": len(self.ffn),
            "norm_nodes": len(self.norms),
            "residual_adds": [node.name for node in self.residual_adds],
        }


LayerMap = list[LayerEntry]


def role_of(node: fx.Node) -> tuple[int | None, str | None]:
    custom = node.meta.get("custom") or {}
    return custom.get(LAYER_KEY), custom.get(ROLE_KEY)


def set_role(node: fx.Node, layer: int, role: str) -> None:
    custom = dict(node.meta.get("custom") or {})
    custom[LAYER_KEY], custom[ROLE_KEY] = layer, role
    node.meta["custom"] = custom


def _module_path(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, module_type = list(stack.values())[-1]
    type_name = module_type if isinstance(module_type, str) else module_type.__name__
    return path, type_name


def _role_in_layer(relative: str, type_name: str, node: fx.Node, spec: ArchitectureSpec) -> str:
    head, _, rest = relative.partition(".")
    if node.target in ATTENTION_OPS:
        return "attention"
    if "norm" in type_name.lower():
        return "norm"
    if head == spec.attention:
        names = {spec.q: "q", spec.k: "k", spec.v: "v", spec.o: "o", spec.qkv: "qkv"}
        role = names.get(rest.split(".")[0]) if rest else None
        if role is not None and node.target in _MATMUL_TARGETS:
            return role
        return "attention_other"
    if head in spec.ffn:
        return "ffn"
    if relative == "" and node.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
        return "residual_add"
    return "layer_other"


def annotate_roles(graph_module: fx.GraphModule, spec: ArchitectureSpec) -> None:
    """Tag nodes captured from HF modules with their layer index and role."""
    layer_pattern = re.compile(rf"(?:^|\.){re.escape(spec.layers)}\.(\d+)(?:\.(.*))?$")
    for node in graph_module.graph.nodes:
        if role_of(node)[1] is not None:
            continue
        found = _module_path(node)
        match = layer_pattern.search(found[0]) if found else None
        if match is None:
            continue
        set_role(node, int(match.group(1)), _role_in_layer(match.group(2) or "", found[1], node, spec))


def build_layer_map(graph_module: fx.GraphModule, spec: ArchitectureSpec, num_layers: int) -> LayerMap:
    """Read the per-layer roles off the graph (annotating it first if needed)."""
    annotate_roles(graph_module, spec)
    layers = [LayerEntry(index=i) for i in range(num_layers)]
    for node in graph_module.graph.nodes:
        index, role = role_of(node)
        if index is None:
            continue
        entry = layers[index]
        if role == "attention":
            entry.attention = node
        elif role in PROJECTION_ROLES:
            entry.projections[role] = node
        elif role == "ffn":
            entry.ffn.append(node)
        elif role == "norm":
            entry.norms.append(node)
        elif role == "residual_add":
            entry.residual_adds.append(node)
    return layers


def plain_attention_layers(layers: LayerMap, layout: list[dict], *, own_cache: bool, windowed: bool) -> list[int]:
    """Layers whose attention is still the plain `lmforge::attention` op, which the passes
    that swap in a sibling op can rewrite. `own_cache`: only layers on a cache slot no other
    layer reads and no pass changed the kind of (a shared or merged slot cannot be split or
    evicted per layer); `windowed`: sliding-window layers count too."""
    chosen = []
    for entry in layers:
        node = entry.attention
        if node is None or node.target is not attention or (not windowed and node.args[5] > 0):
            continue
        slot = layout[entry.index]
        if own_cache and (slot["cache"] != entry.index or "kind" in slot
                          or sum(other["cache"] == entry.index for other in layout) > 1):
            continue
        chosen.append(entry.index)
    return chosen

