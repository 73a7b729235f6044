"""`lmforge debug`: compile with every instrument on and write what each pass did.

The output directory holds the per-pass dumps (`NN-<pass>.py`, `.stats.json`),
`debug.json` (history with diffs and verify-each records, rewrite log) and `report.html`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.api import CompiledModel, load_tokenizer, optimize, sample_ids
from lmforge.compiler.capture import load_reference
from lmforge.compiler.pipeline import Instrument
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import Recipe, load_recipe
from lmforge.debug.diff import Diff
from lmforge.debug.dump import Dump, graph_stats
from lmforge.debug.verify_each import VerifyEach
from lmforge.errors import LmforgeError
from lmforge.passes import Pass
from lmforge.passes.calibrate import tokenize_windows


class StopAfter(Instrument):
    """Declines every pass after the first one named `name`."""

    def __init__(self, name: str) -> None:
        self.name, self.stopped = name, False

    def should_run(self, index: int, pass_: Pass, program: Program) -> bool:
        if self.stopped:
            return False
        self.stopped = pass_.name == self.name
        return True


def check_ids(recipe: Recipe, tokenizer: Any, reference: Any, length: int = 128) -> torch.Tensor:
    """The batch verify-each compares on: two calibration windows when the recipe has
    calibration text, else lmforge's fixed random sample batch."""
    if recipe.calibration is not None and tokenizer is not None:
        calibration, _ = tokenize_windows(recipe.calibration, tokenizer)
        return calibration[:2, :length]
    return sample_ids(reference.config.vocab_size)


@dataclass
class DebugRun:
    compiled: CompiledModel
    captured: Program
    records: list[dict]
    directory: Path

    def as_dict(self) -> dict:
        return {
            "directory": str(self.directory),
            "history": self.compiled.program.history,
            "verify_each": self.records,
            "rewrite_log": self.compiled.rewrite_log,
            "stats_before": graph_stats(self.captured),
            "stats_after": graph_stats(self.compiled.program),
        }


def debug_compile(
    checkpoint: str | Path,
    recipe: str | Path | Recipe | None,
    directory: str | Path,
    *,
    print_after: set[str] | None = None,
    stop_after: str | None = None,
    rewrite_limit: int | None = None,
    on_pass=None,
    progress=None,
) -> DebugRun:
    """Compile `checkpoint` with dump, diff and verify-each instruments; write `debug.json`
    and `report.html` into `directory`."""
    from lmforge.debug.report import write_report

    recipe = load_recipe(recipe)
    names = [entry["name"] for entry in recipe.passes]
    for name in filter(None, [stop_after, *(print_after or ())]):
        if name not in names:
            raise LmforgeError(f"no pass named {name!r} in the recipe; its passes are: {', '.join(names) or '(none)'}")
    directory = Path(directory)
    reference = load_reference(checkpoint)
    verify = VerifyEach(reference, check_ids(recipe, load_tokenizer(checkpoint), reference))
    dump = Dump(directory, print_after)
    instruments: list[Instrument] = [dump, Diff(), verify]
    if stop_after is not None:
        instruments.insert(0, StopAfter(stop_after))
    compiled = optimize(checkpoint, recipe, on_pass=on_pass, progress=progress, instruments=instruments,
                        rewrite_limit=rewrite_limit)
    run = DebugRun(compiled, dump.captured or compiled.program, verify.records, directory)
    (directory / "debug.json").write_text(json.dumps(run.as_dict(), indent=2, default=str) + "\n")
    write_report(run, directory / "report.html")
    return run
