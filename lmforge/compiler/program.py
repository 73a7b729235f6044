"""Program: the one IR every stage hands to the next.

A Program is an FX GraphModule taking `(input_ids, position_ids)` and returning logits,
with weights as module attributes, plus the LayerMap, the HF config, `meta` (what passes
decided, under documented keys) and `history` (one record per applied pass).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from lmforge.compiler.architectures import spec_for
from lmforge.compiler.layermap import LayerMap, build_layer_map

RUNTIME_CHECKS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten.sym_constrain_range.default,
}


def attribute_name(qualified: str) -> str:
    """Flat attribute name of a weight: its HF state-dict name with dots as double
    underscores, so `getattr` is one lookup per weight per call, not a module walk."""
    return qualified.replace(".", "__")


def plain_graph_module(module: fx.GraphModule, prefix: str = "model.") -> fx.GraphModule:
    """Strip export's pytree calling convention: positional tensors in, one logits tensor
    out; weights become flat buffers (inference needs no Parameters or autograd) named
    after their HF state-dict keys. They share storage with the source model, so passes
    replace weights (`Program.add_weight`) and never modify them in place."""
    graph = module.graph
    root = torch.nn.Module()
    for node in list(graph.nodes):
        if node.op == "call_module":
            graph.erase_node(node)  # export's input guards: the runtime controls the inputs
            continue
        if node.op != "get_attr":
            continue
        value = _get_tensor(module, node.target)
        name = attribute_name(node.target.removeprefix(prefix))
        if isinstance(value, fx.GraphModule):  # a torch.cond branch
            root.add_module(name, value)
        else:
            root.register_buffer(name, value.detach())
        node.target = name
    graph.set_codegen(fx.CodeGen())
    output = graph.output_node()
    result = output.args[0]
    while isinstance(result, (tuple, list)):
        (result,) = result
    output.args = (result,)
    plain = fx.GraphModule(root, graph)
    plain.recompile()
    return plain


def _get_tensor(module: torch.nn.Module, target: str) -> torch.Tensor:
    owner_path, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return getattr(owner, name)


@dataclass
class Program:
    graph_module: fx.GraphModule
    layers: LayerMap
    config: Any
    meta: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    drafter: dict[str, torch.Tensor] = field(default_factory=dict)  # Hydra heads' weights, run by the runtime

    def node_count(self) -> int:
        return len(self.graph_module.graph.nodes)

    def op_count(self) -> int:
        """Operators the program runs: calls, not placeholders, constants or tuple indexing."""
        return sum(
            node.op in ("call_function", "call_method", "call_module") and node.target is not operator.getitem
            for node in self.graph_module.graph.nodes
        )

    def refresh(self) -> None:
        """Recompile the graph and rebuild the LayerMap after a rewrite."""
        self.graph_module.graph.lint()
        self.graph_module.recompile()
        self.layers = build_layer_map(self.graph_module, spec_for(self.config), self.meta["num_layers"])

    def add_weight(self, name: str, tensor: torch.Tensor) -> str:
        """Register a new constant on the graph module; returns its attribute name."""
        self.graph_module.register_buffer(name, tensor.detach().contiguous())
        return name

    def eliminate_dead_code(self) -> None:
        """Dead-code elimination that also drops export's runtime checks of values nothing
        else reads: FX keeps those checks (they have side effects), and they would keep a
        removed projection or FFN alive. Random ops count as pure: in an inference graph
        they are dropouts in eval mode, which would otherwise keep dead FFNs alive too."""
        graph = self.graph_module.graph
        while True:
            orphaned = [
                node for node in graph.nodes
                if node.target in RUNTIME_CHECKS and node.args and isinstance(node.args[0], fx.Node)
                and all(user.target in RUNTIME_CHECKS for user in node.args[0].users)
            ]
            for node in orphaned:
                graph.erase_node(node)
            if not graph.eliminate_dead_code(lambda node: node.is_impure(impure_random=False)) and not orphaned:
                return

    def drop_unused_weights(self) -> int:
        """Delete constants no get_attr node reads any more, so they leave the artifact."""
        used = {node.target for node in self.graph_module.graph.nodes if node.op == "get_attr"}
        unused = [name for name, _ in self.graph_module.named_buffers() if name not in used]
        for name in unused:
            delattr(self.graph_module, name)
        return len(unused)

    def clone(self) -> Program:
        """A Program with a copy of the graph that shares the weight tensors: how a pass
        tries a candidate rewrite and measures it without touching the original."""
        graph = copy.deepcopy(self.graph_module.graph)
        graph_module = fx.GraphModule(self.graph_module, graph)
        return Program(graph_module, build_layer_map(graph_module, spec_for(self.config), self.meta["num_layers"]),
                       self.config, copy.deepcopy(self.meta), list(self.history), dict(self.drafter))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.graph_module.state_dict().items()}

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The base model's logits (without what a `draft_heads` pass adds to the output)."""
        return split_output(self.graph_module(input_ids, position_ids), self.meta.get("speculation"))[0]


def final_hidden_state(program: Program) -> fx.Node:
    """The LM head's input (the last hidden state) when the output is a plain projection,
    else the output itself: what distillation of a program's last layer compares."""
    result = program.graph_module.graph.output_node().args[0]
    if isinstance(result, fx.Node) and result.target is torch.ops.aten.linear.default:
        return result.args[0]
    return result


def draft_head_count(speculation: dict | None) -> int:
    """How many draft heads a program's `meta["speculation"]` says it has."""
    return (speculation or {}).get("draft_heads", {}).get("count", 0)


def split_output(output: torch.Tensor, speculation: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(base logits, what the drafter needs): a program returns `(batch, seq, vocab)`; with
    Medusa heads `(batch, seq, 1 + heads, vocab)`, base logits first, then the heads' logits;
    with Hydra heads or an EAGLE drafter `(batch, seq, vocab + hidden)`, the logits then the
    last hidden state the runtime's drafter drafts from."""
    heads = (speculation or {}).get("draft_heads") or {}
    if not heads:
        return output, None
    if heads.get("kind") in ("hydra", "eagle"):
        vocab = heads["vocab_size"]
        return output[..., :vocab], output[..., vocab:]
    return output[..., 0, :], output[..., 1:, :]
