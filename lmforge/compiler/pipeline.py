"""Run a recipe's passes over a Program, in order, checking what each one requires."""

from __future__ import annotations

from collections.abc import Callable

from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError
from lmforge.passes import Pass, PassContext, PassResult

PassCallback = Callable[[int, Pass, PassResult | None], None]


def check_order(passes: list[Pass], meta: dict) -> None:
    """Fail before any work if a pass needs a `meta` key no earlier pass provides."""
    available = set(meta)
    for index, pass_ in enumerate(passes):
        missing = [key for key in pass_.requires if key not in available]
        if missing:
            raise LmforgeError(
                f"pass {index} ({pass_.name}) requires {', '.join(missing)}, which no earlier "
                f"pass provides; move it after the pass that does"
            )
        available.update(pass_.provides)


def run_pipeline(
    program: Program, passes: list[Pass], ctx: PassContext, on_pass: PassCallback | None = None
) -> Program:
    """Apply `passes` to `program` in place; `on_pass(i, pass, result)` is called before
    (result None) and after each one, which is how the CLI draws its progress bar."""
    check_order(passes, program.meta)
    for index, pass_ in enumerate(passes):
        if on_pass:
            on_pass(index, pass_, None)
        result = pass_(program, ctx)
        if on_pass:
            on_pass(index, pass_, result)
    return program
