"""The `aten` code generator runs the same kernels as the FX graph (identical numbers), or,
with packed weights, the same products in oneDNN's layout (same greedy tokens)."""

import pytest
import torch
from tiny_models import tiny_model

import lmforge
from lmforge.codegen.cpu import emit_aten_source
from lmforge.codegen.cpu_kernels import can_pack_weights, select_cpu_kernels


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
