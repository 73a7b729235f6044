"""CPU lowering: turn a Program into the callable the runtime executes.

At this model size a decode step is a few hundred small operators plus one pass over every
weight, which for ref-llama-py (28 MB in fp32) comes from DRAM each step: per-operator
overhead and weight bandwidth are what matter, not arithmetic. Backends:

- `aten` (default): emit the graph as Python source in which every ATen overload is bound
  to its C++ entry point and every weight to a global name of the generated function. This skips, per operator,
  the `torch.ops.aten.x.y` attribute walk and `OpOverload.__call__`, and per weight the
  module attribute lookup; lmforge's own ops call their Python kernel without a trip
  through the dispatcher; `torch.cond` branch subgraphs are emitted the same way and
  called through a plain `if`. Same kernels, same numbers as `fx`.
  With `pack_weights` (default) linear layers multiply oneDNN-packed weights
  (`cpu_kernels.py`): about 2× faster matrix products at batch 1 here.
- `fx`: run the FX GraphModule as it is.
- `inductor`: `torch.compile` of the graph (fused elementwise kernels), after a ~40 s
  first-call compile; compare with `aten` in benchmarks/decode.py --inductor.
- `cpp`: the whole step compiled to C++ by Inductor per shape bucket (`cpp_backend.py`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch
from torch import fx

from lmforge.codegen.aten import PYTHON_KERNELS
from lmforge.codegen.cpu_kernels import select_cpu_kernels
from lmforge.compiler.ops import last_position
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import CodegenConfig

Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_OP_CALL = re.compile(r"torch\.ops\.(\w+)\.(\w+)\.(\w+)\(")
_WEIGHT = re.compile(r"\bself\.(\w+)\b")
_COND_CALL = "torch.ops.higher_order.cond("


def run_branch(predicate: torch.Tensor, on_true: Runner, on_false: Runner, operands: tuple) -> tuple:
    """`torch.cond` as a plain Python branch: the higher-order op's dispatch (mode and
    functionalization checks) costs more per call than the small branches it guards here."""
    return on_true(*operands) if predicate else on_false(*operands)


def emit_aten_source(graph_module: fx.GraphModule, pack_weights: bool = False) -> tuple[str, dict]:
    """Python source of the forward with ops and weights as plain global names, and the
    globals it needs."""
    bound: dict = {}

    def bind_op(match: re.Match) -> str:
        namespace, op, overload = match.groups()
        overload_packet = getattr(getattr(getattr(torch.ops, namespace), op), overload)
        name = f"{namespace}_{op}_{overload}"
        # aten and mkldnn overloads have a C++ entry point; lmforge ops are Python kernels,
        # called directly instead of through the dispatcher (which costs more than their work)
        native = namespace in ("aten", "mkldnn")
        bound[name] = overload_packet._op if native else PYTHON_KERNELS.get(overload_packet, overload_packet)
        return f"{name}("

    def bind_weight(match: re.Match) -> str:
        name = match.group(1)
        attribute = getattr(graph_module, name)
        bound[f"w_{name}"] = compile_aten(attribute, pack_weights) if isinstance(attribute, fx.GraphModule) else attribute
        return f"w_{name}"

    bound["run_branch"] = run_branch
    source = _OP_CALL.sub(bind_op, graph_module.code.replace(_COND_CALL, "run_branch("))
    source = _WEIGHT.sub(bind_weight, source)
    source = source.replace("def forward(self, ", "def forward(", 1)
    return source, bound


def compile_aten(graph_module: fx.GraphModule, pack_weights: bool = False) -> Runner:
    if pack_weights:
        graph_module = select_cpu_kernels(graph_module)
    source, bound = emit_aten_source(graph_module, pack_weights)
    namespace = dict(graph_module.forward.__globals__)
    namespace.update(bound)
    exec(compile(source, "<lmforge-cpu-forward>", "exec"), namespace)
    return namespace["forward"]


def _every_position(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph whose LM head always sees every position: Inductor checks each
    op's output shape against its fake kernel, which cannot know that `last_position`
    shortens the sequence when the forward asks for `last_only`."""
    graph = copy.deepcopy(graph_module.graph)
    for node in list(graph.nodes):
        if node.target is last_position:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(graph_module, graph)


def lower(program: Program, config: CodegenConfig) -> Runner:
    """The executable form of `program` for the backend the recipe names."""
    if config.backend == "inductor":
        return torch.compile(_every_position(program.graph_module), dynamic=True)
    if config.backend == "fx":
        return program.graph_module
    if config.backend == "cpp":
        from lmforge.codegen.cpp_backend import CppRunner  # imports Inductor only when asked for

        return CppRunner(program, config.cpp_products)
    return compile_aten(program.graph_module, config.pack_weights)
