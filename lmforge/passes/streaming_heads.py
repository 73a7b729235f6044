"""`streaming_heads` (DuoAttention): most KV heads only need attention sinks and a recent window.

Each (layer, KV head) becomes a *retrieval* head (full cache) or a *streaming* head (the first
`sink` tokens plus the last `window`). The rewrite splits each layer's attention op by head
group: the retrieval heads stay on `lmforge::attention` with a cache slot of their own (fewer
heads), the streaming heads go to `lmforge::streaming_attention`, whose cache is a fixed-size
ring (`kv_layout.RingSlot`), and the outputs are put back in head order before the output
projection. Streaming heads' KV memory and decode attention cost stop growing with context;
their prefill is block-sparse (only the sink and window blocks are computed).

Which heads stream, ranked by one of two methods on the recipe's calibration text cut into
long windows (`seq_len`):

- `gates` (DuoAttention): a gate per KV head mixes full and streaming attention,
  `alpha * full + (1 - alpha) * streaming`; the gates are trained (model frozen) to keep the
  last hidden state equal to the full model's on long-range copy sequences (`long_range`),
  with an L1 push of the gates toward streaming. Heads whose gate ends lowest stream first.
- `attention_mass`: the share of each head's attention (queries past the window) that falls
  on the sinks and the window; heads with the most stream first. Cheaper, no training.

The recipe sets `streaming_fraction`, or a quality budget under which the largest fraction
(every head, 15/16, then steps of 1/8) is chosen on calibration windows and confirmed on held-out ones; quality
is scored on the predictions past the window, where streaming can change them. Decisions go
to `meta["streaming_heads"]` and the artifact's `attention_patterns.json`; `patterns:` reuses
a saved file's head scores (its fraction too, unless the recipe sets one or a budget), so a
second compile at another fraction trains nothing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import fx

from lmforge.compiler.attention_patterns import load_patterns
from lmforge.compiler.layermap import plain_attention_layers, set_role
from lmforge.compiler.ops import AttentionContext, attention, attention_context, streaming_attention
from lmforge.compiler.program import Program, final_hidden_state
from lmforge.compiler.sparse_patterns import streaming_allowed
from lmforge.errors import LmforgeError
from lmforge.passes.base import PassConfig, PassContext, PassResult, register_pass
from lmforge.passes.calibrate import (
    CalibrationData,
    LossyPass,
    Quality,
    QualityBudget,
    enforce_budget,
    full_logits,
    node_values,
)
from lmforge.passes.long_range import CopyTask, build_copy_task, copy_report
from lmforge.training import train

aten = torch.ops.aten
FRACTIONS = (1.0, 0.9375, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
HeadKinds = dict[int, list[bool]]  # layer -> per KV head: True = streaming


class StreamingHeadsConfig(PassConfig):
    streaming_fraction: float | None = Field(
        None, ge=0, le=1, description="share of KV heads made streaming (default: the largest that meets the budget)"
    )
    quality_budget: QualityBudget | None = Field(None, description="overrides the recipe-wide quality_budget")
    sink: int = Field(4, ge=0, description="attention-sink tokens every streaming head keeps")
    window: int = Field(256, ge=1, description="recent tokens every streaming head keeps")
    slack: int = Field(64, ge=0, description="extra ring entries for the tokens of one verification forward")
    method: Literal["gates", "attention_mass"] = Field(
        "gates", description="gates: DuoAttention's trained gates; attention_mass: share of attention in sink+window"
    )
    seq_len: int = Field(1024, ge=16, description="tokens per calibration window (well beyond sink + window)")
    samples: int = Field(8, ge=1, description="long calibration windows (head ranking and fraction choice)")
    eval_samples: int = Field(4, ge=1, description="long held-out windows (budget check, copy task)")
    gate_steps: int = Field(120, ge=1, description="gates: optimisation steps")
    gate_lr: float = Field(0.05, gt=0, description="gates: Adam learning rate")
    sparsity_weight: float = Field(0.05, ge=0, description="gates: weight of the L1 push toward streaming")
    checkpoint: str | None = Field(None, description="gates: safetensors file to checkpoint to and resume from")
    patterns: str | None = Field(
        None, description="reuse the head scores of an attention_patterns.json (or an artifact) made for this model"
    )


def _head_counts(program: Program, layer: int) -> tuple[int, int]:
    """Query and KV heads of a layer (from the config and the captured cache layout, which
    stay right whatever earlier passes did to the projections)."""
    return program.config.num_attention_heads, program.meta["kv_cache"][layer]["kv_heads"]


def _streaming_span(node: fx.Node, sink: int, window: int) -> tuple[int, int]:
    """The sink and window a layer's streaming heads use: a sliding-window layer already
    sees only its own window, so it keeps no sinks and the smaller window."""
    model_window = node.args[5]
    return (0, min(window, model_window)) if model_window > 0 else (sink, window)


def attention_mass(program: Program, ids: torch.Tensor, layers: list[int], sink: int, window: int) -> dict[int, list[float]]:
    """Per layer and KV head, the mean share of attention that queries past the window put
    on the sinks and the window (1.0: the head loses nothing by streaming)."""
    nodes = [program.layers[layer].attention for layer in layers]
    values = node_values(program, ids, [arg for node in nodes for arg in node.args[:2]])
    scores = {}
    for layer, node in zip(layers, nodes):
        q, k = values[node.args[0].name].float(), values[node.args[1].name].float()
        heads, kv_heads = q.shape[1], k.shape[1]
        layer_sink, layer_window = _streaming_span(node, sink, window)
        length = q.shape[2]
        first = min(layer_sink + layer_window, length - 1)
        slots = torch.arange(length)
        kept = streaming_allowed(slots[first:].view(-1, 1), slots.view(1, -1), 0, layer_sink, layer_window)
        causal = slots.view(1, -1) <= slots[first:].view(-1, 1)
        shares = []
        for row in range(q.shape[0]):
            keys = k[row].repeat_interleave(heads // kv_heads, dim=0)
            logits = torch.matmul(q[row, :, first:], keys.transpose(-1, -2)) * node.args[4]
            probabilities = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
            shares.append((probabilities * kept).sum(-1).mean(-1))
        per_head = torch.stack(shares).mean(0).view(kv_heads, -1).mean(-1)
        scores[layer] = [round(value, 5) for value in per_head.tolist()]
    return scores


def _gated_program(program: Program, layers: list[int], sink: int, window: int) -> tuple[Program, dict[int, torch.Tensor]]:
    """A copy of the program that returns the last hidden state and mixes, per KV head,
    full and streaming attention by a trainable gate (initialised at 1: full)."""
    trial = program.clone()
    graph = trial.graph_module.graph
    gates = {}
    for layer in layers:
        node = trial.layers[layer].attention
        q, k, v, cache_index, scale, _, softcap = node.args
        heads, kv_heads = _head_counts(trial, layer)
        gates[layer] = torch.nn.Parameter(torch.ones(kv_heads))
        trial.graph_module.register_parameter(f"duo_gate_{layer}", gates[layer])
        with graph.inserting_before(node.next):
            stream = graph.call_function(streaming_attention, (q, k, v, cache_index, *_streaming_span(node, sink, window),
                                                               scale, softcap))
            alpha = graph.call_function(aten.clamp.default, (graph.get_attr(f"duo_gate_{layer}"), 0.0, 1.0))
            alpha = graph.call_function(aten.repeat_interleave.self_int, (alpha, heads // kv_heads))
            alpha = graph.call_function(aten.view.default, (alpha, [1, 1, heads, 1]))
            difference = graph.call_function(aten.sub.Tensor, (node, stream))
            mixed = graph.call_function(aten.add.Tensor, (stream, graph.call_function(aten.mul.Tensor, (alpha, difference))))
        node.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not difference)
    graph.output_node().args = (final_hidden_state(trial),)
    trial.eliminate_dead_code()
    trial.graph_module.recompile()
    return trial, gates


def _hidden(graph_module: fx.GraphModule, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with attention_context(AttentionContext(kv=None, start=0, q_len=ids.shape[1])):
        return graph_module(ids, positions)


def train_gates(program: Program, task: CopyTask, layers: list[int], config: StreamingHeadsConfig,
                ctx: PassContext) -> tuple[dict[int, list[float]], list[float]]:
    """DuoAttention's gate optimisation on copy-task sequences: match the full model's last
    hidden state on the answer span (normalised MSE) + `sparsity_weight` * mean gate."""
    trial, gates = _gated_program(program, layers, config.sink, config.window)
    reference_program = program.clone()
    reference_program.graph_module.graph.output_node().args = (final_hidden_state(reference_program),)
    reference_program.eliminate_dead_code()
    reference_program.graph_module.recompile()
    answer = slice(-(task.cue + task.answer), None)
    with torch.no_grad():
        targets = [_hidden(reference_program.graph_module, row[None])[:, answer] for row in task.ids]
    scale = torch.stack([target.float().var() for target in targets]).mean().clamp_min(1e-8)

    def loss_fn(step: int) -> torch.Tensor:
        row = step % len(targets)
        hidden = _hidden(trial.graph_module, task.ids[row : row + 1])[:, answer]
        distill = F.mse_loss(hidden.float(), targets[row].float()) / scale
        sparsity = torch.cat([gate.clamp(0, 1) for gate in gates.values()]).mean()
        return distill + config.sparsity_weight * sparsity

    run = train({f"gate_{layer}": gate for layer, gate in gates.items()}, loss_fn, steps=config.gate_steps,
                lr=config.gate_lr, checkpoint=config.checkpoint, progress=ctx.progress,
                description="streaming_heads: training head gates")
    return {layer: [round(value, 5) for value in gate.detach().clamp(0, 1).tolist()] for layer, gate in gates.items()}, \
        run.losses


def rank_heads(scores: dict[int, list[float]], higher_streams: bool) -> list[tuple[int, int]]:
    """(layer, KV head) pairs, the best streaming candidates first."""
    pairs = [(layer, head) for layer, values in scores.items() for head in range(len(values))]
    return sorted(pairs, key=lambda pair: (-scores[pair[0]][pair[1]] if higher_streams else scores[pair[0]][pair[1]]))


def kinds_for(ranking: list[tuple[int, int]], scores: dict[int, list[float]], fraction: float) -> HeadKinds:
    count = round(fraction * len(ranking))
    kinds = {layer: [False] * len(values) for layer, values in scores.items()}
    for layer, head in ranking[:count]:
        kinds[layer][head] = True
    return kinds


def _index(program: Program, name: str, values: list[int]) -> fx.Node:
    program.add_weight(name, torch.tensor(values, dtype=torch.long))
    return program.graph_module.graph.get_attr(name)


def split_heads(program: Program, kinds: HeadKinds, sink: int, window: int, slack: int,
                allow=lambda layer: True) -> int:
    """Rewrite each layer with streaming heads: retrieval heads keep `attention` on their own
    (smaller) slot, streaming heads use `streaming_attention` on a ring slot."""
    graph, layout, num_layers = program.graph_module.graph, program.meta["kv_cache"], program.meta["num_layers"]
    rewritten = 0
    for layer, streaming in sorted(kinds.items()):
        if not any(streaming) or not allow(layer):
            continue
        node = program.layers[layer].attention
        q, k, v, cache_index, scale, model_window, softcap = node.args
        heads, kv_heads = _head_counts(program, layer)
        groups = heads // kv_heads
        layer_sink, layer_window = _streaming_span(node, sink, window)
        stream_heads = [head for head in range(kv_heads) if streaming[head]]
        keep_heads = [head for head in range(kv_heads) if not streaming[head]]
        ring = num_layers + layer
        with graph.inserting_before(node):
            if not keep_heads:
                result = graph.call_function(streaming_attention, (q, k, v, ring, layer_sink, layer_window, scale, softcap))
                created, outputs = [result], [result]
            else:
                outputs, created = [], []
                for group, target in ((keep_heads, attention), (stream_heads, streaming_attention)):
                    tag = "retrieval" if target is attention else "streaming"
                    query_index = _index(program, f"streaming_heads__{layer}_{tag}_q",
                                         [head * groups + j for head in group for j in range(groups)])
                    kv_index = _index(program, f"streaming_heads__{layer}_{tag}_kv", group)
                    selected = [graph.call_function(aten.index_select.default, (tensor, 1, index))
                                for tensor, index in ((q, query_index), (k, kv_index), (v, kv_index))]
                    arguments = (cache_index, scale, model_window, softcap) if target is attention else \
                        (ring, layer_sink, layer_window, scale, softcap)
                    outputs.append(graph.call_function(target, (*selected, *arguments)))
                    created += [query_index, kv_index, *selected]
                order = [head * groups + j for head in keep_heads + stream_heads for j in range(groups)]
                inverse = _index(program, f"streaming_heads__{layer}_order", sorted(range(heads), key=order.__getitem__))
                joined = graph.call_function(aten.cat.default, (outputs, 2))
                result = graph.call_function(aten.index_select.default, (joined, 2, inverse))
                created += [*outputs, inverse, joined, result]
        primary = outputs[0] if keep_heads else result  # the LayerMap's attention: the retrieval op if any
        for new in created:
            set_role(new, layer, "attention" if new is primary else "attention_other")
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        layout[layer]["kv_heads"] = len(keep_heads)
        layout[layer]["streaming"] = {"cache": ring, "kv_heads": len(stream_heads), "head_dim": layout[layer]["head_dim"],
                                      "sink": layer_sink, "window": layer_window,
                                      "capacity": layer_sink + layer_window + slack}
        rewritten += 1
    program.refresh()
    return rewritten


def streaming_quality(program: Program, data: CalibrationData, split: str, sink: int, window: int) -> Quality:
    """Quality on the predictions past sink + window (before them streaming is exact)."""
    return data.quality(lambda ids: full_logits(program, ids), split, from_position=sink + window)


@register_pass("streaming_heads")
class StreamingHeads(LossyPass):
    description = "DuoAttention: retrieval heads keep the full cache, streaming heads keep sinks + a window; lossy"
    Config = StreamingHeadsConfig
    provides = ("streaming_heads",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        data, budget = self.calibration_and_budget(ctx)
        if config.seq_len <= config.sink + config.window:
            raise LmforgeError(f"streaming_heads: seq_len {config.seq_len} must exceed sink + window = "
                               f"{config.sink + config.window}, or streaming changes nothing it can measure")
        long = data.at_length(config.seq_len, config.samples, config.eval_samples)
        layers = plain_attention_layers(program.layers, program.meta["kv_cache"], own_cache=True, windowed=True)
        notes = []
        skipped = sorted(set(range(program.meta["num_layers"])) - set(layers))
        if skipped:
            notes.append(f"layers {skipped} keep every head (their cache is shared or merged, or attention was rewritten)")
        measurements: dict = {}
        if config.patterns is not None:
            saved = load_patterns(config.patterns, program.meta, program.config).get("streaming_heads")
            if saved is None:
                raise LmforgeError(f"streaming_heads: {config.patterns} holds no streaming_heads decisions")
            method, default_fraction = saved["method"], saved["fraction"]
            scores = {int(layer): values for layer, values in saved["scores"].items() if int(layer) in layers}
        else:
            method, default_fraction = config.method, 0.5
            if method == "gates":
                task = build_copy_task(long.ids("calibration"))
                scores, losses = train_gates(program, task, layers, config, ctx)
                measurements["gate_losses"] = [round(loss, 5) for loss in losses[:: max(1, len(losses) // 20)]]
            else:
                scores = attention_mass(program, long.ids("calibration"), layers, config.sink, config.window)
        ranking = rank_heads(scores, higher_streams=method == "attention_mass")
        trials = []

        def measure(fraction: float, split: str) -> Quality:
            trial = program.clone()
            split_heads(trial, kinds_for(ranking, scores, fraction), config.sink, config.window, config.slack)
            return streaming_quality(trial, long, split, config.sink, config.window)

        if config.streaming_fraction is not None or budget is None:
            chosen = config.streaming_fraction if config.streaming_fraction is not None else default_fraction
        else:
            chosen = FRACTIONS[-1]  # when nothing fits: the smallest step, which enforce_budget judges below
            for fraction in FRACTIONS:
                quality = measure(fraction, "calibration")
                trials.append({"fraction": fraction, "calibration_quality": quality.as_dict()})
                ctx.report("streaming_heads: choosing the streaming fraction", len(trials), len(FRACTIONS))
                if not quality.within(budget):
                    continue
                if measure(fraction, "heldout").within(budget):
                    chosen = fraction
                    break
                notes.append(f"fraction {fraction} met the budget on calibration text but not on held-out text")
        kinds = kinds_for(ranking, scores, chosen)
        kinds = {layer: values for layer, values in kinds.items()
                 if ctx.allow_rewrite(self.name, f"stream heads {[h for h, s in enumerate(values) if s]}", layer)}
        rewritten = split_heads(program, kinds, config.sink, config.window, config.slack)
        quality = streaming_quality(program, long, "heldout", config.sink, config.window)
        copy_task = build_copy_task(long.ids("heldout"))
        copy = copy_report(copy_task, lambda ids: data.reference(ids).logits, lambda ids: full_logits(program, ids),
                           "streaming")
        notes += enforce_budget(self.name, quality, budget, f"streaming {chosen:.0%} of the KV heads")
        total = sum(len(values) for values in scores.values())
        streamed = sum(sum(values) for values in kinds.values())
        notes.append(f"{streamed} of {total} KV heads stream (sink {config.sink}, window {config.window}); held-out "
                     f"past the window: {quality.describe()}; copy task accuracy {copy['streaming']:.3f} "
                     f"(dense {copy['dense']:.3f}, dense without the copied source {copy['dense_without_source']:.3f})")
        program.meta["streaming_heads"] = {
            "method": method,
            "source": config.patterns,
            "fraction": chosen,
            "sink": config.sink,
            "window": config.window,
            "kinds": {str(layer): values for layer, values in kinds.items()},
            "scores": {str(layer): values for layer, values in scores.items()},
            "heldout_quality": quality.as_dict(),
            "copy_accuracy": {key: round(value, 4) for key, value in copy.items()},
        }
        measurements.update(trials=trials, heldout_quality=quality.as_dict(), copy_accuracy=copy, scores=scores)
        return PassResult(rewrites=rewritten, notes=tuple(notes), measurements=measurements)
