"""`verify` at the graph level: passes a faithful program, catches a broken one with numbers
and the stage in the message, and lists what it checked (or says that nothing applied)."""

import pytest
import torch
from tiny_models import tiny_model

from lmforge.compiler.capture import capture
from lmforge.errors import LmforgeError
from lmforge.passes import PassContext
from lmforge.passes.verify import Verify, VerifyConfig


def _context(model):
    return PassContext(reference=model, sample_ids=torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0)))


def test_faithful_program_passes_with_measurements():
    model = tiny_model("mistral")
    program = capture(model)
    result = Verify()(program, _context(model))
    assert result.measurements["max_logit_error"] < 1e-4
    assert result.measurements["top1_agreement"] == 1.0 and result.measurements["greedy_match"] is True
    assert result.measurements["status"] == "passed" and len(result.measurements["checks"]) == 3


def test_broken_program_is_caught():
    model = tiny_model("llama")
    program = capture(model)
    weight = next(name for name in program.state_dict() if "layers__1__mlp__down_proj" in name)
    # replace, never modify in place: program weights share storage with the reference model
    program.add_weight(weight, getattr(program.graph_module, weight) * -3.0)
    with pytest.raises(LmforgeError, match=r"^verify \(capture\): max logit error .* top-1 agreement"):
        Verify()(program, _context(model))
    recorded = Verify(VerifyConfig(fail=False))(program, _context(model))
    assert recorded.measurements["max_logit_error"] > 1e-2
    assert recorded.measurements["status"] == "failed (recorded only, fail: false)"


def test_after_a_lossy_pass_verify_checks_the_recipe_budget_and_the_cache():
    from lossy_helpers import random_calibration

    from lmforge.passes.calibrate import QualityBudget
    from lmforge.passes.kv_share import KVShare, KVShareConfig

    model = tiny_model("llama", num_layers=4)
    ctx = _context(model)
    ctx.calibration = random_calibration(model)
    program = capture(model)
    KVShare(KVShareConfig(mode="explicit", groups=[[1, 2]]))(program, ctx)
    result = Verify()(program, ctx)
    assert result.measurements["lossy_passes"] == ["kv_share"] and "heldout_quality" in result.measurements
    assert result.measurements["cache_max_logit_error"] < 1e-3  # shared caches still decode like a full forward
    ctx.quality_budget = QualityBudget(min_top1=0.999)
    with pytest.raises(LmforgeError, match=r"verify \(pass kv_share\): the pipeline after kv_share misses the quality "):
        Verify()(program, ctx)


def test_without_budget_on_a_per_token_program_it_says_nothing_was_checked():
    from lossy_helpers import random_calibration

    from lmforge.passes.ffn_skip import FFNSkip, FFNSkipConfig

    model = tiny_model("llama", num_layers=4)
    ctx = _context(model)
    ctx.calibration = random_calibration(model)
    program = capture(model)
    FFNSkip(FFNSkipConfig(mode="dynamic", layers=[2], threshold=0.5, warmup=1))(program, ctx)
    result = Verify()(program, ctx)
    assert result.measurements["checks"] == []
    assert result.measurements["status"] == ("nothing checked: the program decides per decoded token and no "
                                             "quality_budget is set")
    assert "no quality_budget in the recipe: held-out quality measured, not checked" in result.notes
