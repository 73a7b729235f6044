"""`sparse_prefill` (MInference): long prefills compute only the attention blocks that matter.

Each query head gets one of three patterns (`compiler/sparse_patterns.py`): A-shape,
vertical-slash or block-sparse, all at the same cost — `budget` key blocks of `block` tokens
per query block. The pattern is chosen offline per head, on calibration text cut into
`seq_len`-token windows, as the one that keeps the largest share of that head's dense
attention (its recall); the indices themselves are estimated at run time from each prefill's
own queries and keys (the last 64 queries for vertical-slash, pooled blocks for
block-sparse). The rewrite swaps the layer's `attention` for `sparse_attention` with the
patterns as arguments; prompts shorter than `min_length`, decoding and verification stay
dense and exact. Without a fixed `budget`, the smallest budget that meets the quality budget
on calibration windows (confirmed on held-out windows) is taken. Decisions go to
`meta["sparse_prefill"]` and the artifact's `attention_patterns.json`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from lmforge.compiler.attention_patterns import load_patterns
from lmforge.compiler.layermap import plain_attention_layers
from lmforge.compiler.ops import sparse_attention
from lmforge.compiler.program import Program
from lmforge.compiler.sparse_patterns import PATTERNS, pattern_blocks
from lmforge.errors import LmforgeError
from lmforge.passes.base import PassConfig, PassContext, PassResult, register_pass
from lmforge.passes.calibrate import LossyPass, Quality, QualityBudget, enforce_budget, full_logits, node_values
from lmforge.passes.long_range import build_copy_task, copy_report

BUDGETS = (4, 6, 8, 12, 16)
Pattern = Literal["a_shape", "vertical_slash", "block_sparse"]


class SparsePrefillConfig(PassConfig):
    min_length: int = Field(1024, ge=1, description="prompts shorter than this are prefilled densely")
    block: int = Field(64, ge=8, description="block size in tokens (queries and keys)")
    budget: int | None = Field(
        None, ge=2, description="key blocks computed per query block (default: the smallest of 4, 6, 8, 12, 16 "
        "that meets the quality budget)"
    )
    allowed: list[Pattern] = Field(list(PATTERNS), description="patterns a head may be given")
    seq_len: int = Field(2048, ge=16, description="tokens per calibration window (at least min_length)")
    samples: int = Field(2, ge=1, description="long calibration windows (pattern and budget choice)")
    eval_samples: int = Field(2, ge=1, description="long held-out windows (budget check, copy task)")
    quality_budget: QualityBudget | None = Field(None, description="overrides the recipe-wide quality_budget")
    patterns: str | None = Field(
        None, description="reuse the patterns of an attention_patterns.json (or an artifact) made for this model"
    )


def pattern_recall(q: torch.Tensor, k: torch.Tensor, scale: float, block: int, budget: int) -> torch.Tensor:
    """(len(PATTERNS), Hq): share of each head's dense causal attention that each pattern
    keeps, averaged over queries (q (B, Hq, T, D), k (B, Hkv, T, D))."""
    length, heads = q.shape[2], q.shape[1]
    keys = k.repeat_interleave(heads // k.shape[1], dim=1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    kept = [pattern_blocks([code] * heads, q, keys, block, budget, scale).repeat_interleave(block, -1)
            .repeat_interleave(block, -2)[..., :length, :length] for code in range(len(PATTERNS))]
    recalls = torch.empty(len(PATTERNS), heads)
    for head in range(heads):
        logits = torch.matmul(q[:, head], keys[:, head].transpose(-1, -2)) * scale
        probabilities = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
        for code, mask in enumerate(kept):
            recalls[code, head] = (probabilities * mask[:, head]).sum(-1).mean()
    return recalls


def choose_patterns(program: Program, ids: torch.Tensor, layers: list[int], config: SparsePrefillConfig,
                    budget: int) -> tuple[dict[int, list[int]], dict[int, list[list[float]]]]:
    """Per layer, each query head's pattern (index into PATTERNS) with the highest recall
    among the allowed ones, and the recalls measured."""
    allowed = torch.tensor([name in config.allowed for name in PATTERNS])
    chosen, recalls = {}, {}
    for layer in layers:
        node = program.layers[layer].attention
        values = node_values(program, ids, list(node.args[:2]))
        recall = torch.stack([pattern_recall(values[node.args[0].name][row : row + 1].float(),
                                             values[node.args[1].name][row : row + 1].float(),
                                             node.args[4], config.block, budget) for row in range(ids.shape[0])]).mean(0)
        chosen[layer] = recall.masked_fill(~allowed[:, None], -1.0).argmax(0).tolist()
        recalls[layer] = [[round(value, 4) for value in row] for row in recall.tolist()]
    return chosen, recalls


def make_sparse(program: Program, patterns: dict[int, list[int]], budget: int, block: int, min_length: int,
                allow=lambda layer: True) -> int:
    rewritten = 0
    for layer, heads in sorted(patterns.items()):
        if not allow(layer):
            continue
        node = program.layers[layer].attention
        node.target, node.args = sparse_attention, (*node.args, heads, budget, block, min_length)
        rewritten += 1
    program.refresh()
    return rewritten


def density(length: int, block: int, budget: int) -> float:
    """Share of the causal blocks computed at `length` tokens."""
    count = -(-length // block)
    return sum(min(budget, index + 1) for index in range(count)) / (count * (count + 1) / 2)


@register_pass("sparse_prefill")
class SparsePrefill(LossyPass):
    description = "MInference: per-head A-shape / vertical-slash / block-sparse prefill of long prompts; lossy"
    Config = SparsePrefillConfig
    provides = ("sparse_prefill",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        data, quality_budget = self.calibration_and_budget(ctx)
        if config.seq_len < config.min_length:
            raise LmforgeError(f"sparse_prefill: seq_len {config.seq_len} is below min_length {config.min_length}, so "
                               "calibration would never see a sparse prefill")
        layers = plain_attention_layers(program.layers, program.meta["kv_cache"], own_cache=False, windowed=False)
        if not layers:
            return PassResult(notes=("no layer left to make sparse: every layer's attention is windowed or was already "
                                     "rewritten (e.g. all of its heads stream)",))
        long = data.at_length(config.seq_len, config.samples, config.eval_samples)
        notes = []
        if len(layers) < program.meta["num_layers"]:
            notes.append(f"layers {sorted(set(range(program.meta['num_layers'])) - set(layers))} stay dense "
                         "(sliding-window or already rewritten attention)")
        trials: list[dict] = []
        recalls: dict = {}

        def candidate(budget: int) -> dict[int, list[int]]:
            chosen, measured = choose_patterns(program, long.ids("calibration"), layers, config, budget)
            recalls[budget] = measured
            return chosen

        def measure(patterns: dict[int, list[int]], budget: int, split: str) -> Quality:
            trial = program.clone()
            make_sparse(trial, patterns, budget, config.block, config.min_length)
            return long.quality(lambda ids: full_logits(trial, ids), split)

        if config.patterns is not None:
            saved = load_patterns(config.patterns, program.meta, program.config).get("sparse_prefill")
            if saved is None:
                raise LmforgeError(f"sparse_prefill: {config.patterns} holds no sparse_prefill decisions")
            budget = saved["budget"]
            patterns = {int(layer): [PATTERNS.index(name) for name in heads] for layer, heads in saved["patterns"].items()
                        if int(layer) in layers}
        elif config.budget is not None or quality_budget is None:
            budget = config.budget or 8
            patterns = candidate(budget)
        else:
            budget = patterns = None
            for step, option in enumerate(BUDGETS):
                ctx.report("sparse_prefill: choosing the block budget", step, len(BUDGETS))
                chosen = candidate(option)
                quality = measure(chosen, option, "calibration")
                trials.append({"budget": option, "calibration_quality": quality.as_dict()})
                if quality.within(quality_budget) and measure(chosen, option, "heldout").within(quality_budget):
                    budget, patterns = option, chosen
                    break
            if patterns is None:
                budget = BUDGETS[-1]
                patterns = candidate(budget)
        patterns = {layer: heads for layer, heads in patterns.items()
                    if ctx.allow_rewrite(self.name, f"sparse prefill, budget {budget}", layer)}
        rewritten = make_sparse(program, patterns, budget, config.block, config.min_length)
        quality = long.quality(lambda ids: full_logits(program, ids), "heldout")
        copy_task = build_copy_task(long.ids("heldout"))
        copy = copy_report(copy_task, lambda ids: data.reference(ids).logits, lambda ids: full_logits(program, ids),
                           "sparse")
        computed = density(config.seq_len, config.block, budget)
        notes += enforce_budget(self.name, quality, quality_budget,
                                f"a budget of {budget} blocks ({computed:.0%} of the attention at {config.seq_len} tokens)")
        counts = {name: sum(heads.count(code) for heads in patterns.values()) for code, name in enumerate(PATTERNS)}
        notes.append(f"prefills of {config.min_length}+ tokens compute {budget} key blocks per query block "
                     f"({computed:.0%} of the causal blocks at {config.seq_len}); head patterns {counts}; held-out "
                     f"{quality.describe()}; copy task accuracy {copy['sparse']:.3f} (dense {copy['dense']:.3f}, dense without the copied source {copy['dense_without_source']:.3f})")
        program.meta["sparse_prefill"] = {
            "budget": budget,
            "block": config.block,
            "min_length": config.min_length,
            "patterns": {str(layer): [PATTERNS[code] for code in heads] for layer, heads in patterns.items()},
            "recall": {str(layer): values for layer, values in recalls.get(budget, {}).items()},
            "heldout_quality": quality.as_dict(),
            "copy_accuracy": {key: round(value, 4) for key, value in copy.items()},
        }
        return PassResult(rewrites=rewritten, notes=tuple(notes),
                          measurements={"trials": trials, "heldout_quality": quality.as_dict(), "copy_accuracy": copy,
                                        "density": computed})
