"""Kernel launches of one decode step on the `triton` backend, counted by running the step.

A decode step at small batch costs launches more than arithmetic, so the backend is held to
a budget of launches per layer besides the matrix products. Counting fusion groups is not
enough for that: attention runs one or two Triton kernels (split-K partials, then their
combination once the context needs several splits), a cache the attention kernel does not
write itself (a streaming ring) is written by torch indexing, and any op left to torch
between kernels launches one of its own on a GPU. So the step is run once, through the
lowered graph, and every launch is recorded with the graph node and the layer it belongs
to: each Triton launch, and each PyTorch op that launches a kernel on a GPU (views and
allocations do not; a copy, a concatenation or a `.item()` does).

A generated kernel counts in the layer of its graph nodes, the highest when they span two
(a layer's input norm also adds the previous layer's residual: it counts in the layer whose
norm it computes). The kernel that computes the model's final norm counts outside the
layers, like the embedding and the LM head, even though it also adds the last layer's
residual: without the final norm that add would have no kernel of its own (as every other
layer's closing residual add rides on the next layer's norm), so the launch is the model's,
not the layer's.

On a CPU this needs Triton's interpreter (`TRITON_INTERPRET=1`), like every run of the
backend; the counts do not depend on the device.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import KernelInterface

from lmforge.codegen.fusion import computes_final_norm
from lmforge.codegen.triton.attention import TRITON_KERNELS
from lmforge.codegen.triton.quantized_linear import dequant_linear
from lmforge.codegen.triton_backend import emit_kernels, lower_triton
from lmforge.compiler.kv_layout import allocate_kv_buffers
from lmforge.compiler.layermap import role_of
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.compiler.program import RUNTIME_CHECKS, Program
from lmforge.compiler.recipe import CodegenConfig

aten = torch.ops.aten

MATMULS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})
COPIES = frozenset({
    aten.copy_.default, aten.clone.default, aten._to_copy.default, aten.cat.default, aten.index_put_.default,
    aten.index_copy_.default, aten._local_scalar_dense.default,
})
NO_KERNEL = frozenset({
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.empty_like.default, aten._unsafe_view.default, aten.detach.default, aten.lift_fresh.default,
    aten.set_.source_Storage_storage_offset, *RUNTIME_CHECKS,
})
"""Ops that launch no kernel: allocations, views, and export's runtime checks (metadata and size
assertions run on the host; a loaded artifact's graph has one before each `aten.to`, which
torch.export adds again when the artifact is saved)."""
KINDS = ("matmul", "generated", "attention", "copy", "other")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the graph node that made it, that node's layer (None outside the
    decoder layers), what kind of kernel it is (one of `KINDS`) and the kernel's name."""

    node: str
    layer: int | None
    kind: str
    kernel: str


@dataclass(frozen=True)
class StepLaunches:
    """Every launch of one decode step, in order."""

    launches: tuple[Launch, ...]

    def by_layer(self) -> dict[int | None, dict[str, int]]:
        """Per layer (None: outside the layers), launches of each kind."""
        table: dict[int | None, Counter] = {}
        for launch in self.launches:
            table.setdefault(launch.layer, Counter())[launch.kind] += 1
        return {layer: dict(counts) for layer, counts in table.items()}

    def besides_matmuls(self) -> dict[int | None, int]:
        """Per layer, the launches that are not matrix products: the number the budget is about."""
        return {layer: sum(n for kind, n in counts.items() if kind != "matmul")
                for layer, counts in self.by_layer().items()}

    def as_dict(self) -> dict:
        """A JSON-ready summary: totals, per-layer counts by kind, and each launch."""
        return {
            "total": len(self.launches),
            "per_layer": {str(layer): counts for layer, counts in self.by_layer().items()},
            "besides_matmuls": {str(layer): count for layer, count in self.besides_matmuls().items()},
            "launches": [vars(launch) for launch in self.launches],
        }


class _Recorder(TorchDispatchMode):
    """Records the kernels PyTorch would launch, and, through `triton_launch`, Triton's;
    ops a Triton launch makes itself (the interpreter moving arguments) are not kernels.
    Nodes named in `outside_layers` count outside the layers whatever their layer tag."""

    def __init__(self, outside_layers: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.launches: list[Launch] = []
        self.node: fx.Node | None = None
        self.inside_triton = False
        self.outside_layers = outside_layers

    def record(self, kind: str, kernel: str) -> None:
        node = self.node
        layer = None if node is None or node.name in self.outside_layers else role_of(node)[0]
        self.launches.append(Launch(node.name if node else "-", layer, kind, kernel))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton and func not in NO_KERNEL and not func.is_view:
            self.record("matmul" if func in MATMULS else "copy" if func in COPIES else "other", str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def triton_launches(self, kind_of_node) -> Iterator[None]:
        """Record every `kernel[grid](...)` launch while active, as `kind_of_node(node)`."""
        original = KernelInterface.__getitem__
        recorder = self

        def launch_with_record(kernel, grid):
            run = original(kernel, grid)

            def launch(*args, **kwargs):
                recorder.record(kind_of_node(recorder.node), kernel.__name__)
                recorder.inside_triton = True
                try:
                    return run(*args, **kwargs)
                finally:
                    recorder.inside_triton = False

            return launch

        KernelInterface.__getitem__ = launch_with_record
        try:
            yield
        finally:
            KernelInterface.__getitem__ = original


class _NodeTracker(fx.Interpreter):
    """Runs the lowered graph, telling the recorder which node is running."""

    def __init__(self, graph_module: fx.GraphModule, recorder: _Recorder) -> None:
        super().__init__(graph_module)
        self.recorder = recorder

    def run_node(self, node: fx.Node):
        self.recorder.node = node
        try:
            return super().run_node(node)
        finally:
            self.recorder.node = None


def _kind_of(node: fx.Node | None) -> str:
    """The kind of a Triton launch by the node that made it: attention, a quantized linear
    layer's matmul (its GEMV or GEMM, and the GEMV's split-K combine) or a generated kernel."""
    attention_kernels = set(TRITON_KERNELS.values())
    if node is not None and node.target is dequant_linear:
        return "matmul"
    return "attention" if node is not None and node.target in attention_kernels else "generated"


def decode_step_launches(program: Program, context: int = 16, batch: int = 1) -> StepLaunches:
    """The launches of one decode step of `program` on the `triton` backend, after a prefill
    of `context` tokens in each of `batch` rows (plain decoding: one new token per row)."""
    runner = lower_triton(program, CodegenConfig(backend="triton"))
    final_norm = frozenset(kernel.name for kernel in emit_kernels(program) if computes_final_norm(kernel.group))
    dtype = getattr(torch, program.meta["dtype"])
    buffers = allocate_kv_buffers(program.meta["kv_cache"], batch, context + 1, dtype)
    ids = (torch.arange(batch * (context + 1)).view(batch, context + 1) * 7919 + 3) % program.config.vocab_size
    positions = torch.arange(context + 1).expand(batch, context + 1)
    with torch.no_grad():
        with attention_context(AttentionContext(kv=buffers, start=0, q_len=context, last_only=True)):
            runner(ids[:, :context], positions[:, :context])
        recorder = _Recorder(final_norm)
        step = AttentionContext(kv=buffers, start=context, q_len=1, last_only=False)
        with attention_context(step), recorder.triton_launches(_kind_of), recorder:
            _NodeTracker(runner, recorder).run(ids[:, context:], positions[:, context:])
    return StepLaunches(tuple(recorder.launches))

