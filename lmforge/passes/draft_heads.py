"""`draft_heads`: add trained Medusa or Hydra heads or an EAGLE drafter to the Program (recipe: `{name: draft_heads, path: DIR}`).

The heads read the LM head's input, so the pass finds the final projection and adds, beside
it, one fused GEMM for every head's first layer, the residual SiLU, and the heads' output
projections. The program then returns `(batch, seq, 1 + heads, vocab)`: index 0 is the
base model's logits, unchanged (the pass is lossless), the rest the heads'. `meta` records
the head count so `Program.__call__` and the runtime split them; the runtime drafts the
heads' top-1 chain when prompt lookup has nothing (`runtime/speculative.py`).

Hydra heads depend on the token drafted before them, so they cannot run inside the forward
that verifies: the program instead returns the hidden state beside the logits, the heads'
weights travel with the Program (`Program.drafter`, `drafter.safetensors` in an artifact),
and the runtime drafts their chain at the last accepted position only. An EAGLE drafter
(`lmforge.eagle`) travels the same way; the runtime feeds it the hidden state of every
accepted position (its own one-layer KV cache) and it drafts a chain, or with `dynamic_tree` a tree
shaped by its own confidence (`runtime/eagle_tree.py`), verified by the same tree attention.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from lmforge.compiler.kv_layout import allocate_kv_buffers
from lmforge.compiler.layermap import role_of
from lmforge.compiler.ops import (
    ATTENTION_OPS,
    AttentionContext,
    attention,
    attention_context,
    sparse_attention,
    tree_attention,
)
from lmforge.compiler.placement import graph_device
from lmforge.compiler.program import Program
from lmforge.compiler.speculation_rules import check_draft_source
from lmforge.draft_heads import HydraHeads, MedusaHeads, load_heads
from lmforge.eagle import EagleDrafter
from lmforge.errors import LmforgeError
from lmforge.passes.base import Pass, PassConfig, PassContext, PassResult, register_pass

aten = torch.ops.aten


class TypicalAcceptanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(0.09, gt=0, le=1, description="probability above which a draft token is always kept")
    delta: float = Field(0.3, gt=0, description="scale of the entropy-adaptive threshold delta * exp(-entropy)")


class DynamicTreeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget: int | Literal["auto"] = Field(
        "auto", description="draft nodes verified per forward (at most 64); auto: the budget with the most expected tokens "
        "per second, from the drafter's held-out tree acceptance per budget (recorded by train-heads) and verify "
        "latencies measured here")
    top_k: int = Field(4, ge=1, le=8, description="children per expanded node, and nodes expanded per depth")
    threshold: float | None = Field(
        None, ge=0, le=1, description="stop expanding once the best frontier node's cumulative confidence is below this; "
        "default: the threshold train-heads measured on held-out text and stored with the drafter (else 0)")
    max_depth: int | None = Field(None, ge=1, le=16, description="deepest draft; default: the drafter's trained depth")


class DraftHeadsConfig(PassConfig):
    path: str = Field(description="directory written by `lmforge train-heads` (heads.safetensors + heads.json): "
                      "Medusa or Hydra heads, or an EAGLE drafter")
    tree: list[int] | Literal["auto"] | None = Field(
        None, description="greedy decoding: verify a tree (one per batch row) with the top-k of each head (e.g. [3, 2, 1]) "
        "instead of the heads' top-1 chain; auto: the tree with the best expected tokens per second, from the heads' "
        "measured per-rank hit rates and verify latencies measured here"
    )
    dynamic_tree: DynamicTreeConfig | None = Field(
        None, description="EAGLE drafter: verify a dynamic tree (EAGLE-2) shaped by the drafter's "
        "confidence instead of its chain (sampled decoding verifies it by recursive rejection sampling, exact)"
    )
    typical_acceptance: TypicalAcceptanceConfig | None = Field(
        None, description="sampled decoding, opt-in and approximate: Medusa's typical acceptance instead of the exact "
        "rejection rule, for every draft (heads or lookup)"
    )


def _final_projection(program: Program) -> torch.fx.Node:
    result = program.graph_module.graph.output_node().args[0]
    if not (isinstance(result, torch.fx.Node) and result.target is aten.linear.default and result.args[1].op == "get_attr"):
        raise LmforgeError("draft_heads: the program's output is not a plain LM-head projection (a final soft-cap or "
                           "scaling follows it); heads for this architecture are not supported")
    return result


@register_pass("draft_heads")
class DraftHeads(Pass):
    description = "add trained Hydra or Medusa draft heads (Medusa: beside the LM head, one fused GEMM); lossless"
    Config = DraftHeadsConfig
    provides = ("draft_heads",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        if program.meta.get("speculation", {}).get("draft_heads"):
            raise LmforgeError("draft_heads: the program already has draft heads")
        projection = _final_projection(program)
        hidden, lm_head = projection.args[0], projection.args[1]
        heads, config = load_heads(self.config.path, getattr(program.graph_module, lm_head.target))
        check_draft_source(program.meta, heads.count, self.name)
        if isinstance(heads, EagleDrafter) and self.config.tree is not None:
            raise LmforgeError("draft_heads: an eagle drafter shapes its own tree; use `dynamic_tree: {}` instead of `tree:`")
        if self.config.dynamic_tree is not None and not isinstance(heads, EagleDrafter):
            raise LmforgeError(f"draft_heads: dynamic_tree needs an eagle drafter; {self.config.path} holds "
                               f"{config['kind']} heads (use `tree:`)")
        if isinstance(heads, (HydraHeads, EagleDrafter)):
            _return_hidden_state(program, projection, hidden)
            program.drafter = heads.tensors()
        else:
            _fuse_medusa_heads(program, heads, projection, hidden)
        measurements = {"heads": heads.count, "heldout_agreement": config.get("heldout_agreement")}
        notes = [f"{heads.count} {config['kind'].capitalize()} heads; held-out agreement with greedy "
                 f"{measurements['heldout_agreement']}"]
        tree = self.config.tree
        if tree is not None:
            measurements["tree_attention_layers"] = use_tree_attention(program)
        if tree == "auto":
            tree, measurements["tree_candidates"] = choose_tree(program, config)
            notes.append(f"tree {tree} chosen from measured hit rates and verify latency")
        typical = self.config.typical_acceptance.model_dump() if self.config.typical_acceptance else None
        program.meta.setdefault("speculation", {})["draft_heads"] = {
            "count": heads.count, "kind": config["kind"], "vocab_size": config["vocab_size"], "tree": tree,
            "typical_acceptance": typical,
        }
        if isinstance(heads, EagleDrafter):
            program.meta["speculation"]["draft_heads"]["eagle"] = heads.shape.as_dict()
        if self.config.dynamic_tree is not None:
            measurements["tree_attention_layers"] = use_tree_attention(program)
            dynamic, measurements["budget_candidates"] = choose_dynamic_tree(program, self.config.dynamic_tree, heads.depth,
                                                                             config)
            check_draft_source(program.meta, dynamic["budget"], self.name)
            program.meta["speculation"]["draft_heads"]["eagle_tree"] = dynamic
            notes.append(f"dynamic tree {dynamic}")
        return PassResult(rewrites=1, notes=tuple(notes), measurements=measurements)


def _fuse_medusa_heads(program: Program, heads: MedusaHeads, projection: torch.fx.Node, hidden: torch.fx.Node) -> None:
    """Medusa heads beside the LM head: one GEMM for every head's first layer, one einsum
    for their outputs; the program returns (B, T, 1 + heads, V)."""
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


def _return_hidden_state(program: Program, projection: torch.fx.Node, hidden: torch.fx.Node) -> None:
    """For Hydra heads, which draft after the base model chose its token and so run in the
    runtime at one position per step: the program returns (B, T, V + H), the logits and the
    hidden state they were computed from."""
    graph = program.graph_module.graph
    with graph.inserting_before(graph.output_node()):
        combined = graph.call_function(aten.cat.default, ([projection, hidden], -1))
    graph.output_node().args = (combined,)


def use_tree_attention(program: Program) -> int:
    """Swap every `attention` op for `tree_attention`, which also honours the ancestor mask
    of a draft tree; an attention op another pass made that cannot verify trees is refused."""
    swapped = 0
    for node in program.graph_module.graph.nodes:
        if node.target not in ATTENTION_OPS or node.target in (tree_attention, sparse_attention):
            continue
        if node.target is not attention:
            layer = role_of(node)[0]
            raise LmforgeError(f"draft_heads tree: layer {layer} uses {node.target.name()}, which cannot verify a tree "
                               "of drafts; draft a chain (no `tree:`) with this program")
        node.target = tree_attention
        swapped += 1
    program.refresh()
    return swapped


TREE_CANDIDATES = ([1], [1, 1], [1, 1, 1], [2, 1, 1], [2, 2, 1], [3, 2, 1], [3, 3, 2], [4, 2, 2], [4, 3, 2])


def expected_accepted(widths: list[int], hits: list[list[float]]) -> float:
    """Expected drafted tokens a tree accepts if heads hit independently: depth d is
    reached when every level above it caught the model's token in its top `widths`."""
    expected, reach = 0.0, 1.0
    for depth, width in enumerate(widths):
        reach *= sum(hits[depth][:width])
        expected += reach
    return expected


def verify_seconds(program: Program, nodes: int, prefix: int = 64, repeats: int = 5) -> float:
    """Median time of one forward verifying `nodes` tokens after a cached prefix."""
    layout = program.meta["kv_cache"]
    device = graph_device(program.graph_module)
    buffers = allocate_kv_buffers(layout, 1, prefix + nodes, getattr(torch, program.meta["dtype"]), device)
    ids = torch.zeros(1, prefix + nodes, dtype=torch.long, device=device)
    positions = torch.arange(prefix + nodes, device=device)[None]
    with torch.no_grad(), attention_context(AttentionContext(kv=buffers, start=0, q_len=prefix)):
        program(ids[:, :prefix], positions[:, :prefix])
    times = []
    for _ in range(repeats + 1):
        mask = torch.ones(nodes, nodes, dtype=torch.bool).tril()
        context = AttentionContext(kv=buffers, start=prefix, q_len=nodes, tree=mask)
        start = time.perf_counter()
        with torch.no_grad(), attention_context(context):
            program(ids[:, prefix:], positions[:, prefix:])
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def choose_tree(program: Program, config: dict) -> tuple[list[int], list[dict]]:
    """The candidate tree with the most expected tokens per second of verification."""
    hits = config.get("heldout_rank_hits")
    if not hits:
        raise LmforgeError("draft_heads tree: auto needs the heads' per-rank hit rates; retrain them with "
                           "`lmforge train-heads`, which records them in heads.json")
    candidates = []
    for widths in TREE_CANDIDATES:
        if len(widths) > len(hits) or max(widths) > len(hits[0]):
            continue
        nodes = 1 + sum(math.prod(widths[: depth + 1]) for depth in range(len(widths)))
        expected = expected_accepted(widths, hits)
        seconds = verify_seconds(program, nodes)
        candidates.append({"tree": widths, "nodes": nodes, "expected_accepted": round(expected, 4),
                           "verify_ms": round(seconds * 1e3, 3), "tokens_per_second": round((1 + expected) / seconds, 1)})
    best = max(candidates, key=lambda candidate: candidate["tokens_per_second"])
    return best["tree"], candidates


BUDGET_CANDIDATES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def choose_dynamic_tree(program: Program, options: DynamicTreeConfig, depth: int,
                        config: dict) -> tuple[dict, list[dict]]:
    """The EAGLE dynamic tree's options (`runtime.eagle_tree.DynamicTree`): the threshold and
    depth given or stored with the drafter, and the node budget given or, for auto, the one
    with the most expected tokens per second of verification — expected accepted drafts per
    budget measured on held-out text at train time, verify time measured here per width."""
    threshold = options.threshold if options.threshold is not None else float(config.get("tree_threshold") or 0.0)
    chosen = {"top_k": options.top_k, "threshold": threshold, "max_depth": options.max_depth or depth}
    if options.budget != "auto":
        if not 1 <= options.budget <= BUDGET_CANDIDATES[-1]:
            raise LmforgeError(f"draft_heads dynamic_tree: budget {options.budget} is outside "
                               f"1..{BUDGET_CANDIDATES[-1]}")
        return {**chosen, "budget": options.budget}, []
    measured = config.get("tree_accepted_per_budget")
    if not isinstance(measured, dict) or not measured:
        raise LmforgeError("draft_heads dynamic_tree: budget auto needs the drafter's held-out tree acceptance per "
                           "budget; retrain it with `lmforge train-heads --kind eagle` or give `budget:`")
    candidates = []
    for budget, expected in sorted((int(budget), float(value)) for budget, value in measured.items()):
        seconds = verify_seconds(program, budget + 1)
        candidates.append({"budget": budget, "expected_accepted": round(expected, 4),
                           "verify_ms": round(seconds * 1e3, 3), "tokens_per_second": round((1 + expected) / seconds, 1)})
    best = max(candidates, key=lambda candidate: candidate["tokens_per_second"])
    return {**chosen, "budget": best["budget"]}, candidates
