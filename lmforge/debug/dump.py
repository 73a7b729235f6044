"""Readable dumps of a Program after each pass: the graph as Python code, node statistics
by operator and by (layer, role), and which pass each node came from."""

from __future__ import annotations

import json
import operator
from collections import Counter
from pathlib import Path

from lmforge.compiler.layermap import role_of
from lmforge.compiler.pipeline import Instrument, provenance
from lmforge.compiler.program import Program
from lmforge.passes import Pass, PassResult


def graph_stats(program: Program) -> dict:
    """Operator counts by target, node counts by role and by provenance, weight bytes."""
    nodes = list(program.graph_module.graph.nodes)
    calls = [n for n in nodes if n.op == "call_function" and n.target is not operator.getitem]
    return {
        "nodes": len(nodes),
        "ops": len(calls),
        "by_target": dict(Counter(str(n.target) for n in calls).most_common()),
        "by_role": dict(Counter(role_of(n)[1] or "outside layers" for n in calls).most_common()),
        "by_provenance": dict(Counter(provenance(n) for n in nodes).most_common()),
        "weights": len(program.state_dict()),
        "weight_bytes": sum(t.nbytes for t in program.state_dict().values()),
    }


def annotated_code(program: Program) -> str:
    """The generated forward with each line's node tagged `# layer L role R from PASS`."""
    tags = {}
    for node in program.graph_module.graph.nodes:
        layer, role = role_of(node)
        where = f"layer {layer} {role}" if layer is not None else "outside layers"
        tags[node.name] = f"  # {where}, from {provenance(node)}"
    lines = []
    for line in program.graph_module.code.splitlines():
        name = line.strip().split(" = ", 1)[0] if " = " in line else None
        lines.append(line + tags[name] if name in tags else line)
    return "\n".join(lines) + "\n"


def write_dump(directory: Path, stem: str, program: Program) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.py").write_text(annotated_code(program))
    (directory / f"{stem}.stats.json").write_text(json.dumps(graph_stats(program), indent=2) + "\n")


class Dump(Instrument):
    """Writes `00-capture.py` and, after each pass (or only those in `print_after`),
    `NN-<pass>.py` plus `NN-<pass>.stats.json` into `directory`; keeps a copy of the
    program as captured in `captured`."""

    def __init__(self, directory: Path, print_after: set[str] | None = None) -> None:
        self.directory, self.print_after = Path(directory), print_after
        self.captured: Program | None = None

    def before_pass(self, index: int, pass_: Pass, program: Program) -> None:
        if self.captured is None:
            self.captured = program.clone()  # the report draws a layer as captured
            write_dump(self.directory, "00-capture", program)

    def after_pass(self, index: int, pass_: Pass, program: Program, result: PassResult) -> None:
        if self.print_after is None or pass_.name in self.print_after:
            write_dump(self.directory, f"{index + 1:02d}-{pass_.name}", program)
