"""The `aten` code generator runs the same kernels as the FX graph (identical numbers), or,
with packed weights, the same products in oneDNN's layout (same greedy tokens)."""

import pytest
import torch
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import lmforge
from lmforge.codegen.cpu import compile_aten, emit_aten_source
from lmforge.codegen.cpu_kernels import can_pack_weights, select_cpu_kernels
from lmforge.compiler.capture import capture
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.passes.ffn_skip import make_dynamic
from lmforge.runtime.engine import Engine


def test_aten_backend_equals_fx_backend_exactly():
    model = tiny_model("gemma2")
    aten = lmforge.optimize(model, "codegen: {backend: aten, pack_weights: false}\n")
    fx = lmforge.optimize(model, "codegen: {backend: fx}\n")
    ids = torch.randint(3, 256, (2, 30))
    assert torch.equal(aten(ids).logits, fx(ids).logits)
    assert torch.equal(aten.generate(ids, max_new_tokens=16), fx.generate(ids, max_new_tokens=16))


def test_emitted_source_binds_every_op_and_weight():
    compiled = lmforge.optimize(tiny_model("llama"), "passes: [{name: cleanup}]\n")
    source, bound = emit_aten_source(compiled.program.graph_module)
    assert "torch.ops." not in source and "self." not in source
    assert any(isinstance(value, torch.Tensor) for value in bound.values())
    assert source.count("lmforge_attention_default(") == compiled.program.meta["num_layers"]


def test_inductor_backend_generates_the_same_tokens():
    model = tiny_model("llama")
    inductor = lmforge.optimize(model, "passes: [{name: cleanup}, {name: fuse_projections}]\ncodegen: {backend: inductor}\n")
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(inductor.generate(ids, max_new_tokens=12), expected)


@pytest.mark.skipif(not can_pack_weights(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("arch", ["llama", "opt", "phi"])
def test_packed_weights_keep_logits_and_greedy_tokens(arch):
    model = tiny_model(arch)
    recipe = "passes: [{name: cleanup}, {name: fuse_projections}]\ncodegen: {backend: aten, pack_weights: %s}\n"
    packed, plain = (lmforge.optimize(model, recipe % flag) for flag in ("true", "false"))
    graph = packed.program.graph_module
    linears = [n for n in graph.graph.nodes if n.target is torch.ops.aten.linear.default]
    packed_graph = select_cpu_kernels(graph)
    calls = [n for n in packed_graph.graph.nodes if n.target is torch.ops.mkldnn._linear_pointwise.default]
    assert linears and len(calls) == len(linears)
    assert not any(n.target is torch.ops.aten.linear.default for n in packed_graph.graph.nodes)
    assert all(not p.is_mkldnn for p in graph.state_dict().values()), "the program's own weights stay plain"
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(packed(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(packed.generate(ids, max_new_tokens=12), expected)


class _LinearCalls(TorchDispatchMode):
    """Counts the linear products a forward runs, plain and packed, inside cond branches too."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.counts = {"plain": 0, "packed": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.higher_order.cond:
            predicate, on_true, on_false, operands = args
            with self:
                return (on_true if predicate else on_false)(*operands)
        if func is torch.ops.aten.linear.default:
            self.counts["plain"] += 1
        elif func is torch.ops.mkldnn._linear_pointwise.default:
            self.counts["packed"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not can_pack_weights(), reason="this torch build has no oneDNN")
def test_dynamic_ffn_skip_branches_multiply_packed_weights():
    model = tiny_model("llama", num_layers=4)
    program = capture(model)
    make_dynamic(program, [2, 3], threshold=0.2, warmup=2)
    linears = sum(node.target is torch.ops.aten.linear.default for node in program.graph_module.graph.nodes)
    linears += sum(node.target is torch.ops.aten.linear.default
                   for name in ("ffn_skip_2_compute", "ffn_skip_3_compute")
                   for node in getattr(program.graph_module, name).graph.nodes)
    packed, plain = compile_aten(program.graph_module, pack_weights=True), compile_aten(program.graph_module)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(12).expand(2, -1)
    recorder = _LinearCalls()
    with torch.no_grad(), attention_context(AttentionContext(kv=None, start=0, q_len=12)), recorder:
        logits = packed(ids, positions)  # a cache-free forward computes every FFN
    assert recorder.counts == {"plain": 0, "packed": linears}
    assert all(not tensor.is_mkldnn for tensor in program.state_dict().values()), "the program's own weights stay plain"
    with torch.no_grad(), attention_context(AttentionContext(kv=None, start=0, q_len=12)):
        torch.testing.assert_close(logits, plain(ids, positions), atol=1e-4, rtol=1e-4)
    skip_counts: dict[int, int] = {}
    tokens = {}
    for name, runner in (("packed", packed), ("plain", plain)):
        engine = Engine(runner, program.meta["kv_cache"], max_seq_len=64)
        engine.skip_counts = skip_counts if name == "packed" else None
        tokens[name] = engine.generate(ids, max_new_tokens=16)
    assert torch.equal(tokens["packed"], tokens["plain"])
    assert sum(skip_counts.values()) > 0, "the gates skipped some FFNs, so both branches ran"
