"""`quantize`: store linear and embedding weights in a lower precision.

At batch 1 a decode step reads every weight once, so bytes per weight bound its speed on a
CPU; storing fewer of them is the direct lever, if a kernel reads the stored format
(`codegen/cpu_quantized.py`). Formats (`compiler/quantized.py`): `bf16`, `fp16`, `int8`
round-to-nearest per output channel, `int4` round-to-nearest per group of `group_size`
input columns with a zero point. Every 2-D weight used only as a linear layer's weight or
as an embedding table is converted — the LM head and the token embeddings included, since
they are often the largest — except those `skip` names; norms and biases stay fp32.

The stored constants replace the fp32 weight in the program (and so in
`weights.safetensors`); the graph dequantizes them with ATen ops, which the aten backend
swaps for kernels on the stored format. The pass is lossy: it measures perplexity change,
top-1 agreement and KL on held-out text and honours the quality budget.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import fx

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
from lmforge.passes.calibrate import LossyPass, QualityBudget, enforce_budget
from lmforge.passes.quantize_kv_cache import KVCacheQuantizeConfig, kv_cache_only_result, quantize_kv_cache

aten = torch.ops.aten
SKIP_ROLES = ("embedding", "lm_head", "attention", "ffn")
_ATTENTION_PROJECTIONS = ("q", "k", "v", "o", "qkv")
PLANNED_METHODS = ("awq", "gptq")


class QuantizeConfig(PassConfig):
    weights: Literal["bf16", "fp16", "int8", "int4"] = Field(
        "int8", description="storage format of linear and embedding weights"
    )
    group_size: int = Field(32, ge=2, description="int4: input columns sharing one scale and zero point (even)")
    method: str = Field("rtn", description="how codes are chosen: rtn (round to nearest); awq and gptq are planned")
    skip: list[int | str] = Field(
        [], description=f"weights kept as they are: layer indices and/or roles ({', '.join(SKIP_ROLES)})"
    )
    kv_cache: KVCacheQuantizeConfig | None = Field(
        None, description="quantize the KV cache too (KIVI: {dtype: int8|fp8, granularity: kivi|token, residual, "
        "slack}); given without `weights`, only the cache is quantized")
    quality_budget: QualityBudget | None = Field(None, description="overrides the recipe-wide quality_budget")

    @field_validator("method")
    @classmethod
    def _implemented(cls, method: str) -> str:
        if method in PLANNED_METHODS:
            raise ValueError(f"method {method!r} is not implemented yet; use method: rtn")
        if method != "rtn":
            raise ValueError(f"unknown method {method!r}; valid: rtn")
        return method

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


def _skipped(uses: list[tuple[int | None, str]], skip: list[int | str]) -> bool:
    return any(layer in skip or role in skip for layer, role in uses)


def _convert(weight: torch.Tensor, config: QuantizeConfig) -> QuantizedWeight:
    if config.weights == "int8":
        return quantize_int8(weight)
    if config.weights == "int4":
        return quantize_int4(weight, config.group_size)
    return cast_weight(weight, config.weights)


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


@register_pass("quantize")
class Quantize(LossyPass):
    description = "store linear and embedding weights as bf16, fp16, int8 or int4 (round to nearest); lossy"
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
        bytes_before = weight_bytes(program)
        converted, kept, notes = [], [], []
        notes += kv_notes
        for name, uses in quantizable_weights(program).items():
            columns = getattr(program.graph_module, name).shape[1]
            if _skipped(uses, config.skip):
                kept.append(name)
                continue
            if config.weights == "int4" and columns % config.group_size:
                kept.append(name)
                notes.append(f"{name}: {columns} input columns are not a multiple of group_size {config.group_size}; kept")
                continue
            if not ctx.allow_rewrite(self.name, f"store {name} as {config.weights}", uses[0][0]):
                continue
            replace_weight(program, name, _convert(getattr(program.graph_module, name), config))
            converted.append(name)
        program.eliminate_dead_code()
        program.drop_unused_weights()
        program.refresh()
        quality = data.program_quality(program)
        notes += enforce_budget(self.name, quality, budget, f"storing {len(converted)} weights as {config.weights}")
        bytes_after = weight_bytes(program)
        notes.append(f"{len(converted)} weights stored as {config.weights} ({len(kept)} kept): weight bytes "
                     f"{bytes_before:,} → {bytes_after:,} ({bytes_before / bytes_after:.2f}x smaller); "
                     f"held-out {quality.describe()}")
        program.meta["quantize"] = {
            "weights": config.weights,
            "group_size": config.group_size if config.weights == "int4" else None,
            "method": config.method,
            "quantized": len(converted),
            "kept": kept,
            "heldout_quality": quality.as_dict(),
        }
        return PassResult(
            rewrites=len(converted),
            notes=tuple(notes),
            measurements={"weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after,
                          "kept": kept, "heldout_quality": quality.as_dict()},
        )
