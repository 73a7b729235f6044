"""`ffn_skip`: leave out feed-forward blocks whose effect on the residual stream is small.

Both modes find each layer's FFN block in the graph the same way: the residual add whose
other operand is computed, through the layer's FFN (and its norms), from the add's first
operand alone (`find_ffn_block`). Architectures whose FFN runs in parallel with attention
(GPT-NeoX, Phi, ...) have no such block and are refused with the reason.

- `static`: the add is replaced by its residual operand, so the block's nodes and weights
  leave the program. Which layers: the ones the recipe lists, or chosen greedily on
  calibration text by measured perplexity cost (`calibrate.greedy_search`) under the
  quality budget, first and last layers protected; the residual-stream cosine similarity
  across each FFN is reported beside the measured costs.
- `dynamic` (FFN-SkipLLM / SkipDecode style): during decoding, once the residual stream of
  a token stops turning across an FFN (cosine of its input and output >= `threshold`), the
  FFNs of the following layers in the region are skipped for that token; the first
  `warmup` decode steps and every prefill are computed in full. Each skippable block becomes
  a `torch.cond` on `lmforge::ffn_skip_gate` whose true branch copies the stream and whose
  false branch runs the FFN (weights passed as operands, so they stay ordinary program
  weights): a skipped FFN runs none of its operators. Skipped layers pass
  the stream through unchanged, so their cosine is 1 and skipping continues to the end of
  the region, as in FFN-SkipLLM. The threshold is chosen on calibration text by measuring
  teacher-forced decoding (`calibrate.decoded_logits`), since this mode changes nothing in
  a full-sequence forward. Verifying drafts runs several tokens per forward and so never
  skips: a draft source and this mode refuse each other (`compiler/speculation_rules.py`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import fx

from lmforge.compiler.layermap import role_of, set_role
from lmforge.compiler.ops import ATTENTION_OPS, ffn_skip_gate
from lmforge.compiler.program import RUNTIME_CHECKS, Program
from lmforge.compiler.speculation_rules import refuse_if_drafting
from lmforge.errors import LmforgeError
from lmforge.passes.base import PassConfig, PassContext, PassResult, register_pass
from lmforge.passes.calibrate import (
    CalibrationData,
    LossyPass,
    Quality,
    QualityBudget,
    enforce_budget,
    greedy_search,
    node_values,
)

DEFAULT_THRESHOLDS = (0.999, 0.998, 0.995, 0.993, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9)
_BODY_ROLES = ("ffn", "norm", "layer_other")


class FFNSkipConfig(PassConfig):
    mode: Literal["static", "dynamic"] = Field(
        "static", description="static: remove whole FFN blocks; dynamic: skip them per token while decoding"
    )
    layers: list[int] | None = Field(
        None,
        description="static: the layers whose FFN to remove (default: chosen under the budget); "
        "dynamic: the layers that may skip (default: all but the first two and the last)",
    )
    protect: list[int] | None = Field(
        None, description="static auto choice: layers never removed (default: the first and the last)"
    )
    threshold: float | None = Field(
        None, gt=0, le=1,
        description="dynamic: cosine similarity at which the stream counts as converged (default: "
        "the lowest threshold in `thresholds` that meets the budget on calibration text)",
    )
    thresholds: list[float] = Field(
        list(DEFAULT_THRESHOLDS), description="dynamic: thresholds tried, from safest to most aggressive"
    )
    warmup: int = Field(4, ge=0, description="dynamic: decode steps computed in full before any skipping")
    quality_budget: QualityBudget | None = Field(None, description="overrides the recipe-wide quality_budget")


@dataclass
class FFNBlock:
    """One layer's FFN block: `add = stream + f(stream)` with `body` computing f(stream)
    from `stream` and `weights` (the weights and any symbolic sizes it reads)."""

    layer: int
    stream: fx.Node
    add: fx.Node
    body: list[fx.Node]
    weights: list[fx.Node]


def _is_shape_value(node: fx.Node) -> bool:
    """A symbolic size computed outside the layer (export reads shapes off the inputs for
    the views inside an FFN): an input of the block, like a weight."""
    return node.op == "call_function" and isinstance(node.meta.get("val"), (int, torch.SymInt))


def _body_from(add: fx.Node, stream: fx.Node, branch: fx.Node, layer: int) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """The nodes computing `branch` from `stream` and weights alone, or None if `branch`
    depends on anything else (another layer, the attention, the inputs)."""
    body, weights, pending = set(), set(), [branch]
    while pending:
        node = pending.pop()
        if node is stream or node in body or node in weights:
            continue
        if node.op == "get_attr" or _is_shape_value(node):
            weights.add(node)
            continue
        node_layer, role = role_of(node)
        if node.op != "call_function" or node_layer != layer or role not in _BODY_ROLES or node.target in ATTENTION_OPS:
            return None
        body.add(node)
        pending.extend(node.all_input_nodes)
    if not any(role_of(node)[1] == "ffn" for node in body):
        return None
    body |= {user for node in body for user in node.users if user.target in RUNTIME_CHECKS}
    if any(user not in body and user is not add for node in body for user in node.users):
        return None
    order = {node: i for i, node in enumerate(add.graph.nodes)}
    return sorted(body, key=order.get), sorted(weights, key=order.get)


def find_ffn_block(program: Program, layer: int) -> FFNBlock:
    """Locate `layer`'s sequential FFN residual block, or explain why there is none."""
    for add in reversed(program.layers[layer].residual_adds):
        if len(add.args) != 2 or not all(isinstance(arg, fx.Node) for arg in add.args):
            continue
        for stream, branch in (add.args, add.args[::-1]):
            found = _body_from(add, stream, branch, layer)
            if found is not None:
                return FFNBlock(layer, stream, add, *found)
    raise LmforgeError(
        f"ffn_skip: layer {layer} of this {program.meta['architecture']} model has no sequential FFN block "
        "(a residual add of the stream and an FFN computed from it alone); architectures that run "
        "attention and FFN in parallel on the same input (GPT-NeoX, Phi, GPT-J) are not supported"
    )


def ffn_convergence(program: Program, input_ids: torch.Tensor) -> dict[int, float]:
    """Mean cosine similarity of the residual stream before and after each layer's FFN:
    the FFN-SkipLLM signal (close to 1: the FFN barely changes the stream)."""
    blocks = [find_ffn_block(program, layer) for layer in range(program.meta["num_layers"])]
    values = node_values(program, input_ids, [node for block in blocks for node in (block.stream, block.add)])
    return {
        block.layer: round(F.cosine_similarity(values[block.stream.name].float(), values[block.add.name].float(), dim=-1)
                           .mean().item(), 5)
        for block in blocks
    }


def remove_ffns(program: Program, layers: list[int]) -> int:
    """Static rewrite: each listed layer's FFN add becomes its residual operand."""
    for layer in layers:
        block = find_ffn_block(program, layer)
        block.add.replace_all_uses_with(block.stream)
        program.graph_module.graph.erase_node(block.add)
    program.eliminate_dead_code()
    program.drop_unused_weights()
    program.refresh()
    program.meta["ffn_skip"] = {"mode": "static", "layers": sorted(layers)}
    return len(layers)


def _branch_module(block: FFNBlock, skipped: bool) -> fx.GraphModule:
    """The FFN (stream + f(stream)) or the skip (a copy of the stream: cond's branches may
    not return their own inputs) as a graph whose inputs are the stream and the weights."""
    graph = fx.Graph()
    env = {block.stream: graph.placeholder("stream")}
    for weight in block.weights:
        env[weight] = graph.placeholder(weight.name)
    if skipped:
        result = graph.call_function(
            torch.ops.aten.clone.default, (env[block.stream],), {"memory_format": torch.contiguous_format}
        )
    else:
        for node in block.body + [block.add]:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
        result = env[block.add]
    graph.output((result,))
    return fx.GraphModule(torch.nn.Module(), graph)


def make_dynamic(program: Program, layers: list[int], threshold: float, warmup: int) -> int:
    """Dynamic rewrite: each listed layer's FFN block becomes a `torch.cond` gated on the
    convergence of the stream across the FFN before it."""
    graph = program.graph_module.graph
    blocks = {layer: find_ffn_block(program, layer) for layer in sorted(set(layers) | {layer - 1 for layer in layers})}
    outputs = {layer: block.add for layer, block in blocks.items()}
    for layer in sorted(layers):
        block, previous = blocks[layer], blocks[layer - 1]
        names = [f"ffn_skip_{layer}_compute", f"ffn_skip_{layer}_skip"]
        for name, skipped in zip(names, (False, True)):
            program.graph_module.add_submodule(name, _branch_module(block, skipped))
        with graph.inserting_before(block.add):
            gate = graph.call_function(ffn_skip_gate, (previous.stream, outputs[layer - 1], threshold, warmup, layer))
            compute, skip = (graph.get_attr(name) for name in names)
            cond = graph.call_function(torch.ops.higher_order.cond, (gate, skip, compute, (block.stream, *block.weights)))
            result = graph.call_function(operator.getitem, (cond, 0))
        for node in (gate, cond, result):
            set_role(node, layer, "ffn_gate" if node is gate else "ffn")
        block.add.replace_all_uses_with(result)
        outputs[layer] = result
    program.eliminate_dead_code()
    program.refresh()
    program.meta["ffn_skip"] = {"mode": "dynamic", "layers": sorted(layers), "threshold": threshold, "warmup": warmup}
    return len(layers)


def _static_trial(program: Program, layers: list[int], data: CalibrationData, split: str) -> Quality:
    trial = program.clone()
    remove_ffns(trial, layers)
    return data.program_quality(trial, split)


def _dynamic_trial(program: Program, layers: list[int], threshold: float, warmup: int,
                   data: CalibrationData, split: str) -> tuple[Quality, float]:
    """Quality of teacher-forced decoding (decoded positions only) and the fraction of
    the region's (layer, token) FFN calls that were skipped."""
    trial = program.clone()
    make_dynamic(trial, layers, threshold, warmup)
    counts: dict[int, int] = {}
    quality = data.program_quality(trial, split, skip_counts=counts)
    windows, length = data.ids(split).shape
    batches = -(-windows // data.batch)
    return quality, sum(counts.values()) / (len(layers) * batches * (length - length // 2))


@register_pass("ffn_skip")
class FFNSkip(LossyPass):
    description = "remove FFN blocks (static) or skip them per decoded token once the stream converges (dynamic); lossy"
    Config = FFNSkipConfig
    provides = ("ffn_skip",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        if self.config.mode == "dynamic":
            refuse_if_drafting(program.meta, "ffn_skip dynamic")
        data, budget = self.calibration_and_budget(ctx)
        num_layers = program.meta["num_layers"]
        for layer in self.config.layers or []:
            if not 0 <= layer < num_layers:
                raise LmforgeError(f"ffn_skip: layer {layer} does not exist (the model has {num_layers} layers)")
        convergence = ffn_convergence(program, data.ids("calibration")[:2])
        if self.config.mode == "static":
            return self._static(program, data, budget, convergence, ctx)
        return self._dynamic(program, data, budget, convergence, ctx)

    def _static(self, program: Program, data: CalibrationData, budget: QualityBudget | None,
                convergence: dict[int, float], ctx: PassContext) -> PassResult:
        num_layers = program.meta["num_layers"]
        notes, trials = [], []
        if self.config.layers is not None:
            layers = sorted(set(self.config.layers))
        else:
            protected = set(self.config.protect if self.config.protect is not None else (0, num_layers - 1))
            search = greedy_search(
                self.name,
                [],
                lambda chosen: [sorted(chosen + [layer]) for layer in range(num_layers)
                                if layer not in chosen and layer not in protected],
                lambda chosen, split: _static_trial(program, chosen, data, split),
                lambda chosen: f"FFNs of layers {chosen}",
                budget,
                lambda steps: ctx.report("ffn_skip: choosing layers", steps, num_layers - len(protected)),
            )
            layers, trials, notes = search.chosen, search.trials, search.notes
        layers = [layer for layer in layers if ctx.allow_rewrite(self.name, f"remove layer {layer}'s FFN", layer)]
        removed = remove_ffns(program, layers)
        quality = data.program_quality(program)
        notes += enforce_budget(self.name, quality, budget, f"removing the FFNs of layers {layers}")
        notes.append(f"removed the FFNs of layers {layers}; held-out {quality.describe()}")
        program.meta["ffn_skip"]["heldout_quality"] = quality.as_dict()
        return PassResult(
            rewrites=removed,
            notes=tuple(notes),
            measurements={"layers": layers, "convergence": convergence, "trials": trials,
                          "heldout_quality": quality.as_dict()},
        )

    def _dynamic(self, program: Program, data: CalibrationData, budget: QualityBudget | None,
                 convergence: dict[int, float], ctx: PassContext) -> PassResult:
        num_layers = program.meta["num_layers"]
        layers = sorted(set(self.config.layers if self.config.layers is not None else range(2, num_layers - 1)))
        if not layers or layers[0] < 1:
            raise LmforgeError("ffn_skip dynamic: `layers` must be non-empty and exclude layer 0, whose FFN "
                               "gives the first convergence signal")
        for layer in layers:
            find_ffn_block(program, layer - 1)
        warmup, notes, trials = self.config.warmup, [], []
        candidates = [self.config.threshold] if self.config.threshold is not None else sorted(self.config.thresholds, reverse=True)
        passing = []
        for candidate in candidates:
            quality, skipped = _dynamic_trial(program, layers, candidate, warmup, data, "calibration")
            trials.append({"threshold": candidate, "skipped": round(skipped, 4), "calibration_quality": quality.as_dict()})
            if not quality.within(budget):
                break
            passing.append(candidate)
        while passing:
            threshold = passing[-1]
            quality, skipped = _dynamic_trial(program, layers, threshold, warmup, data, "heldout")
            if quality.within(budget):
                break
            notes.append(f"threshold {threshold} met the budget on calibration text but not on held-out text; undone")
            passing.pop()
        if not passing:
            threshold = candidates[0]
            quality, skipped = _dynamic_trial(program, layers, threshold, warmup, data, "heldout")
            notes += enforce_budget(self.name, quality, budget, f"the safest threshold, {threshold},")
        layers = [layer for layer in layers if ctx.allow_rewrite(self.name, f"gate layer {layer}'s FFN", layer)]
        make_dynamic(program, layers, threshold, warmup)
        notes.append(f"layers {layers} skip their FFN once the stream converges (cosine >= {threshold}); "
                     f"held-out decoding skipped {skipped:.1%} of their FFN calls, {quality.describe()}")
        program.meta["ffn_skip"].update(heldout_quality=quality.as_dict(), heldout_skipped=round(skipped, 4))
        return PassResult(
            rewrites=len(layers),
            notes=tuple(notes),
            measurements={"layers": layers, "threshold": threshold, "convergence": convergence, "trials": trials,
                          "heldout_quality": quality.as_dict(), "heldout_skipped": round(skipped, 4)},
        )
