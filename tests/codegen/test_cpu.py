"""The `aten` code generator runs the same kernels as the FX graph: identical numbers."""

import torch
from tiny_models import tiny_model

import lmforge
from lmforge.codegen.cpu import emit_aten_source


def test_aten_backend_equals_fx_backend_exactly():
    model = tiny_model("gemma2")
    aten = lmforge.optimize(model, "codegen: {backend: aten}\n")
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
