"""`kv_evict` (H2O / A2SF / SCOPE style): a fixed KV budget per head, evicting by attention.

Each chosen layer's `attention` becomes `evicting_attention` on an `EvictingSlot` of
`capacity` tokens per KV head. The prefill is computed in full; the cache then keeps each
head's `recent` last tokens and the tokens the last `observe` prompt queries attended to most
(later queries weighted more, A2SF's forgetting factor `decay`). Each decode step adds the
attention every kept token receives to its decayed score, and the new token replaces the
lowest-scoring entry outside the recent ones. Memory and decode attention cost are fixed
whatever the context; the prefill and cache-free forwards are unchanged, so quality is
measured by teacher-forced decoding on long calibration windows (`seq_len`, decoding the
second half). Without a fixed `capacity`, the smallest of `capacities` within the quality
budget is taken. Decoding with eviction is one token per forward: speculative drafts that
were later rejected would already have evicted tokens, so the pass refuses a program with a
draft source, and the draft passes refuse it after this one (`compiler/speculation_rules.py`).
"""

from __future__ import annotations

from pydantic import Field

from lmforge.compiler.layermap import plain_attention_layers
from lmforge.compiler.ops import evicting_attention
from lmforge.compiler.program import Program
from lmforge.compiler.speculation_rules import refuse_if_drafting
from lmforge.errors import LmforgeError
from lmforge.passes.base import PassConfig, PassContext, PassResult, register_pass
from lmforge.passes.calibrate import LossyPass, QualityBudget, enforce_budget

CAPACITIES = (128, 256, 384, 512, 768)


class KVEvictConfig(PassConfig):
    capacity: int | None = Field(
        None, ge=2, description="tokens kept per KV head (default: the smallest of `capacities` within the budget)"
    )
    capacities: list[int] = Field(list(CAPACITIES), description="capacities tried, smallest first")
    recent: int = Field(64, ge=1, description="last tokens never evicted")
    decay: float = Field(0.95, gt=0, le=1, description="per-step forgetting factor of accumulated attention")
    observe: int = Field(64, ge=1, description="last prompt queries whose attention ranks the prompt's tokens")
    layers: list[int] | None = Field(None, description="layers that evict (default: every layer with its own plain cache)")
    seq_len: int = Field(1024, ge=16, description="tokens per calibration window (the second half is decoded)")
    samples: int = Field(2, ge=1, description="long calibration windows")
    eval_samples: int = Field(2, ge=1, description="long held-out windows")
    quality_budget: QualityBudget | None = Field(None, description="overrides the recipe-wide quality_budget")


def make_evicting(program: Program, layers: list[int], capacity: int, recent: int, decay: float, observe: int) -> int:
    layout = program.meta["kv_cache"]
    for layer in layers:
        program.layers[layer].attention.target = evicting_attention  # same arguments, another cache
        layout[layer].update(kind="evict", capacity=capacity, recent=recent, decay=decay, observe=observe)
    program.refresh()
    return len(layers)


@register_pass("kv_evict")
class KVEvict(LossyPass):
    description = "keep a fixed number of tokens per KV head, evicting by accumulated attention while decoding; lossy"
    Config = KVEvictConfig
    provides = ("kv_evict",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        refuse_if_drafting(program.meta, self.name)
        data, budget = self.calibration_and_budget(ctx)
        long = data.at_length(config.seq_len, config.samples, config.eval_samples)
        eligible = plain_attention_layers(program.layers, program.meta["kv_cache"], own_cache=True, windowed=False)
        layers = sorted(set(config.layers)) if config.layers is not None else eligible
        for layer in layers:
            if layer not in eligible:
                raise LmforgeError(f"kv_evict: layer {layer} has no plain, unshared, full-attention cache to evict from "
                                   f"(eligible: {eligible})")
        candidates = [config.capacity] if config.capacity is not None else sorted(config.capacities)
        if min(candidates) <= config.recent:
            raise LmforgeError(f"kv_evict: capacity must exceed recent ({config.recent}), or nothing can be evicted")
        trials, notes = [], []

        def measure(capacity: int, split: str):
            trial = program.clone()
            make_evicting(trial, layers, capacity, config.recent, config.decay, config.observe)
            return long.program_quality(trial, split)

        chosen = candidates[-1]
        if len(candidates) > 1 and budget is not None:
            for step, capacity in enumerate(candidates):
                ctx.report("kv_evict: choosing the capacity", step, len(candidates))
                quality = measure(capacity, "calibration")
                trials.append({"capacity": capacity, "calibration_quality": quality.as_dict()})
                if quality.within(budget) and measure(capacity, "heldout").within(budget):
                    chosen = capacity
                    break
        layers = [layer for layer in layers if ctx.allow_rewrite(self.name, f"evict to {chosen} tokens", layer)]
        rewritten = make_evicting(program, layers, chosen, config.recent, config.decay, config.observe)
        quality = long.program_quality(program)
        notes += enforce_budget(self.name, quality, budget, f"a cache of {chosen} tokens per head")
        notes.append(f"layers {layers} keep {chosen} tokens per KV head ({config.recent} recent); teacher-forced "
                     f"decoding of the second half of {config.seq_len}-token held-out windows: {quality.describe()}")
        program.meta["kv_evict"] = {"layers": layers, "capacity": chosen, "recent": config.recent, "decay": config.decay,
                                    "observe": config.observe, "heldout_quality": quality.as_dict()}
        return PassResult(rewrites=rewritten, notes=tuple(notes),
                          measurements={"trials": trials, "heldout_quality": quality.as_dict(), "capacity": chosen})
