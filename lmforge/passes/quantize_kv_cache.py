"""The `kv_cache:` option of the `quantize` pass: a KIVI-quantized KV cache.

Every layer's `attention` (or `tree_attention`) becomes `quantized_attention` on a slot of
kind `quantized` (`compiler/kv_quantized.py`): int8 or fp8 codes with fp16 scales, keys per
channel over groups of `residual` tokens and values per token (granularity `kivi`), or both
per token (`token`), and the tokens of the current group exact. Which tokens a query reads
quantized depends only on positions, so the cache-free forward computes what decoding
computes and the quality measured on full-sequence logits is the quality of generation.
Layers whose attention another pass already changed (streaming heads, merged, evicting or
shared slots, block-sparse prefill) are refused: their caches are not plain slots.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from lmforge.compiler.kv_layout import kv_cache_bytes
from lmforge.compiler.ops import attention, quantized_attention, tree_attention
from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError
from lmforge.passes.base import PassContext, PassResult
from lmforge.passes.calibrate import CalibrationData, QualityBudget, enforce_budget

MEASURED_CONTEXT = 2048  # tokens at which the note reports the cache's bytes


class KVCacheQuantizeConfig(BaseModel):
    """Option `kv_cache` of `quantize`."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["int8", "fp8"] = Field(
        "int8", description="codes: int8 (asymmetric, scale and zero point) or fp8 (float8_e4m3fn, scale only)")
    granularity: Literal["kivi", "token"] = Field(
        "kivi", description="kivi: keys per channel over each group of `residual` tokens, values per token; "
        "token: keys and values per token")
    residual: int = Field(32, ge=1, description="tokens per group: the current group stays exact, complete groups "
                          "are quantized (and share key scales under kivi)")
    slack: int = Field(8, ge=0, description="extra exact tokens kept so that speculative drafts of up to this "
                       "many tokens can be rolled back (prompt_lookup drafts 8 by default)")


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why float8_e4m3fn codes cannot be stored and read back on `device` (None: they can)."""
    try:
        probe = torch.tensor([1.5, -3.0], device=device).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError) as error:
        return f"torch {torch.__version__} cannot cast to float8_e4m3fn on {device.type}: {str(error)[:80]}"
    if probe.tolist() != [1.5, -3.0]:
        return f"torch {torch.__version__} casts float8_e4m3fn wrongly on {device.type}"
    return None


def drafted_tokens(meta: dict) -> int:
    """The most tokens one verification forward of this program drafts (0: no draft source)."""
    speculation = meta.get("speculation") or {}
    return max(speculation.get("prompt_lookup", {}).get("num_draft", 0),
               speculation.get("draft_heads", {}).get("count", 0))


def _refusal(program: Program, layer: int) -> str | None:
    """Why layer `layer`'s cache cannot be quantized (None: it can)."""
    node = program.layers[layer].attention
    if node is None:
        return "it has no attention op"
    if node.target not in (attention, tree_attention):
        return f"its attention is {node.target.name()}, whose cache is not a plain slot"
    slot = program.meta["kv_cache"][layer]
    if "streaming" in slot or "kind" in slot:
        return f"its cache slot is {slot.get('kind', 'split into streaming heads')}"
    if slot["cache"] != layer or sum(entry["cache"] == layer for entry in program.meta["kv_cache"]) > 1:
        return "its cache slot is shared with another layer (kv_share)"
    return None


def quantize_kv_cache(program: Program, config: KVCacheQuantizeConfig, ctx: PassContext,
                      pass_name: str) -> tuple[int, list[str], dict]:
    """Swap every layer's attention for `quantized_attention` on a quantized slot; returns
    (layers rewritten, notes, measurements)."""
    if config.dtype == "fp8":
        device = next(iter(program.graph_module.buffers()), torch.empty(0)).device
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            raise LmforgeError(f"{pass_name}: kv_cache dtype fp8 is not available here: {reason}; use dtype: int8")
    drafted = drafted_tokens(program.meta)
    if drafted > config.slack:
        raise LmforgeError(f"{pass_name}: the program drafts {drafted} tokens per verification, and rolling back "
                           f"rejected drafts needs kv_cache slack >= {drafted} (it is {config.slack})")
    layout = program.meta["kv_cache"]
    for entry in program.layers:
        reason = _refusal(program, entry.index)
        if reason is not None:
            raise LmforgeError(f"{pass_name}: kv_cache cannot quantize layer {entry.index}'s cache: {reason}; "
                               "quantize the cache in a recipe without that pass, or before it")
    bytes_before = kv_cache_bytes(layout, MEASURED_CONTEXT)
    rewritten = 0
    for entry in program.layers:
        if not ctx.allow_rewrite(pass_name, f"quantize the KV cache ({config.dtype})", entry.index):
            continue
        node = entry.attention
        tree = node.target is tree_attention
        node.target = quantized_attention
        node.args = (*node.args[:7], config.dtype, config.granularity, config.residual, tree)
        layout[entry.index].update(kind="quantized", dtype=config.dtype, granularity=config.granularity,
                                   residual=config.residual, slack=config.slack)
        rewritten += 1
    program.refresh()
    bytes_after = kv_cache_bytes(layout, MEASURED_CONTEXT)
    note = (f"KV cache of {rewritten} layers stored as {config.dtype} ({config.granularity}, groups of "
            f"{config.residual} tokens, the current one exact): {bytes_before:,} → {bytes_after:,} bytes at "
            f"{MEASURED_CONTEXT:,} tokens ({bytes_before / bytes_after:.2f}x smaller)")
    measured = {"kv_cache_bytes_before": bytes_before, "kv_cache_bytes_after": bytes_after}
    program.meta["quantize_kv_cache"] = {**config.model_dump(), "layers": rewritten, **measured}
    return rewritten, [note], measured


def kv_cache_only_result(program: Program, data: CalibrationData, budget: QualityBudget | None, pass_name: str,
                         rewritten: int, notes: list[str], measured: dict) -> PassResult:
    """The pass's result when the recipe asks for `kv_cache` alone (weights stay as they
    are): held-out quality measured and the budget enforced."""
    quality = data.program_quality(program)
    notes = notes + enforce_budget(pass_name, quality, budget, "quantizing the KV cache")
    notes.append(f"held-out {quality.describe()}")
    program.meta["quantize_kv_cache"]["heldout_quality"] = quality.as_dict()
    return PassResult(rewrites=rewritten, notes=tuple(notes), measurements={**measured,
                                                                            "heldout_quality": quality.as_dict()})
