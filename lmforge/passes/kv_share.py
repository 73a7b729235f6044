"""`kv_share`: layers that reuse an earlier layer's keys and values (cross-layer KV sharing).

Layers are partitioned into contiguous groups; the first layer of a group (the producer)
computes keys and values as before, the others (consumers) attend with the producer's.
The rewrite points each consumer's attention op at the producer's key/value tensors and
cache slot, so the consumer's K/V projections (and K norm, and RoPE on K) become dead and
are removed with their weights, and the runtime allocates one cache per group: the KV bytes
really shrink. The consumer's op writes the producer's keys into the shared slot a second
time; those are the same values, and skipping the write would need a second op variant for
a copy this small.

Modes:
- `explicit`: the groups the recipe gives.
- `auto`: greedy on calibration text. Each round tries merging a group into the one before
  it, for the candidates whose producer/consumer keys and values are most similar, measures
  each candidate's real quality cost, and keeps the cheapest while the budget holds
  (`calibrate.greedy_search`, which also confirms the result on the held-out split).
- `merge`: MiniCache — adjacent pairs keep computing their own keys and values but store
  one merged cache (`passes/kv_merge.py`); pairs given or chosen greedily under the budget.
  Merged caches decode differently from a forward of several tokens, so this mode and a
  draft source refuse each other (`compiler/speculation_rules.py`).
- `heal` (auto or explicit): a short distillation fine-tune of the producers' K/V projections
  toward the original model's next-token distribution, with quality reported before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from lmforge.compiler.kv_layout import kv_cache_bytes
from lmforge.compiler.program import Program
from lmforge.compiler.speculation_rules import refuse_if_drafting
from lmforge.errors import LmforgeError
from lmforge.passes.base import PassConfig, PassContext, PassResult, register_pass
from lmforge.passes.calibrate import (
    CalibrationData,
    LossyPass,
    Quality,
    QualityBudget,
    SearchResult,
    enforce_budget,
    full_logits,
    greedy_search,
    node_values,
)
from lmforge.passes.kv_merge import check_pairs, merge_pairs, retain_thresholds
from lmforge.training import train

Groups = list[list[int]]


class HealConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, ge=1, description="fine-tuning steps (one calibration batch each)")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate")
    batch: int = Field(4, ge=1, description="calibration windows per step")
    checkpoint: str | None = Field(None, description="safetensors file to checkpoint to and resume from")
    also_train: list[Literal["q", "o"]] = Field(
        [], description="projections of every layer in a shared group trained too, besides the producers' k and v"
    )


class KVShareConfig(PassConfig):
    mode: Literal["auto", "explicit", "merge"] = Field(
        "auto", description="auto: choose groups under the budget; explicit: use `groups`; merge: MiniCache-style merged caches"
    )
    groups: list[list[int]] | None = Field(
        None, description="explicit mode: contiguous layer groups, e.g. [[0,1],[2,3]], the first layer of each produces "
        "the KV; merge mode: adjacent pairs to merge (default: chosen under the budget)"
    )
    protect: list[int] | None = Field(
        None, description="auto and merge modes: layers that keep their own KV (default: the first and the last)"
    )
    t: float = Field(0.6, ge=0, le=1, description="merge mode: SLERP fraction toward the second layer of a pair")
    retain_fraction: float = Field(
        0.05, ge=0, le=1, description="merge mode: share of token-heads kept unmerged (the most divergent ones)"
    )
    candidates_per_round: int | None = Field(
        None, ge=1, description="auto mode: merges measured per round, the most K/V-similar first (default: all)"
    )
    quality_budget: QualityBudget | None = Field(None, description="overrides the recipe-wide quality_budget")
    heal: HealConfig | None = Field(None, description="distillation fine-tune of the producers' K/V projections")


def normalize_groups(groups: Groups, num_layers: int) -> Groups:
    """Check explicit groups (contiguous, disjoint, in range) and add singleton groups for
    the layers they leave out."""
    seen: set[int] = set()
    for group in groups:
        if not group or sorted(group) != list(range(group[0], group[0] + len(group))):
            raise LmforgeError(f"kv_share: group {group} must be a non-empty run of consecutive layers")
        for layer in group:
            if not 0 <= layer < num_layers:
                raise LmforgeError(f"kv_share: layer {layer} does not exist (the model has {num_layers} layers)")
            if layer in seen:
                raise LmforgeError(f"kv_share: layer {layer} is in two groups")
            seen.add(layer)
    full = [list(group) for group in groups] + [[layer] for layer in range(num_layers) if layer not in seen]
    return sorted(full)


def share_kv(program: Program, groups: Groups, allow: Callable[[int, int], bool] | None = None) -> int:
    """Rewrite `program` so every consumer attends with its group producer's keys and
    values (each consumer only if `allow(consumer, producer)`); returns the number of
    consumers rewired."""
    layout = program.meta["kv_cache"]
    rewired = 0
    for group in groups:
        producer = program.layers[group[0]]
        for layer in group[1:]:
            if allow is not None and not allow(layer, group[0]):
                continue
            consumer = program.layers[layer]
            if "qkv" in consumer.projections:
                raise LmforgeError(
                    f"kv_share: layer {layer} computes q, k and v with one fused projection "
                    f"({consumer.projections['qkv'].name}); run kv_share before fuse_projections, and note that "
                    f"architectures with a native fused QKV ({program.meta['architecture']}) are not supported"
                )
            if (layout[layer]["kv_heads"], layout[layer]["head_dim"]) != (layout[group[0]]["kv_heads"], layout[group[0]]["head_dim"]):
                raise LmforgeError(f"kv_share: layers {group[0]} and {layer} have different KV shapes")
            q, _, _, _, *options = consumer.attention.args
            _, key, value, cache_index, *_ = producer.attention.args
            consumer.attention.args = (q, key, value, cache_index, *options)
            layout[layer]["cache"] = layout[group[0]]["cache"]
            rewired += 1
    program.eliminate_dead_code()
    program.drop_unused_weights()
    program.refresh()
    return rewired


def kv_similarity(program: Program, input_ids: torch.Tensor) -> list[list[float]]:
    """Mean cosine similarity of keys and values between every pair of layers (per token
    and KV head, averaged over keys and values); -1 where shapes differ."""
    attention = [entry.attention for entry in program.layers]
    values = node_values(program, input_ids, [node.args[i] for node in attention for i in (1, 2)])
    kv = [(values[node.args[1].name], values[node.args[2].name]) for node in attention]
    size = len(kv)
    matrix = [[1.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            if kv[i][0].shape != kv[j][0].shape:
                matrix[i][j] = matrix[j][i] = -1.0
                continue
            score = sum(F.cosine_similarity(kv[i][n], kv[j][n], dim=-1).mean().item() for n in (0, 1)) / 2
            matrix[i][j] = matrix[j][i] = round(score, 4)
    return matrix


def _trial(program: Program, groups: Groups, data: CalibrationData, split: str) -> Quality:
    trial = program.clone()
    share_kv(trial, groups)
    return data.program_quality(trial, split)


def _merge(groups: Groups, index: int) -> Groups:
    return groups[: index - 1] + [groups[index - 1] + groups[index]] + groups[index + 1 :]


def heal(program: Program, data: CalibrationData, config: HealConfig, ctx: PassContext) -> dict:
    """Fine-tune the producers' K/V projections (plus, as configured, the query and output
    projections of every layer in a shared group) to minimise KL(original ‖ program) on
    the calibration split; the weights are replaced, never modified in place (they may
    share storage with the user's model)."""
    layout = program.meta["kv_cache"]
    producers = {entry["cache"] for entry in layout if entry["cache"] != entry["layer"]}
    members = {entry["layer"] for entry in layout if entry["cache"] in producers}
    targets = [(layer, role) for layer in sorted(producers) for role in ("k", "v")]
    targets += [(layer, role) for layer in sorted(members) for role in config.also_train]
    params: dict[str, torch.Tensor] = {}
    for layer, role in targets:
        node = program.layers[layer].projections[role]
        for arg in node.args[1:]:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                trainable = getattr(program.graph_module, arg.target).detach().clone().requires_grad_(True)
                setattr(program.graph_module, arg.target, trainable)
                params[arg.target] = trainable
    ids = data.ids("calibration")
    reference = data.reference_logprobs("calibration")
    generator = torch.Generator().manual_seed(0)

    def loss_fn(step: int) -> torch.Tensor:
        rows = torch.randint(0, ids.shape[0], (config.batch,), generator=generator)
        logprobs = full_logits(program, ids[rows]).float().log_softmax(-1)
        return F.kl_div(logprobs, reference[rows], log_target=True, reduction="none").sum(-1).mean()

    run = train(params, loss_fn, steps=config.steps, lr=config.lr, checkpoint=config.checkpoint,
                progress=ctx.progress, description="kv_share heal")
    for name, tensor in params.items():
        program.add_weight(name, tensor.detach())
    program.refresh()
    return {"trained": sorted(params), "resumed_from": run.resumed_from, "steps_run": run.steps_run,
            "first_loss": run.losses[0] if run.losses else None, "last_loss": run.losses[-1] if run.losses else None}


@register_pass("kv_share")
class KVShare(LossyPass):
    description = "layers reuse an earlier layer's KV cache (fewer K/V projections, smaller cache); lossy"
    Config = KVShareConfig
    provides = ("kv_share",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        if "streaming_heads" in program.meta:
            raise LmforgeError("kv_share: run kv_share before streaming_heads; a cache split into retrieval and "
                               "streaming heads cannot be shared or merged (streaming_heads leaves shared layers whole)")
        if config.mode == "merge":
            refuse_if_drafting(program.meta, "kv_share merge")
        data, budget = self.calibration_and_budget(ctx)
        num_layers = program.meta["num_layers"]
        similarity = kv_similarity(program, data.ids("calibration")[:2])
        if config.mode == "merge":
            return self._merge_mode(program, data, budget, similarity, ctx)
        notes: list[str] = []
        trials: list[dict] = []
        if config.mode == "explicit":
            if not config.groups:
                raise LmforgeError("kv_share: mode explicit needs `groups`, e.g. groups: [[0, 1], [2, 3]]")
            groups = normalize_groups(config.groups, num_layers)
        else:
            search = self._search(program, data, budget, similarity, ctx)
            groups, trials, notes = search.chosen, search.trials, search.notes
        kv_before = len({entry["cache"] for entry in program.meta["kv_cache"]})
        rewired = share_kv(
            program, groups,
            lambda layer, producer: ctx.allow_rewrite(self.name, f"layer {layer} reads layer {producer}'s KV", layer),
        )
        quality = data.program_quality(program)
        measurements = {
            "groups": groups,
            "kv_slots_before": kv_before,
            "kv_slots_after": len(groups),
            "similarity": similarity,
            "trials": trials,
            "heldout_quality": quality.as_dict(),
        }
        if config.heal is not None and rewired:
            measurements["heal"] = heal(program, data, config.heal, ctx)
            healed = data.program_quality(program)
            measurements["heldout_quality_before_heal"] = measurements["heldout_quality"]
            measurements["heldout_quality"] = healed.as_dict()
            notes.append(f"heal: {quality.describe()} → {healed.describe()}")
            quality = healed
        notes += enforce_budget(self.name, quality, budget, f"groups {groups}")
        program.meta["kv_share"] = {"groups": groups, "heldout_quality": quality.as_dict()}
        notes.append(f"{kv_before} → {len(groups)} KV caches; held-out {quality.describe()}")
        return PassResult(rewrites=rewired, notes=tuple(notes), measurements=measurements)

    def _merge_mode(self, program: Program, data: CalibrationData, budget: QualityBudget | None,
               similarity: list[list[float]], ctx: PassContext) -> PassResult:
        config, num_layers = self.config, program.meta["num_layers"]
        calibration_ids = data.ids("calibration")[:2]

        known: dict[tuple[int, ...], float] = {}

        def thresholds_for(pairs: Groups) -> list[float]:
            """Each pair's retention angle, measured once: merging other pairs does not
            change the keys and values of a cache-free forward."""
            missing = [pair for pair in pairs if tuple(pair) not in known]
            if missing:
                measured = retain_thresholds(program, calibration_ids, missing, config.retain_fraction, config.t)
                known.update(zip(map(tuple, missing), measured))
            return [known[tuple(pair)] for pair in pairs]

        def merged(pairs: Groups) -> Program:
            trial = program.clone()
            merge_pairs(trial, pairs, config.t, config.retain_fraction, thresholds_for(pairs))
            return trial

        notes, trials = [], []
        if config.groups is not None:
            pairs = sorted(list(pair) for pair in config.groups)
            check_pairs(program, pairs)
        else:
            protected = set(config.protect if config.protect is not None else (0, num_layers - 1))

            def neighbours(chosen: Groups) -> list[Groups]:
                used = {layer for pair in chosen for layer in pair} | protected
                options = [[a, a + 1] for a in range(num_layers - 1) if a not in used and a + 1 not in used]
                options.sort(key=lambda pair: -similarity[pair[0]][pair[1]])
                return [sorted(chosen + [pair]) for pair in options[: config.candidates_per_round]]

            search = greedy_search(self.name, [], neighbours, lambda pairs, split: data.program_quality(merged(pairs), split),
                                   lambda pairs: f"merged pairs {pairs}", budget,
                                   lambda steps: ctx.report("kv_share: choosing pairs to merge", steps, num_layers // 2))
            pairs, trials, notes = search.chosen, search.trials, search.notes
        before = kv_cache_bytes(program.meta["kv_cache"], 2048)
        thresholds = thresholds_for(pairs)
        done = merge_pairs(program, pairs, config.t, config.retain_fraction, thresholds,
                           lambda layer: ctx.allow_rewrite(self.name, f"merge layers {layer - 1} and {layer}", layer))
        quality = data.program_quality(program)
        after = kv_cache_bytes(program.meta["kv_cache"], 2048)
        notes += enforce_budget(self.name, quality, budget, f"merging {pairs}")
        notes.append(f"merged pairs {pairs}: KV bytes at 2048 tokens {before:,} → {after:,}; held-out decoding "
                     f"{quality.describe()}")
        program.meta["kv_share"] = {"mode": "merge", "groups": pairs, "t": config.t,
                                    "retain_fraction": config.retain_fraction, "heldout_quality": quality.as_dict()}
        return PassResult(rewrites=done, notes=tuple(notes), measurements={
            "groups": pairs, "retain_thresholds": thresholds, "kv_bytes_2048_before": before,
            "kv_bytes_2048_after": after, "similarity": similarity, "trials": trials, "heldout_quality": quality.as_dict(),
        })

    def _search(self, program: Program, data: CalibrationData, budget: QualityBudget | None,
                similarity: list[list[float]], ctx: PassContext) -> SearchResult[Groups]:
        num_layers = program.meta["num_layers"]
        protected = set(self.config.protect if self.config.protect is not None else (0, num_layers - 1))

        def neighbours(groups: Groups) -> list[Groups]:
            candidates = [
                index for index in range(1, len(groups))
                if not protected & set(groups[index]) and similarity[groups[index - 1][0]][groups[index][0]] > -1
            ]
            candidates.sort(key=lambda i: -similarity[groups[i - 1][0]][groups[i][0]])
            return [_merge(groups, index) for index in candidates[: self.config.candidates_per_round]]

        return greedy_search(
            self.name,
            [[layer] for layer in range(num_layers)],
            neighbours,
            lambda groups, split: _trial(program, groups, data, split),
            lambda groups: f"groups {groups}",
            budget,
            lambda steps: ctx.report("kv_share: choosing groups", steps, num_layers - 1),
        )
