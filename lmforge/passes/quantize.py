"""`quantize`: store linear and embedding weights in a lower precision.

At batch 1 a decode step reads every weight once, so bytes per weight bound its speed on a
CPU; storing fewer of them is the direct lever, if a kernel reads the stored format
(`codegen/cpu_quantized.py`). Formats (`compiler/quantized.py`): `bf16`, `fp16`, `int8`
per output channel, `int4` per group of `group_size` input columns with a zero point. Every
2-D weight used only as a linear layer's weight or as an embedding table is converted — the
LM head and the token embeddings included, since they are often the largest — except those
`skip` names; norms and biases stay fp32.

How int8/int4 codes are chosen (`method`), from the linear inputs on calibration text:
`rtn` rounds to nearest; `awq` first scales input channels by their activation magnitude
(`compiler/awq.py`, the inverse folded into the preceding norm); `gptq` compensates each
column's rounding error on the columns after it (`compiler/gptq.py`). Embedding tables and
weights also read as embeddings (tied LM heads) have no linear input and are rounded to
nearest. `outliers` keeps that percentage of each weight's largest-magnitude entries exactly,
as a sparse fp32 correction (SpQR-style). `mixed_precision` measures each layer's
sensitivity and chooses int4, int8 or fp32 per layer until the quality budget is met.

The stored constants replace the fp32 weight in the program (and so in
`weights.safetensors`); the graph dequantizes them with ATen ops, which the aten backend
swaps for kernels on the stored format. The pass is lossy: it measures perplexity change,
top-1 agreement and KL on held-out text and honours the quality budget.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import fx

from lmforge.compiler.awq import fold_input_scales, search_clip, search_scales
from lmforge.compiler.gptq import gptq_quantize
from lmforge.compiler.layermap import role_of, set_role
from lmforge.compiler.program import Program
from lmforge.compiler.quantized import (
    QuantizedWeight,
    cast_weight,
    dequantize_nodes,
    quantize_int4,
    quantize_int8,
)
from lmforge.errors import LmforgeError
from lmforge.passes.base import PassConfig, PassContext, PassResult, register_pass
from lmforge.passes.calibrate import CalibrationData, LossyPass, Quality, QualityBudget, enforce_budget
from lmforge.passes.quantize_calibration import InputStatistics, choose_mixed_precision, input_statistics
from lmforge.passes.quantize_kv_cache import KVCacheQuantizeConfig, kv_cache_only_result, quantize_kv_cache

aten = torch.ops.aten
SKIP_ROLES = ("embedding", "lm_head", "attention", "ffn", "first", "last")
_ATTENTION_PROJECTIONS = ("q", "k", "v", "o", "qkv")
KEPT = "fp32"
Uses = list[tuple[int | None, str]]


class QuantizeConfig(PassConfig):
    weights: Literal["bf16", "fp16", "int8", "int4"] = Field(
        "int8", description="storage format of linear and embedding weights"
    )
    group_size: int = Field(32, ge=2, description="int4: input columns sharing one scale and zero point (even)")
    method: Literal["rtn", "awq", "gptq"] = Field(
        "rtn", description="int8/int4 codes: rtn (round to nearest), awq (activation-aware input scaling, then "
        "round to nearest) or gptq (second-order error compensation); awq and gptq read calibration text")
    outliers: float = Field(0.0, ge=0, le=10, description="int8/int4: percent of each weight's largest-magnitude "
                            "entries kept exactly as a sparse fp32 correction (SpQR-style)")
    skip: list[int | str] = Field(
        [], description=f"weights kept as they are: layer indices and/or roles ({', '.join(SKIP_ROLES)}; "
        "first and last are the first and last layers)"
    )
    mixed_precision: bool = Field(False, description="int4/int8: choose per layer (and LM head, embeddings) "
                                  "int4, int8 or fp32 by measured sensitivity until the quality budget is met")
    act_order: bool = Field(False, description="gptq: quantize columns in order of decreasing input energy")
    block_size: int = Field(128, ge=1, description="gptq: columns updated together")
    damp: float = Field(0.01, gt=0, description="gptq: fraction of the Hessian's mean diagonal added to it")
    awq_grid: int = Field(20, ge=1, description="awq: steps of the exponent search over [0, 1]")
    awq_clip: bool = Field(True, description="awq, int4: also search each group's clipping ratio (AWQ's auto_clip; "
                           "q and k projections unclipped)")
    kv_cache: KVCacheQuantizeConfig | None = Field(
        None, description="quantize the KV cache too (KIVI: {dtype: int8|fp8, granularity: kivi|token, residual, "
        "slack}); given without `weights`, only the cache is quantized")
    quality_budget: QualityBudget | None = Field(None, description="overrides the recipe-wide quality_budget")

    @model_validator(mode="after")
    def _integer_options(self) -> QuantizeConfig:
        integer = self.weights in ("int8", "int4")
        for option, used in (("method", self.method != "rtn"), ("outliers", self.outliers > 0),
                             ("mixed_precision", self.mixed_precision)):
            if used and not integer:
                raise ValueError(f"{option} applies to weights: int8 or int4, not {self.weights}")
        return self

    @field_validator("group_size")
    @classmethod
    def _even(cls, group_size: int) -> int:
        if group_size % 2:
            raise ValueError("group_size must be even (two 4-bit codes share a byte)")
        return group_size

    @field_validator("skip")
    @classmethod
    def _known_roles(cls, skip: list[int | str]) -> list[int | str]:
        for entry in skip:
            if isinstance(entry, str) and entry not in SKIP_ROLES:
                raise ValueError(f"unknown role {entry!r} in skip; valid: {', '.join(SKIP_ROLES)} or layer indices")
        return skip


def _use_of(node: fx.Node, weight: fx.Node) -> tuple[int | None, str] | None:
    """(layer, role) of a node reading `weight` as a linear weight or embedding table,
    None for any other use (which leaves the weight unquantized)."""
    if node.target is aten.linear.default and node.args[1] is weight and node.args[0] is not weight:
        layer, role = role_of(node)
        if layer is None:
            return None, "lm_head"
        return layer, "attention" if role in _ATTENTION_PROJECTIONS else role or "layer_other"
    if node.target is aten.embedding.default and node.args[0] is weight:
        return role_of(node)[0], "embedding"
    return None


def quantizable_weights(program: Program) -> dict[str, list[tuple[int | None, str]]]:
    """Every 2-D floating-point constant read only as linear weights or embedding tables,
    with the (layer, role) of each use."""
    module = program.graph_module
    found: dict[str, list[tuple[int | None, str]]] = {}
    refused: set[str] = set()
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(module, node.target, None)
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.dtype != torch.float32:
            continue
        uses = [_use_of(user, node) for user in node.users]
        if not uses or None in uses:
            refused.add(node.target)
            continue
        found.setdefault(node.target, []).extend(uses)
    return {name: uses for name, uses in found.items() if name not in refused}


def _skipped(uses: Uses, skip: list[int | str], num_layers: int) -> bool:
    layers = {entry for entry in skip if isinstance(entry, int)}
    layers |= {0} if "first" in skip else set()
    layers |= {num_layers - 1} if "last" in skip else set()
    return any(layer in layers or role in skip for layer, role in uses)


def outlier_mask(weight: torch.Tensor, percent: float) -> torch.Tensor | None:
    """The `percent` % largest-magnitude entries of `weight`, or None for none."""
    count = int(round(weight.numel() * percent / 100))
    if count == 0:
        return None
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[weight.detach().abs().view(-1).topk(count).indices] = True
    return mask.view(weight.shape)


def round_to_nearest(weight: torch.Tensor, fmt: str, group_size: int, outliers: float = 0.0) -> QuantizedWeight:
    """`weight` in `fmt` by round to nearest, its largest `outliers` % kept exactly."""
    if fmt in ("bf16", "fp16"):
        return cast_weight(weight, fmt)
    exact = outlier_mask(weight, outliers)
    keep = None if exact is None else ~exact
    quantized = quantize_int8(weight, keep) if fmt == "int8" else quantize_int4(weight, group_size, keep)
    return quantized if exact is None else quantized.with_outliers(weight, exact)


def _unit(uses: Uses) -> str:
    """The mixed-precision unit a weight belongs to: its layer, or its role outside layers."""
    layer, role = uses[0]
    return str(layer) if layer is not None else role


def replace_weight(program: Program, name: str, quantized: QuantizedWeight) -> None:
    """Register `quantized`'s constants and make every reader of weight `name` read their
    dequantization instead; the fp32 weight leaves the program."""
    module = program.graph_module
    graph = module.graph
    stored = {stored_name: program.add_weight(stored_name, tensor) for stored_name, tensor in quantized.tensors(name).items()}
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in [node for node in graph.nodes if node.op == "get_attr" and node.target == name]:
        first_user = min(node.users, key=order.get)
        layer, role = role_of(first_user)
        with graph.inserting_before(first_user):
            attributes = {stored_name.removeprefix(name): graph.get_attr(stored_name) for stored_name in stored}
            created = dequantize_nodes(graph, attributes, quantized)
        if layer is not None:
            for new_node in [*attributes.values(), *created]:
                set_role(new_node, layer, role)
        node.replace_all_uses_with(created[-1])
        graph.erase_node(node)
    if name not in stored:
        delattr(module, name)


def weight_bytes(program: Program) -> int:
    return sum(tensor.nbytes for tensor in program.state_dict().values())


def linear_readers(program: Program, names: set[str]) -> dict[str, list[fx.Node]]:
    """The linear nodes reading each weight of `names` as their weight."""
    readers: dict[str, list[fx.Node]] = {name: [] for name in names}
    for node in program.graph_module.graph.nodes:
        if node.target is aten.linear.default and node.args[1].op == "get_attr" and node.args[1].target in names:
            readers[node.args[1].target].append(node)
    return readers


def _with_constants(program: Program, constants: dict[str, torch.Tensor]) -> Program:
    """A clone of `program` whose constants `constants` are rebound (the original keeps its own)."""
    trial = program.clone()
    for name, tensor in constants.items():
        setattr(trial.graph_module, name, tensor)
    return trial


@register_pass("quantize")
class Quantize(LossyPass):
    description = ("store linear and embedding weights as bf16, fp16, int8 or int4 (round to nearest, AWQ or GPTQ; "
                   "outliers kept exactly; optional per-layer mixed precision under the quality budget); lossy")
    Config = QuantizeConfig
    provides = ("quantize",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        data, budget = self.calibration_and_budget(ctx)
        kv_rewrites, kv_notes, kv_measured = (quantize_kv_cache(program, config.kv_cache, ctx, self.name)
                                              if config.kv_cache is not None else (0, [], {}))
        if config.kv_cache is not None and "weights" not in config.model_fields_set:
            return kv_cache_only_result(program, data, budget, self.name, kv_rewrites, kv_notes, kv_measured)
        num_layers = program.meta["num_layers"]
        for entry in config.skip:
            if isinstance(entry, int) and not 0 <= entry < num_layers:
                raise LmforgeError(f"quantize: skip names layer {entry}, but the model has {num_layers} layers")
        if config.mixed_precision and budget is None:
            raise LmforgeError("quantize: mixed_precision chooses formats under a quality budget; set quality_budget "
                               "in the recipe or on the pass")
        bytes_before = weight_bytes(program)
        targets, kept, notes = self._targets(program, num_layers)
        notes += kv_notes
        readers = linear_readers(program, {name for name, uses in targets.items()
                                           if all(role != "embedding" for _, role in uses)})
        calibrated = {name: nodes[0] for name, nodes in readers.items() if len(nodes) == 1}
        statistics: dict[str, InputStatistics] = {}
        if config.method != "rtn" and calibrated:
            statistics = input_statistics(program, data, list({node.args[0] for node in calibrated.values()}))
        awq = self._apply_awq(program, calibrated, statistics) if config.method == "awq" else []
        levels = [config.weights] + (["int8"] if config.weights == "int4" and config.mixed_precision else [])
        candidates = {name: {level: self._quantize(program, name, level, calibrated.get(name), statistics)
                             for level in levels} for name in targets}
        units = {name: _unit(uses) for name, uses in targets.items()}
        chosen, mixed = {name: config.weights for name in targets}, {}
        if config.mixed_precision:
            chosen, mixed, mixed_notes = self._choose_per_unit(program, data, budget, units, candidates, levels)
            notes += mixed_notes
        converted = []
        for name, uses in targets.items():
            if chosen[name] == KEPT:
                kept.append(name)
            elif ctx.allow_rewrite(self.name, f"store {name} as {chosen[name]}", uses[0][0]):
                replace_weight(program, name, candidates[name][chosen[name]])
                converted.append(name)
        program.eliminate_dead_code()
        program.drop_unused_weights()
        program.refresh()
        quality = data.program_quality(program)
        counts = Counter(chosen[name] for name in converted)
        stored = ", ".join(f"{count} weights as {fmt}" for fmt, count in sorted(counts.items())) or "no weights"
        notes += enforce_budget(self.name, quality, budget, f"storing {stored} ({config.method})")
        bytes_after = weight_bytes(program)
        notes.append(f"{stored} by {config.method} ({len(kept)} kept): "
                     f"weight bytes {bytes_before:,} → {bytes_after:,} ({bytes_before / bytes_after:.2f}x smaller); "
                     f"held-out {quality.describe()}")
        program.meta["quantize"] = {
            "weights": config.weights,
            "group_size": config.group_size if config.weights == "int4" else None,
            "method": config.method,
            "outliers": config.outliers,
            "quantized": len(converted),
            "kept": kept,
            "layers": mixed.get("formats"),
            "heldout_quality": quality.as_dict(),
        }
        return PassResult(
            rewrites=len(converted),
            notes=tuple(notes),
            measurements={"weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after, "kept": kept,
                          "heldout_quality": quality.as_dict(), "awq": awq, **mixed},
        )

    def _targets(self, program: Program, num_layers: int) -> tuple[dict[str, Uses], list[str], list[str]]:
        """(weights to convert with their uses, weights kept, notes)."""
        config = self.config
        targets, kept, notes = {}, [], []
        for name, uses in quantizable_weights(program).items():
            columns = getattr(program.graph_module, name).shape[1]
            if _skipped(uses, config.skip, num_layers):
                kept.append(name)
            elif config.weights == "int4" and columns % config.group_size:
                kept.append(name)
                notes.append(f"{name}: {columns} input columns are not a multiple of group_size "
                             f"{config.group_size}; kept")
            else:
                targets[name] = uses
        return targets, kept, notes

    def _apply_awq(self, program: Program, calibrated: dict[str, fx.Node],
                   statistics: dict[str, InputStatistics]) -> list[dict]:
        """Search and fold one input scale per group of linears sharing an input."""
        config, module = self.config, program.graph_module
        groups: dict[fx.Node, list[fx.Node]] = {}
        for linear in calibrated.values():
            groups.setdefault(linear.args[0], []).append(linear)
        report = []
        for source, linears in groups.items():
            stats = statistics[source.name]
            weights = [getattr(module, linear.args[1].target) for linear in linears]
            scales, alpha, error, rtn_error = search_scales(
                weights, stats.second_moment, stats.magnitude,
                lambda w: round_to_nearest(w, config.weights, config.group_size, config.outliers).dequantize(),
                config.awq_grid)
            folded = fold_input_scales(program, source, linears, scales) if alpha > 0 else "none"
            report.append({"weights": [linear.args[1].target for linear in linears], "alpha": alpha,
                           "output_mse_rtn": rtn_error, "output_mse_awq": error, "folded_into": folded})
            if config.awq_clip and config.weights == "int4" and not config.outliers:
                report[-1]["clip"] = self._clip(program, linears, stats.second_moment / torch.outer(scales, scales))
        program.refresh()
        return report

    def _clip(self, program: Program, linears: list[fx.Node], gram: torch.Tensor) -> list[dict]:
        """Clamp each linear's (scaled) weight to the per-group range `search_clip` chooses on
        inputs of second moment `gram`; the codes are then rounded from the clamped weight."""
        config, module, report = self.config, program.graph_module, []
        for linear in linears:
            if role_of(linear)[1] in ("q", "k", "qkv"):
                continue
            name = linear.args[1].target
            clipped, ratios, error, unclipped = search_clip(
                getattr(module, name), gram, config.group_size,
                lambda w: round_to_nearest(w, "int4", config.group_size).dequantize())
            delattr(module, name)
            module.register_buffer(name, clipped)
            report.append({"weight": name, "mean_ratio": round(ratios.mean().item(), 4),
                           "output_mse_unclipped": unclipped, "output_mse_clipped": error})
        return report

    def _quantize(self, program: Program, name: str, fmt: str, linear: fx.Node | None,
                  statistics: dict[str, InputStatistics]) -> QuantizedWeight:
        config = self.config
        weight = getattr(program.graph_module, name)
        if config.method != "gptq" or linear is None:
            return round_to_nearest(weight, fmt, config.group_size, config.outliers)
        return gptq_quantize(weight, statistics[linear.args[0].name].hessian, fmt, config.group_size,
                             config.block_size, config.act_order, config.damp, outlier_mask(weight, config.outliers))

    def _choose_per_unit(self, program: Program, data: CalibrationData, budget: QualityBudget, units: dict[str, str],
                         candidates: dict[str, dict[str, QuantizedWeight]],
                         levels: list[str]) -> tuple[dict[str, str], dict, list[str]]:
        """Per weight the format mixed precision chooses, what it measured, and notes."""

        def measure(formats: dict[str, str], split: str) -> Quality:
            constants = {name: candidates[name][formats[unit]].dequantize()
                         for name, unit in units.items() if formats.get(unit, KEPT) != KEPT}
            return data.program_quality(_with_constants(program, constants), split)

        def unit_bytes(unit: str, level: str) -> int:
            return sum(getattr(program.graph_module, name).nbytes if level == KEPT else
                       sum(t.nbytes for t in candidates[name][level].tensors(name).values())
                       for name, owner in units.items() if owner == unit)

        order = sorted(set(units.values()), key=lambda unit: (not unit.isdigit(), unit.zfill(6)))
        choice = choose_mixed_precision(order, [*levels, KEPT], unit_bytes, measure, budget)
        if all(fmt == KEPT for fmt in choice.formats.values()):
            raise LmforgeError(f"quantize: mixed precision keeps every layer in fp32 and still measures "
                               f"{choice.calibration.describe()} on calibration text; loosen quality_budget")
        per_unit = ", ".join(f"{unit}: {fmt}" for unit, fmt in choice.formats.items())
        notes = [f"mixed precision per layer ({per_unit}); calibration {choice.calibration.describe()}", *choice.steps]
        measured = {"formats": choice.formats, "sensitivity": choice.sensitivity, "steps": choice.steps}
        return {name: choice.formats[unit] for name, unit in units.items()}, measured, notes
