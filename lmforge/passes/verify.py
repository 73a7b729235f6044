"""`verify`: check the Program numerically against the unmodified Hugging Face model.

This pass is the graph-level half of verification: it sees the FX graph before codegen.
After lossless passes it compares full-sequence logits on a fixed token batch (max
absolute error, top-1 agreement) and, because small logit errors can still flip a
near-tie, also decodes a few greedy tokens with both and compares them. After a lossy pass
exact agreement is not the contract any more: it measures the held-out quality of the
whole pipeline so far and holds it to the recipe-wide quality budget when one is set.
Either way it checks that decoding through the KV cache gives the logits of a cache-free
forward of the same program (not applicable to programs that make decode-time decisions:
dynamic `ffn_skip`, merged KV caches). It never changes the graph.

What actually runs — the code generator's output, packed weights, the runtime's cached
decoding and speculation — is checked after lowering by `lmforge.verification`, which
`optimize()` runs when the recipe contains this pass (option `lowered`) and which adds its
checks to this pass's history entry. Every check made is listed under `checks` with the
stage it tests; `status` says whether all passed, or that nothing applied.
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
    lowered: bool = Field(
        True, description="after codegen, also check the lowered program through the Engine the compile returns "
        "(codegen backend, packed weights, KV cache decoding, speculation) at batch 1 and a left-padded batch"
    )
    padded_rows: int = Field(3, ge=2, le=8, description="rows of the left-padded batch the lowered check decodes")


def check_record(what: str, stage: str, ok: bool, detail: str, **where) -> dict:
    """One entry of `measurements["checks"]`: what was compared, the stage a failure blames."""
    return {"check": what, "stage": stage, "ok": ok, "detail": detail, **where}


def verification_status(checks: list[dict], nothing_applies: str) -> str:
    """`passed`, `failed (recorded only, fail: false)`, or why nothing was checked."""
    if not checks:
        return f"nothing checked: {nothing_applies}"
    return "passed" if all(check["ok"] for check in checks) else "failed (recorded only, fail: false)"


def pass_stage(history: list[dict]) -> str:
    """The stage a wrong program graph blames: the passes that rewrote it (else capture)."""
    names = [entry["pass"] for entry in history if entry["pass"] != "verify"]
    return f"pass {', '.join(names)}" if names else "capture"


@register_pass("verify")
class Verify(Pass):
    description = ("compare logits and greedy tokens with the original model, then (after codegen) the Engine's; "
                   "changes nothing")
    Config = VerifyConfig

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        if ctx.reference is None or ctx.sample_ids is None:
            raise LmforgeError("verify needs the reference model and sample ids in the pass context")
        ids, checks, notes = ctx.sample_ids, [], []
        stage = pass_stage(program.history)
        measurements = self._cache_consistency(program, ids, stage, checks)
        lossy = [entry["pass"] for entry in program.history if not PASSES[entry["pass"]].lossless]
        if lossy:
            measurements["lossy_passes"] = lossy
            if ctx.calibration is not None:
                quality = ctx.calibration.program_quality(program)
                measurements["heldout_quality"] = quality.as_dict()
                what, lossy_stage = f"the pipeline after {', '.join(lossy)}", f"pass {', '.join(lossy)}"
                missed = enforce_budget(f"{self.name} ({lossy_stage})", quality, ctx.quality_budget, what)
                notes += missed
                if ctx.quality_budget is not None:
                    checks.append(check_record("held-out quality within the recipe's quality_budget", lossy_stage,
                                               not missed, quality.describe()))
                else:
                    notes.append("no quality_budget in the recipe: held-out quality measured, not checked")
                notes.append(f"held-out {quality.describe()} after lossy passes {', '.join(lossy)}")
        else:
            self._against_reference(program, ctx, ids, stage, checks, measurements)
        measurements["checks"] = checks
        measurements["status"] = verification_status(
            checks, "the program decides per decoded token and no quality_budget is set")
        return PassResult(notes=tuple(notes), measurements=measurements)

    def _against_reference(self, program: Program, ctx: PassContext, ids: torch.Tensor, stage: str,
                           checks: list[dict], measurements: dict) -> None:
        """Logits and greedy tokens of the graph against the reference model."""
        with torch.no_grad():
            reference = ctx.reference(ids).logits
            logits = full_logits(program, ids)
            ours = greedy_extend(lambda x: full_logits(program, x), ids, self.config.greedy_tokens)
            theirs = greedy_extend(lambda x: ctx.reference(x).logits, ids, self.config.greedy_tokens)
        error = (logits - reference).abs().max().item()
        top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        greedy_match = bool(torch.equal(ours, theirs))
        measurements.update({"max_logit_error": error, "top1_agreement": top1, "greedy_match": greedy_match})
        shape = "x".join(map(str, ids.shape))
        checks.append(check_record("graph logits vs reference", stage, error <= self.config.max_logit_error,
                                   f"max error {error:.3g} (allowed {self.config.max_logit_error:g})", batch=shape))
        checks.append(check_record("graph greedy tokens vs reference", stage, greedy_match,
                                   f"{self.config.greedy_tokens} tokens identical: {greedy_match}", batch=shape))
        if (error > self.config.max_logit_error or not greedy_match) and self.config.fail:
            raise LmforgeError(
                f"verify ({stage}): max logit error {error:.3g} (allowed {self.config.max_logit_error:g}), "
                f"top-1 agreement {top1:.4f}, greedy tokens identical: {greedy_match}"
            )

    def _cache_consistency(self, program: Program, ids: torch.Tensor, stage: str, checks: list[dict]) -> dict:
        """Largest logit difference between cached decoding and a cache-free forward."""
        if makes_decode_time_decisions(program):
            return {"cache_consistency": "not applicable: the program decides per decoded token (dynamic ffn_skip or merged KV)"}
        with torch.no_grad():
            error = (decoded_logits(program, ids, ids.shape[1] // 2) - full_logits(program, ids)).abs().max().item()
        ok = error <= self.config.max_logit_error
        checks.append(check_record("graph: cached decoding vs cache-free forward", stage, ok,
                                   f"max logit difference {error:.3g} (allowed {self.config.max_logit_error:g})",
                                   batch="x".join(map(str, ids.shape))))
        if not ok and self.config.fail:
            raise LmforgeError(
                f"verify ({stage}): decoding with the KV cache differs from a cache-free forward by {error:.3g} "
                f"(allowed {self.config.max_logit_error:g})"
            )
        return {"cache_max_logit_error": error}
