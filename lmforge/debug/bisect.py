"""Bisect a pipeline to the first rewrite that breaks a quality budget (LLVM
`-opt-bisect-limit` style).

Every rewrite any pass makes asks `PassContext.allow_rewrite` first and gets a number; a
run with `rewrite_limit=N` applies only rewrites 0..N-1. Binary search over N finds the
smallest limit whose program breaks the budget, so the culprit is rewrite N-1: its pass,
its layer, and what it did. `verify` passes are left out of the probes: they change
nothing and would stop a broken probe with an error instead of letting it be measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.api import load_tokenizer, optimize
from lmforge.compiler.capture import load_reference
from lmforge.compiler.pipeline import Instrument
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import Recipe, load_recipe
from lmforge.debug.session import check_ids
from lmforge.debug.verify_each import measure
from lmforge.passes import Pass


@dataclass(frozen=True)
class BisectBudget:
    """What counts as broken: any set limit crossed (max_logit_error alone by default)."""

    max_logit_error: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    max_ppl_increase: float | None = None

    def broken(self, record: dict) -> list[str]:
        checks = [
            ("max_logit_error", self.max_logit_error, record["max_logit_error"] > (self.max_logit_error or 0)),
            ("kl", self.max_kl, record["kl"] > (self.max_kl or 0)),
            ("top1", self.min_top1, record["top1"] < (self.min_top1 or 0)),
            ("ppl_increase", self.max_ppl_increase, record["ppl_increase"] > (self.max_ppl_increase or 0)),
        ]
        return [f"{name} {record[name]:.4g} (limit {limit:g})" for name, limit, crossed in checks if limit is not None and crossed]

    def or_default(self) -> BisectBudget:
        limits = (self.max_logit_error, self.max_kl, self.min_top1, self.max_ppl_increase)
        return self if any(v is not None for v in limits) else BisectBudget(max_logit_error=1e-3)


@dataclass
class BisectResult:
    total_rewrites: int
    probes: list[dict] = field(default_factory=list)
    culprit: dict | None = None
    before: dict | None = None
    after: dict | None = None
    message: str = ""

    def as_dict(self) -> dict:
        return {"total_rewrites": self.total_rewrites, "culprit": self.culprit, "before": self.before,
                "after": self.after, "probes": self.probes, "message": self.message}


class _SkipVerify(Instrument):
    def should_run(self, index: int, pass_: Pass, program: Program) -> bool:
        return pass_.name != "verify"


def bisect(checkpoint: str | Path, recipe: str | Path | Recipe | None, budget: BisectBudget, progress=None) -> BisectResult:
    """Find the first rewrite of `recipe`'s pipeline after which `budget` is broken."""
    recipe, budget = load_recipe(recipe), budget.or_default()
    reference = load_reference(checkpoint)
    ids = check_ids(recipe, load_tokenizer(checkpoint), reference)
    cache: dict[int | None, tuple[dict, list[dict]]] = {}

    def probe(limit: int | None) -> tuple[dict, list[dict]]:
        if limit not in cache:
            compiled = optimize(checkpoint, recipe, instruments=[_SkipVerify()], rewrite_limit=limit)
            cache[limit] = (measure(compiled.program, reference, ids), compiled.rewrite_log)
            if progress is not None:
                progress(f"probe with {'all' if limit is None else limit} rewrites", len(cache), len(cache) + 1)
        return cache[limit]

    full, log = probe(None)
    result = BisectResult(total_rewrites=len(log))
    if not budget.broken(full):
        result.message = f"the whole pipeline ({len(log)} rewrites) stays within the budget"
        result.after = full
        return result
    untouched, _ = probe(0)
    if budget.broken(untouched):
        result.message = "the captured program breaks the budget before any rewrite: " + "; ".join(budget.broken(untouched))
        result.after = untouched
        return result
    good, bad = 0, len(log)
    while bad - good > 1:
        middle = (good + bad) // 2
        record, _ = probe(middle)
        result.probes.append({"limit": middle, "broken": bool(budget.broken(record)), **record})
        good, bad = (good, middle) if budget.broken(record) else (middle, bad)
    culprit = log[bad - 1]
    result.culprit, result.before, result.after = culprit, probe(good)[0], probe(bad)[0]
    layer = f", layer {culprit['layer']}" if culprit["layer"] is not None else ""
    result.message = (
        f"rewrite #{culprit['index']} of {len(log)} breaks the budget: pass {culprit['pass']}{layer}: {culprit['what']}; "
        + "; ".join(budget.broken(result.after))
    )
    return result
