"""CPU lowering: turn a Program into the callable the runtime executes.

`eager` runs the FX graph op by op through ATen. `inductor` hands the same graph to
torch.compile; on small models on this class of CPU it measured slower than eager after a
long compile (see benchmarks/decode.py --inductor), so eager is the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.compiler.program import Program
from lmforge.compiler.recipe import CodegenConfig

Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lower(program: Program, config: CodegenConfig) -> Runner:
    """The executable form of `program` for the backend the recipe names."""
    if config.backend == "inductor":
        return torch.compile(program.graph_module, dynamic=True)
    return program.graph_module
