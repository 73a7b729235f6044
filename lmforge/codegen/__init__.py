"""Code generation: lowering a Program to something that runs.

`lower` picks the backend the recipe names: `aten`, `fx` and `inductor` run on the CPU
(`cpu.py`); `triton` runs generated Triton kernels (`triton_backend.py`), on CUDA for speed
or on the CPU through Triton's interpreter.
"""

from __future__ import annotations

from lmforge.codegen.cpu import Runner
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import CodegenConfig


def lower(program: Program, config: CodegenConfig) -> Runner:
    """The executable form of `program` for the backend the recipe names."""
    if config.backend == "triton":
        from lmforge.codegen.triton_backend import lower_triton  # imports triton only when asked for

        return lower_triton(program, config)
    from lmforge.codegen.cpu import lower as lower_cpu

    return lower_cpu(program, config)
