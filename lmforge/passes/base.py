"""Pass base class, result record and registry.

The base class owns the ceremony (timing, node counts, the history entry, the LayerMap
refresh); a subclass writes only `apply`. Configs are pydantic models with
`extra="forbid"` and a description on every field, which `lmforge passes` prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from lmforge.compiler.program import Program


class PassConfig(BaseModel):
    """Options every pass accepts; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")


ProgressFn = Callable[[str, int, int], None]


@dataclass
class PassContext:
    """What a pass may use besides the Program: the unmodified reference model, a small
    batch of token ids to check numerics on, the calibration data and pipeline-wide quality
    budget of lossy passes, `progress(description, done, total)` for long work, and the
    rewrite counter passes consult before each rewrite (`allow_rewrite`)."""

    reference: Any = None
    sample_ids: Any = None
    calibration: Any = None
    quality_budget: Any = None
    progress: ProgressFn | None = None
    rewrite_limit: int | None = None
    rewrite_log: list[dict] = field(default_factory=list)

    def report(self, description: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(description, done, total)

    def allow_rewrite(self, pass_name: str, what: str, layer: int | None = None) -> bool:
        """Ask before each individual rewrite (LLVM opt-bisect style): every rewrite of the
        pipeline gets the next number, is logged with its pass and layer, and is applied
        only while the count is below `rewrite_limit` (None: no limit). This is what lets
        `lmforge debug bisect` name the first rewrite that breaks a model."""
        index = len(self.rewrite_log)
        applied = self.rewrite_limit is None or index < self.rewrite_limit
        self.rewrite_log.append({"index": index, "pass": pass_name, "layer": layer, "what": what, "applied": applied})
        return applied


@dataclass(frozen=True)
class PassResult:
    """What one pass did: how many rewrites, notes for the user, measured numbers."""

    rewrites: int = 0
    notes: tuple[str, ...] = ()
    measurements: dict[str, Any] = field(default_factory=dict)


class Pass:
    """A Program → Program rewrite with a typed config.

    `requires` names `meta` keys that an earlier pass must have set; `provides` names
    the keys this pass sets. `lossless` passes must keep greedy tokens identical.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    lossless: ClassVar[bool] = True

    def __init__(self, config: PassConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        """Run the pass and append its history entry; subclasses do not override this."""
        ops_before, start = program.op_count(), time.perf_counter()
        result = self.apply(program, ctx)
        program.refresh()
        program.history.append(
            {
                "pass": self.name,
                "config": self.config.model_dump(),
                "seconds": round(time.perf_counter() - start, 4),
                "ops_before": ops_before,
                "ops_after": program.op_count(),
                "rewrites": result.rewrites,
                "notes": list(result.notes),
                "measurements": result.measurements,
            }
        )
        return result


PASSES: dict[str, type[Pass]] = {}


def register_pass(name: str):
    """Class decorator: make a pass available to recipes under `name`."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        cls.name = name
        PASSES[name] = cls
        return cls

    return decorate
