"""`verify`: check the Program numerically against the unmodified Hugging Face model.

After lossless passes it compares full-sequence logits on a fixed token batch (max
absolute error, top-1 agreement) and, because small logit errors can still flip a
near-tie, also decodes a few greedy tokens with both and compares them. After a lossy pass
exact agreement is not the contract any more: it measures the held-out quality of the
whole pipeline so far against the recipe-wide quality budget instead. Either way it checks
that decoding through the KV cache gives the logits of a cache-free forward of the same
program (not applicable to programs that make decode-time decisions: dynamic `ffn_skip`,
merged KV caches). It never changes the graph.
"""

from __future__ import annotations

import torch
from pydantic import Field

from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError
from lmforge.passes.base import PASSES, Pass, PassConfig, PassContext, PassResult, register_pass
from lmforge.passes.calibrate import (
    decoded_logits,
    enforce_budget,
    full_logits,
    greedy_extend,
    makes_decode_time_decisions,
)


class VerifyConfig(PassConfig):
    max_logit_error: float = Field(1e-3, gt=0, description="largest allowed |logit - reference logit|")
    greedy_tokens: int = Field(8, ge=0, description="greedy tokens decoded by both models and compared")
    fail: bool = Field(True, description="raise when a check fails (false: only record the numbers)")


@register_pass("verify")
class Verify(Pass):
    description = "compare logits and greedy tokens with the original model (changes nothing)"
    Config = VerifyConfig

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        if ctx.reference is None or ctx.sample_ids is None:
            raise LmforgeError("verify needs the reference model and sample ids in the pass context")
        ids = ctx.sample_ids
        measurements, notes = self._cache_consistency(program, ids), []
        lossy = [entry["pass"] for entry in program.history if not PASSES[entry["pass"]].lossless]
        if lossy:
            measurements["lossy_passes"] = lossy
            if ctx.calibration is not None:
                quality = ctx.calibration.program_quality(program)
                measurements["heldout_quality"] = quality.as_dict()
                notes += enforce_budget(self.name, quality, ctx.quality_budget, f"the pipeline after {', '.join(lossy)}")
                notes.append(f"held-out {quality.describe()} after lossy passes {', '.join(lossy)}")
            return PassResult(notes=tuple(notes), measurements=measurements)
        with torch.no_grad():
            reference = ctx.reference(ids).logits
        logits = full_logits(program, ids)
        error = (logits - reference).abs().max().item()
        top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        with torch.no_grad():
            ours = greedy_extend(lambda x: full_logits(program, x), ids, self.config.greedy_tokens)
            theirs = greedy_extend(lambda x: ctx.reference(x).logits, ids, self.config.greedy_tokens)
        greedy_match = bool(torch.equal(ours, theirs))
        measurements.update({"max_logit_error": error, "top1_agreement": top1, "greedy_match": greedy_match})
        failed = error > self.config.max_logit_error or not greedy_match
        if failed and self.config.fail:
            raise LmforgeError(
                f"verify failed: max logit error {error:.3g} (allowed {self.config.max_logit_error:g}), "
                f"top-1 agreement {top1:.4f}, greedy tokens identical: {greedy_match}"
            )
        return PassResult(measurements=measurements)

    def _cache_consistency(self, program: Program, ids: torch.Tensor) -> dict:
        """Largest logit difference between cached decoding and a cache-free forward."""
        if makes_decode_time_decisions(program):
            return {"cache_consistency": "not applicable: the program decides per decoded token (dynamic ffn_skip or merged KV)"}
        with torch.no_grad():
            error = (decoded_logits(program, ids, ids.shape[1] // 2) - full_logits(program, ids)).abs().max().item()
        if error > self.config.max_logit_error and self.config.fail:
            raise LmforgeError(
                f"verify failed: decoding with the KV cache differs from a cache-free forward by {error:.3g} "
                f"(allowed {self.config.max_logit_error:g})"
            )
        return {"cache_max_logit_error": error}
