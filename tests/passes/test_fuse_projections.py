"""`fuse_projections` merges linears that share an input and keeps logits and tokens."""

import pytest
import torch
from tiny_models import tiny_model

import lmforge
from lmforge.compiler.capture import capture
from lmforge.passes import PassContext
from lmforge.passes.calibrate import full_logits as program_logits
from lmforge.passes.cleanup import Cleanup
from lmforge.passes.fuse_projections import FuseProjections, FuseProjectionsConfig

aten = torch.ops.aten


def _linears(program):
    return [n for n in program.graph_module.graph.nodes if n.target is aten.linear.default]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
@pytest.mark.parametrize("attention,ffn", [(True, True), (True, False), (False, True)])
def test_fusion_removes_linears_and_keeps_logits(arch, attention, ffn):
    model = tiny_model(arch)
    program = capture(model)
    Cleanup()(program, PassContext())
    ids = torch.randint(0, 256, (2, 11))
    before, linears_before = program_logits(program, ids), len(_linears(program))
    weights_before = set(program.state_dict())
    result = FuseProjections(FuseProjectionsConfig(attention=attention, ffn=ffn))(program, PassContext())
    layers = model.config.num_hidden_layers
    gated_ffn = arch != "phi"  # phi's MLP is fc1 -> act -> fc2: nothing shares an input
    expected_removed = layers * ((2 if attention else 0) + (1 if ffn and gated_ffn else 0))
    assert len(_linears(program)) == linears_before - expected_removed
    assert result.rewrites == layers * (int(attention) + int(ffn and gated_ffn))
    if attention:
        assert all("qkv" in entry.projections and "q" not in entry.projections for entry in program.layers)
        assert not any("q_proj" in name for name in program.state_dict())
    assert set(program.state_dict()) != weights_before or expected_removed == 0
    torch.testing.assert_close(program_logits(program, ids), before, atol=1e-5, rtol=0)


def test_fused_program_generates_hf_tokens():
    model = tiny_model("qwen3")
    compiled = lmforge.optimize(model, "passes:\n  - name: cleanup\n  - name: fuse_projections\n  - name: verify\n")
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(compiled.generate(ids, max_new_tokens=20), model.generate(ids, max_new_tokens=20, do_sample=False))
