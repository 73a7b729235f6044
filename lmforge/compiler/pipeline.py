"""Run a recipe's passes over a Program, in order, with instruments around every pass.

Instruments (TVM-style) see the Program before and after each pass without any pass
knowing: the debug tools dump, diff and verify through them, and `Provenance` is always on,
so every node records which pass created or last rewired it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import fx

from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError
from lmforge.passes import Pass, PassContext, PassResult

PassCallback = Callable[[int, Pass, PassResult | None], None]
PROVENANCE_KEY = "lmforge_pass"


class Instrument:
    """Hooks around each pass. `should_run` may skip a pass (how `--stop-after` works);
    `after_pass` runs after the pass's history entry exists, so it may add to it."""

    def should_run(self, index: int, pass_: Pass, program: Program) -> bool:
        return True

    def before_pass(self, index: int, pass_: Pass, program: Program) -> None:
        pass

    def after_pass(self, index: int, pass_: Pass, program: Program, result: PassResult) -> None:
        pass


def _flatten(value) -> list:
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _flatten(element)]
    return [value]


def node_signature(node: fx.Node) -> tuple:
    """What a node computes from what: its op, target and the names of its inputs."""
    def name(value) -> str:
        return value.name if isinstance(value, fx.Node) else repr(value)

    inputs = tuple(name(value) for value in _flatten(node.args))
    options = tuple(sorted((key, name(value)) for key, value in node.kwargs.items()))
    return node.op, str(node.target), inputs, options


def provenance(node: fx.Node) -> str:
    """The pass that created or last rewired `node` ("capture" for untouched nodes)."""
    return (node.meta.get("custom") or {}).get(PROVENANCE_KEY, "capture")


class Provenance(Instrument):
    """Stamps the pass's name on every node it created or whose inputs it changed."""

    def before_pass(self, index: int, pass_: Pass, program: Program) -> None:
        self.before = {node.name: node_signature(node) for node in program.graph_module.graph.nodes}

    def after_pass(self, index: int, pass_: Pass, program: Program, result: PassResult) -> None:
        for node in program.graph_module.graph.nodes:
            if self.before.get(node.name) != node_signature(node):
                node.meta["custom"] = {**(node.meta.get("custom") or {}), PROVENANCE_KEY: pass_.name}


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
    program: Program,
    passes: list[Pass],
    ctx: PassContext,
    on_pass: PassCallback | None = None,
    instruments: Sequence[Instrument] = (),
) -> Program:
    """Apply `passes` to `program` in place; `on_pass(i, pass, result)` is called before
    (result None) and after each one, which is how the CLI draws its progress bar.
    A pass some instrument declines is not run and has no history entry."""
    check_order(passes, program.meta)
    instruments = [Provenance(), *instruments]
    for index, pass_ in enumerate(passes):
        if not all(instrument.should_run(index, pass_, program) for instrument in instruments):
            continue
        if on_pass:
            on_pass(index, pass_, None)
        for instrument in instruments:
            instrument.before_pass(index, pass_, program)
        result = pass_(program, ctx)
        for instrument in instruments:
            instrument.after_pass(index, pass_, program, result)
        if on_pass:
            on_pass(index, pass_, result)
    return program
