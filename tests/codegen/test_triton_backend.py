"""The `triton` backend: every generated kernel against the PyTorch ops it replaces, the
partition's invariants, deterministic source, and whole-model logits and greedy tokens.

There is no GPU here, so the kernels run in Triton's CPU interpreter. TRITON_INTERPRET must
be set before any `@triton.jit` function is defined (defined later, launches fail with
"0 active drivers"), hence before the imports below.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import networkx as nx  # noqa: E402
import pytest  # noqa: E402
import sympy  # noqa: E402
import torch  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from torch import fx  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

import lmforge  # noqa: E402
from lmforge.codegen.aot import attention_kernel_specs  # noqa: E402
from lmforge.codegen.fusion import POINTWISE, ROW_REDUCTIONS, FloorDiv, Modulo, partition  # noqa: E402
from lmforge.codegen.triton.attention import TRITON_KERNELS  # noqa: E402
from lmforge.codegen.triton_backend import emit_kernels, lower_triton  # noqa: E402
from lmforge.codegen.triton_emit import show  # noqa: E402
from lmforge.codegen.triton_launches import decode_step_launches  # noqa: E402
from lmforge.compiler.artifact import load_artifact  # noqa: E402
from lmforge.compiler.ops import AttentionContext, attention, attention_context  # noqa: E402
from lmforge.compiler.recipe import CodegenConfig  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402

PASSES = "passes: [{name: cleanup}, {name: fuse_projections}]\n"
_PROGRAMS: dict = {}


def program_of(arch: str, dtype: torch.dtype = torch.float32):
    """The captured, cleaned, projection-fused program of a tiny model (cached per file)."""
    if (arch, dtype) not in _PROGRAMS:
        model = tiny_model(arch).to(dtype)
        _PROGRAMS[arch, dtype] = lmforge.optimize(model, PASSES + "codegen: {backend: fx}\n").program
    return _PROGRAMS[arch, dtype]


class _Recorder(fx.Interpreter):
    """Runs the graph with PyTorch and keeps every node's value."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.values: dict = {}

    def run_node(self, node: fx.Node):
        self.values[node] = super().run_node(node)
        return self.values[node]


def reference_values(program, batch: int, seq: int) -> dict:
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))
    positions = torch.arange(seq).repeat(batch, 1)
    recorder = _Recorder(program.graph_module)
    with torch.no_grad(), attention_context(AttentionContext(kv=None, start=0, q_len=seq)):
        recorder.run(ids, positions)
    return recorder.values


@pytest.mark.parametrize(("arch", "dtype"), [
    ("llama", torch.float32), ("qwen2", torch.float32), ("gemma2", torch.float32), ("llama", torch.float16),
    ("qwen3", torch.float32),  # RoPE's rotated halves read the per-head q/k RMSNorm
    ("opt", torch.float32),  # [batch*seq, n] matmul outputs: sizes from input_ids, index division
])
def test_each_kernel_matches_the_pytorch_ops_it_replaces(arch, dtype):
    program = program_of(arch, dtype)
    kernels = emit_kernels(program)
    tolerance = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for batch, seq in ((2, 5), (1, 1)):  # one kernel serves a prefill and a decode step
        values = reference_values(program, batch, seq)
        for kernel in kernels:
            outputs = kernel.launcher(*(values[node] for node in kernel.group.launch_arguments))
            for node, output in zip(kernel.group.outputs, outputs, strict=True):
                expected = values[node]
                assert output.dtype == expected.dtype and output.shape == expected.shape, (kernel.name, node.name)
                torch.testing.assert_close(output, expected, **tolerance, msg=f"{kernel.name}: {node.name}")


def test_index_expressions_print_as_python_evaluates_them():
    """`//` and `%` bind as tightly as `*` in Python: `x // 64*seq` would be `(x // 64) * seq`."""
    col, row, seq = (sympy.Symbol(name, integer=True, nonnegative=True) for name in ("col", "row", "seq"))
    text = show(FloorDiv(col + 64 * row, 64 * seq) + Modulo(col + 3 * row, 4 * seq))
    for values in ({"col": 5, "row": 7, "seq": 3}, {"col": 63, "row": 2, "seq": 1}):
        expected = (values["col"] + 64 * values["row"]) // (64 * values["seq"]) + \
            (values["col"] + 3 * values["row"]) % (4 * values["seq"])
        assert eval(text, {}, values) == expected, text


def test_emitting_twice_gives_identical_source():
    first = [(kernel.name, kernel.source) for kernel in emit_kernels(program_of("gemma2"))]
    again = [(kernel.name, kernel.source) for kernel in emit_kernels(program_of("gemma2"))]
    recaptured = lmforge.optimize(tiny_model("gemma2"), PASSES + "codegen: {backend: fx}\n").program
    assert first == again == [(kernel.name, kernel.source) for kernel in emit_kernels(recaptured)]
    assert len({name for name, _ in first}) == len(first)


class _CountedKernel:
    """Stands in for a launcher's `@triton.jit` kernel: records each launch's grid, then runs it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_a_launch_over_zero_rows_returns_empty_outputs_without_running_a_program(monkeypatch):
    """A serving step that only prefills needs no logits: gemma2's soft-cap after the LM head
    gets (1, 0, vocab). Every launcher returns its empty outputs and launches nothing (a
    program would divide by the zero sizes recovering its row's indices)."""
    kernels = emit_kernels(program_of("gemma2"))
    assert all("    if rows == 0" in kernel.source for kernel in kernels)
    (softcap,) = [kernel for kernel in kernels if kernel.name == "softcap"]
    counted = _CountedKernel(softcap.launcher.__globals__["softcap_kernel"])
    monkeypatch.setitem(softcap.launcher.__globals__, "softcap_kernel", counted)
    logits = torch.randn(1, 2, 256)
    (capped,) = softcap.launcher(logits)
    torch.testing.assert_close(capped, torch.tanh(logits / 20.0) * 20.0, atol=2e-6, rtol=2e-6)
    assert len(counted.grids) == 1
    for shape in ((1, 0, 256), (0, 3, 256)):
        (empty,) = softcap.launcher(torch.randn(shape))
        assert empty.shape == shape and empty.dtype == torch.float32
    assert len(counted.grids) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_partition_covers_every_pointwise_node_once_without_cycles(arch):
    graph_module = program_of(arch).graph_module
    parts = partition(graph_module)
    grouped = [node for group in parts.groups for node in group.nodes]
    pointwise = [node for node in graph_module.graph.nodes if node.target in POINTWISE or node.target in ROW_REDUCTIONS]
    assert sorted(n.name for n in grouped) == sorted(n.name for n in pointwise)
    assert all(group.reductions <= 1 for group in parts.groups)
    group_of = {node: index for index, group in enumerate(parts.groups) for node in group.nodes}
    kernels_graph = nx.DiGraph()
    for source, target in parts.graph.edges:
        a, b = group_of.get(source, source.name), group_of.get(target, target.name)
        if a != b:
            kernels_graph.add_edge(a, b)
    assert nx.is_directed_acyclic_graph(kernels_graph)


LAUNCH_BUDGET = 6
"""Launches a decode step may make per layer besides its matrix products."""


@pytest.mark.parametrize(("context", "attention_kernels"), [
    (16, ["decode_attention_partial"]),  # one split: stage 1 writes the output itself
    (257, ["decode_attention_partial", "decode_attention_combine"]),  # 258 keys: two splits
])
def test_decode_step_launches_are_counted_per_layer_by_kind(context, attention_kernels):
    launches = decode_step_launches(program_of("llama"), context=context)
    # before attention: RMSNorm (+ the previous layer's residual), RoPE of q and k; attention:
    # split-K, whose stage 1 also writes the new key and value into the cache (no copies);
    # after it: RMSNorm + residual, SiLU·mul. Outside the layers: the embedding lookup, the
    # last layer's residual add with the final norm (the model's norm), the LM head
    layer = {"generated": 4, "matmul": 4, "attention": len(attention_kernels)}
    assert launches.by_layer() == {0: layer, 1: layer, None: {"other": 1, "generated": 1, "matmul": 1}}
    assert launches.besides_matmuls() == {0: 4 + len(attention_kernels), 1: 4 + len(attention_kernels), None: 2}
    assert max(launches.besides_matmuls()[layer] for layer in (0, 1)) <= LAUNCH_BUDGET
    # the LM head reads the last position in place: no copy for `last_position`
    assert [launch.kernel for launch in launches.launches if launch.layer is None] == [
        "aten.embedding", "rmsnorm_residual_final_l1_kernel", "aten.mm"]
    assert [launch.kernel for launch in launches.launches if launch.kind == "attention"] == attention_kernels * 2


def test_whole_model_matches_hugging_face():
    model = tiny_model("llama")
    compiled = lmforge.optimize(model, PASSES + "codegen: {backend: triton}\n")
    targets = {node.target for node in compiled.engine.runner.graph.nodes if node.op == "call_function"}
    assert TRITON_KERNELS[attention] in targets and not targets & (POINTWISE | ROW_REDUCTIONS)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=0)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8), greedy)


def test_every_argument_the_attention_aot_specs_hint_is_divisible_by_16_at_every_launch(monkeypatch):
    """`aot.attention_kernel_specs` compiles the attention kernels with the 16-divisibility
    hints Triton's JIT would add at run time; a hint the launches do not honour would report
    on a kernel that never runs (and be wrong code if it ever did)."""
    model = tiny_model("llama")
    compiled = lmforge.optimize(model, PASSES + "codegen: {backend: triton}\n")
    launches = []
    original = KernelInterface.__getitem__

    def recording(kernel, grid):
        run = original(kernel, grid)

        def launch(*args, **kwargs):
            launches.append((kernel.__name__, dict(zip(kernel.arg_names, args))))
            return run(*args, **kwargs)

        return launch

    monkeypatch.setattr(KernelInterface, "__getitem__", recording)
    compiled.generate(torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(5)), max_new_tokens=3)
    config = model.config
    specs = attention_kernel_specs(config.head_dim, config.num_attention_heads // config.num_key_value_heads,
                                   torch.float32)
    for spec in specs:
        calls = [arguments for name, arguments in launches if name == spec.name]
        assert calls or spec.name == "decode_attention_combine", spec.name  # one split at this context
        assert ("stride_nkb" in spec.aligned) == ("stride_nkb" in spec.signature)  # the new keys' strides too
        for arguments in calls:
            for arg in spec.aligned:
                value = arguments[arg]
                value = value.data_ptr() if isinstance(value, torch.Tensor) else value
                assert value % 16 == 0, (spec.name, arg, value)


def test_artifact_keeps_each_kernel_source_with_its_hash(tmp_path):
    model = tiny_model("llama")
    compiled = lmforge.optimize(model, PASSES + "codegen: {backend: triton, targets: []}\n")  # no AOT compile
    out = compiled.save(tmp_path / "artifact")
    manifest = json.loads((out / "manifest.json").read_text())
    # the kernels a load generates: the graph's round trip through program.json renames nodes
    sources = {kernel.name: kernel.source for kernel in emit_kernels(load_artifact(out)[0])}
    assert [entry["name"] for entry in manifest["kernels"]] == list(sources)
    for entry in manifest["kernels"]:
        assert (out / entry["file"]).read_text() == sources[entry["name"]]
        assert entry["file"] in manifest["files"] and entry["ops"]


def test_a_loaded_artifact_counts_the_launches_of_the_program_it_was_saved_from(tmp_path):
    compiled = lmforge.optimize(tiny_model("llama"), PASSES + "codegen: {backend: triton, targets: []}\n")
    loaded = load_artifact(compiled.save(tmp_path / "artifact"))[0]
    # the save's export puts a metadata check before each `aten.to`: a host-side assert, no kernel
    assert torch.ops.aten._assert_tensor_metadata.default in {node.target for node in loaded.graph_module.graph.nodes}
    in_memory, from_disk = decode_step_launches(compiled.program), decode_step_launches(loaded)
    assert from_disk.by_layer() == in_memory.by_layer()
    assert [launch.kernel for launch in from_disk.launches] == [launch.kernel for launch in in_memory.launches]


def test_cpu_without_the_interpreter_is_refused_with_a_way_out(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(LmforgeError, match="TRITON_INTERPRET=1"):
        lower_triton(program_of("llama"), CodegenConfig(backend="triton"))
