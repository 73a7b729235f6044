"""Calibration splits, quality metrics and the shared greedy search."""

import pytest
import torch
from lossy_helpers import random_calibration
from tiny_models import tiny_model

from lmforge.compiler.capture import capture
from lmforge.errors import LmforgeError
from lmforge.passes import PassContext
from lmforge.passes.calibrate import (
    CalibrationConfig,
    Quality,
    QualityBudget,
    decoded_logits,
    full_logits,
    greedy_search,
    require_calibration,
    tokenize_windows,
)


def test_splits_are_disjoint_windows_from_opposite_ends(ref_path, ref_tokenizer):
    config = CalibrationConfig(data=str(ref_path / "heldout.txt"), samples=3, eval_samples=2, seq_len=64)
    calibration, heldout = tokenize_windows(config, ref_tokenizer)
    assert calibration.shape == (3, 64) and heldout.shape == (2, 64)
    stream = ref_tokenizer((ref_path / "heldout.txt").read_text()).input_ids
    assert calibration[0].tolist() == stream[:64]
    assert not any(torch.equal(c, h) for c in calibration for h in heldout)


def test_too_little_text_and_missing_file_are_explained(tmp_path, ref_tokenizer):
    small = tmp_path / "small.txt"
    small.write_text("def f():\n    return 1\n")
    with pytest.raises(LmforgeError, match="gives 0 windows of 64 tokens, but samples \\+ eval_samples = 32"):
        tokenize_windows(CalibrationConfig(data=str(small), seq_len=64), ref_tokenizer)
    with pytest.raises(LmforgeError, match="no such file or directory"):
        tokenize_windows(CalibrationConfig(data=str(tmp_path / "nope.txt")), ref_tokenizer)
    with pytest.raises(LmforgeError, match="calibration:\n    data: PATH_TO_TEXT"):
        require_calibration(PassContext(), "kv_share")


def test_unmodified_program_has_no_quality_loss_and_perturbed_one_has_some():
    model = tiny_model("llama")
    data = random_calibration(model)
    program = capture(model)
    same = data.program_quality(program)
    assert abs(same.ppl_increase) < 1e-4 and same.top1 == 1.0 and same.kl < 1e-6
    name = next(n for n in program.state_dict() if "down_proj" in n)
    program.add_weight(name, torch.zeros_like(getattr(program.graph_module, name)))
    program.refresh()
    worse = data.program_quality(program)
    assert worse.kl > 1e-3 and worse.top1 < 1.0


def test_cached_decoding_reproduces_the_full_forward():
    program = capture(tiny_model("qwen2"))
    ids = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(decoded_logits(program, ids, 7), full_logits(program, ids), atol=1e-4, rtol=1e-5)


def _quality(cost: float) -> Quality:
    return Quality(ppl_reference=10.0, ppl=10.0 * (1 + cost), ppl_increase=cost, top1=1.0 - cost, kl=cost)


def test_greedy_search_stops_at_the_budget_and_reports_the_cheapest_step():
    costs = {(): 0.0, (1,): 0.01, (2,): 0.02, (1, 2): 0.04, (1, 3): 0.05, (3,): 0.03, (1, 2, 3): 0.09}

    def neighbours(state):
        return [tuple(sorted(state + (i,))) for i in (1, 2, 3) if i not in state]

    def measure(state, split):
        return _quality(costs[state])

    result = greedy_search("demo", (), neighbours, measure, str, QualityBudget(max_ppl_increase=0.045))
    assert result.chosen == (1, 2) and result.steps == 2
    assert len(result.trials) == 3 + 2 + 1
    with pytest.raises(LmforgeError, match=r"demo: no change fits .* cheapest, \(1,\), costs perplexity \+1\.00%"):
        greedy_search("demo", (), neighbours, measure, str, QualityBudget(max_ppl_increase=0.005))
    kept = greedy_search("demo", (), neighbours, measure, str, QualityBudget(max_ppl_increase=0.005, best_effort=True))
    assert kept.chosen == (1,) and "best_effort" in kept.notes[-1]


def test_greedy_search_undoes_steps_that_fail_on_heldout():
    def measure(state, split):
        return _quality(0.01 * len(state) * (3 if split == "heldout" else 1))

    result = greedy_search(
        "demo", (), lambda s: [s + (len(s),)] if len(s) < 4 else [], measure, str, QualityBudget(max_ppl_increase=0.035)
    )
    assert result.chosen == (0,) and any("not on held-out" in note for note in result.notes)
