"""`cleanup` removes export checks, no-op casts and duplicates, and keeps the numbers."""

import torch
from tiny_models import tiny_model

from lmforge.compiler.capture import capture
from lmforge.passes import PassContext
from lmforge.passes.calibrate import full_logits as program_logits
from lmforge.passes.cleanup import Cleanup, CleanupConfig

aten = torch.ops.aten


def _targets(program):
    return [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]


def test_cleanup_removes_checks_casts_and_duplicates():
    model = tiny_model("llama")
    program = capture(model)
    ids = torch.randint(0, 256, (1, 9))
    before = program_logits(program, ids)
    assert aten._assert_tensor_metadata.default in _targets(program)
    ctx = PassContext()
    result = Cleanup()(program, ctx)
    targets = _targets(program)
    assert aten._assert_tensor_metadata.default not in targets
    assert aten.alias.default not in targets
    # the cos/sin unsqueezes repeated in every layer are merged into one pair
    assert result.measurements["subexpressions_merged"] >= 2
    gated = ("checks_removed", "identities_folded", "subexpressions_merged")  # dead-code removal follows from them
    assert result.rewrites == sum(result.measurements[name] for name in gated) > 0
    assert len(ctx.rewrite_log) == result.rewrites and all(entry["applied"] for entry in ctx.rewrite_log)
    assert program.history[-1]["ops_after"] < program.history[-1]["ops_before"]
    assert torch.equal(program_logits(program, ids), before)
    # a new shape still works: no guard or specialisation was left behind
    assert program_logits(program, torch.randint(0, 256, (3, 17))).shape == (3, 17, 256)


def test_cleanup_options_switch_parts_off():
    program = capture(tiny_model("llama"))
    result = Cleanup(CleanupConfig(remove_checks=False, fold_identities=False, cse=False))(program, PassContext())
    assert result.measurements == {"dead_nodes_removed": result.measurements["dead_nodes_removed"]}
    assert aten._assert_tensor_metadata.default in _targets(program)
