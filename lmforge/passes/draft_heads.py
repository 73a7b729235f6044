"""`draft_heads`: fuse trained Medusa heads into the Program (recipe: `{name: draft_heads, path: DIR}`).

The heads read the LM head's input, so the pass finds the final projection and adds, beside
it, one fused GEMM for every head's first layer, the residual SiLU, and the heads' output
projections. The program then returns `(batch, seq, 1 + heads, vocab)`: index 0 is the
base model's logits, unchanged (the pass is lossless), the rest the heads'. `meta` records
the head count so `Program.__call__` and the runtime split them; the runtime drafts the
heads' top-1 chain when prompt lookup has nothing (`runtime/speculative.py`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from lmforge.compiler.program import Program
from lmforge.draft_heads import load_heads
from lmforge.errors import LmforgeError
from lmforge.passes.base import Pass, PassConfig, PassContext, PassResult, register_pass

aten = torch.ops.aten


class DraftHeadsConfig(PassConfig):
    path: str = Field(description="directory written by `lmforge train-heads` (heads.safetensors + heads.json)")
    tree: list[int] | None = Field(
        None, description="greedy decoding at batch 1: verify a tree with the top-k of each head (e.g. [3, 2, 1]) "
        "instead of the heads' top-1 chain"
    )


def _final_projection(program: Program) -> torch.fx.Node:
    result = program.graph_module.graph.output_node().args[0]
    if not (isinstance(result, torch.fx.Node) and result.target is aten.linear.default and result.args[1].op == "get_attr"):
        raise LmforgeError("draft_heads: the program's output is not a plain LM-head projection (a final soft-cap or "
                           "scaling follows it); heads for this architecture are not supported")
    return result


@register_pass("draft_heads")
class DraftHeads(Pass):
    description = "add trained Medusa draft heads beside the LM head (one fused GEMM); lossless"
    Config = DraftHeadsConfig
    provides = ("draft_heads",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        if program.meta.get("speculation", {}).get("draft_heads"):
            raise LmforgeError("draft_heads: the program already has draft heads")
        projection = _final_projection(program)
        hidden, lm_head = projection.args[0], projection.args[1]
        heads, config = load_heads(self.config.path, getattr(program.graph_module, lm_head.target))
        graph = program.graph_module.graph
        names = [program.add_weight(f"draft_heads__{name}", tensor) for name, tensor in heads.tensors().items()]
        with graph.inserting_before(graph.output_node()):
            weight, bias, output = (graph.get_attr(name) for name in names)
            blocks = graph.call_function(aten.linear.default, (hidden, weight, bias))
            blocks = graph.call_function(aten.unflatten.int, (blocks, -1, [heads.count, heads.block_weight.shape[1]]))
            states = graph.call_function(aten.add.Tensor, (graph.call_function(aten.unsqueeze.default, (hidden, -2)),
                                                           graph.call_function(aten.silu.default, (blocks,))))
            head_logits = graph.call_function(aten.einsum.default, ("...kh,kvh->...kv", [states, output]))
            base = graph.call_function(aten.unsqueeze.default, (projection, -2))
            combined = graph.call_function(aten.cat.default, ([base, head_logits], -2))
        graph.output_node().args = (combined,)
        program.meta.setdefault("speculation", {})["draft_heads"] = {"count": heads.count, "kind": config["kind"],
                                                                     "tree": self.config.tree}
        agreement = config.get("heldout_agreement")
        return PassResult(rewrites=1, notes=(f"{heads.count} Medusa heads; held-out agreement with greedy {agreement}",),
                          measurements={"heads": heads.count, "heldout_agreement": agreement})
