"""Code generation: lowering a Program to something that runs.

`lower` picks the backend the recipe names: `aten`, `fx` and `inductor` run on the CPU
(`cpu.py`); `triton` runs generated Triton kernels (`triton_backend.py`), on CUDA for speed
or on the CPU through Triton's interpreter. `lower_for_engine` also accepts a `triton`
program that cannot run in this process, so it can be compiled (and its kernels compiled
ahead of time) on a machine without a GPU.
"""

from __future__ import annotations

from lmforge.codegen.aten.quantized_kv import refuse_on_backend
from lmforge.codegen.cpp.refused import refuse_on_cpp
from lmforge.codegen.cpu import Runner
from lmforge.codegen.triton.refused import refuse_on_triton
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import CodegenConfig
from lmforge.errors import LmforgeError


def _refuse_missing_kernels(program: Program, backend: str) -> None:
    """Refuse, at compile, a program calling an op `backend` has no kernel for."""
    if backend == "triton":
        refuse_on_triton(program.graph_module)
    elif backend == "cpp":
        refuse_on_cpp(program.graph_module)
    else:
        refuse_on_backend(program.graph_module, backend)


def lower(program: Program, config: CodegenConfig) -> Runner:
    """The executable form of `program` for the backend the recipe names."""
    _refuse_missing_kernels(program, config.backend)
    if config.backend == "triton":
        from lmforge.codegen.triton_backend import lower_triton  # imports triton only when asked for

        return lower_triton(program, config)
    from lmforge.codegen.cpu import lower as lower_cpu

    return lower_cpu(program, config)


class NotRunnableHere:
    """The runner of a program that cannot run in this process (the `triton` backend on a CPU
    without Triton's interpreter): the program can still be compiled, verified by other
    means and saved, and calling it raises why it cannot run."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, input_ids, position_ids):
        raise LmforgeError(self.reason)


def lower_for_engine(program: Program, config: CodegenConfig) -> Runner:
    """`lower`, except that a `triton` program that cannot run here (`NotRunnableHere`)
    still gives an Engine, so that compiling for a GPU works on a machine without one."""
    _refuse_missing_kernels(program, config.backend)
    if config.backend == "triton":
        from lmforge.codegen.triton_backend import triton_unavailable_reason

        reason = triton_unavailable_reason(program)
        if reason is not None:
            return NotRunnableHere(reason)
    return lower(program, config)
