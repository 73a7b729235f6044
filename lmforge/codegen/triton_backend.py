"""The `triton` backend: fusion groups become generated Triton kernels, matrix products stay
torch ops, and lmforge's attention ops are bound to Triton implementations.

On a CUDA device this is the fast path; on a CPU it runs only through Triton's interpreter
(`TRITON_INTERPRET=1`, about 1 ms per program instance), which is how the tests check the
generated kernels against PyTorch.
"""

from __future__ import annotations

import operator
import os

import networkx as nx
from torch import fx

from lmforge.codegen.aten import PYTHON_KERNELS
from lmforge.codegen.fusion import Partition, partition
from lmforge.codegen.triton.attention import TRITON_KERNELS
from lmforge.codegen.triton.quantized_linear import select_quantized_linears
from lmforge.codegen.triton_emit import EmittedKernel, emit_group, kernel_name
from lmforge.compiler.layermap import set_role
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import CodegenConfig
from lmforge.errors import LmforgeError

def lmforge_op_kernel(op) -> object:
    """The implementation an lmforge op runs with on this backend: its Triton kernel, or its
    Python kernel for ops that have no Triton one."""
    return TRITON_KERNELS.get(op, PYTHON_KERNELS[op])


def emit_kernels(program: Program) -> list[EmittedKernel]:
    """Every fusion group of the program as a Triton kernel, in graph order (what the
    artifact writer stores under `kernels/`)."""
    return _emit(partition(select_quantized_linears(program.graph_module)))


def _emit(parts: Partition) -> list[EmittedKernel]:
    kernels, taken = [], set()
    for group in parts.groups:
        name, suffix = kernel_name(group), 2
        while name in taken:
            name, suffix = f"{kernel_name(group)}_{suffix}", suffix + 1
        taken.add(name)
        kernels.append(emit_group(name, group, parts.shapes))
    return kernels


def triton_unavailable_reason(program: Program) -> str | None:
    """Why the program's kernels cannot run in this process (None: they can): on a CPU they
    run only through Triton's interpreter, and not in bfloat16. Compiling and saving do not
    need to run them."""
    weight = next(iter(program.graph_module.buffers()), None)
    on_cpu = weight is None or weight.device.type == "cpu"
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        return ("codegen backend 'triton' on a CPU needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before importing lmforge (slow; for tests), or run on a CUDA device")
    if on_cpu and program.meta.get("dtype") == "bfloat16":
        return ("codegen backend 'triton' cannot run bfloat16 on a CPU: Triton's interpreter computes bf16 wrongly "
                "(triton-lang/triton#11584); use runtime.dtype float16 or float32 here, the aten backend, or a CUDA "
                "device")
    return None


def require_triton_device(program: Program) -> None:
    """Fail early, with what to do, when the kernels could not run."""
    reason = triton_unavailable_reason(program)
    if reason is not None:
        raise LmforgeError(reason)


def lower_triton(program: Program, config: CodegenConfig) -> fx.GraphModule:
    """A copy of the program's graph in which every fusion group is one call to its
    kernel's launcher and every linear layer with int8 or int4 weights one call to the
    dequantizing matmul (`triton/quantized_linear.py`); the result is called like the
    program, `(input_ids, position_ids)`."""
    require_triton_device(program)
    # before partitioning: a loaded program's dequantizing nodes carry shapes and would fuse
    graph_module = select_quantized_linears(program.graph_module)
    parts = partition(graph_module)
    return kernel_graph(graph_module, parts, _emit(parts))


def kernel_graph(graph_module: fx.GraphModule, parts: Partition, kernels: list[EmittedKernel]) -> fx.GraphModule:
    """Rebuild the graph unit by unit in a topological order of (groups, other nodes): a
    group's call comes after all its inputs and before any reader of its outputs."""
    nodes = list(graph_module.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    unit_of: dict = {node: node for node in nodes}
    absorbed = set()
    for index, group in enumerate(parts.groups):
        unit_of.update({node: ("group", index) for node in group.nodes})
        absorbed.update(group.absorbed)
    order = nx.DiGraph()
    first = {}
    for node in nodes:
        if node in absorbed:
            continue
        unit = unit_of[node]
        first[unit] = min(first.get(unit, position[node]), position[node])
        order.add_node(unit)
    for index, group in enumerate(parts.groups):
        for source in group.launch_arguments:
            order.add_edge(unit_of[source], ("group", index))
    for node in nodes:
        if node in absorbed or unit_of[node] != node:
            continue
        for arg in node.all_input_nodes:
            order.add_edge(unit_of[arg], node)
    graph, env = fx.Graph(), {}
    for unit in nx.lexicographical_topological_sort(order, key=lambda unit: first[unit]):
        if isinstance(unit, tuple):
            group, kernel = parts.groups[unit[1]], kernels[unit[1]]
            call = graph.call_function(kernel.launcher, tuple(env[source] for source in group.launch_arguments))
            call.name = kernel.name
            if group.layer is not None:
                set_role(call, group.layer, "fused")  # so launches can be counted per layer
            for k, output in enumerate(group.outputs):
                env[output] = graph.call_function(operator.getitem, (call, k))
            continue
        env[unit] = graph.node_copy(unit, lambda arg: env[arg])
        if unit.op == "call_function" and unit.target in PYTHON_KERNELS:
            env[unit].target = lmforge_op_kernel(unit.target)
    graph.eliminate_dead_code()
    return fx.GraphModule(graph_module, graph)

