"""`verify` after codegen: the lowered program through the Engine `optimize()` returns. Broken
codegen, packed weights, speculative acceptance or left padding are caught and blamed on
their stage where the graph-level check alone passes; lossy recipes state what was checked."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

import lmforge
from lmforge.codegen import cpu, cpu_kernels
from lmforge.errors import LmforgeError
from lmforge.runtime import engine as engine_module

DEFAULT = "passes: [{name: cleanup}, {name: fuse_projections}, {name: verify}]\nruntime: {max_seq_len: 256}"
LOOKUP = DEFAULT.replace("{name: verify}", "{name: prompt_lookup}, {name: verify}")


def _verify_entry(compiled) -> dict:
    (entry,) = [entry for entry in compiled.program.history if entry["pass"] == "verify"]
    return entry


def _stages(entry: dict) -> set[str]:
    return {check["stage"] for check in entry["measurements"]["checks"]}


def test_default_recipe_checks_the_lowered_program_at_batch_1_and_left_padded():
    compiled = lmforge.optimize(tiny_model("llama"), DEFAULT)
    assert compiled.engine.cache is None  # the check's KV cache is not left allocated for the user
    entry = _verify_entry(compiled)
    measurements = entry["measurements"]
    assert measurements["status"] == "passed"
    lowered = measurements["lowered"]
    assert lowered["codegen"] == "codegen aten, packed weights" and lowered["expected_tokens"] == "reference model"
    assert [batch["shape"] for batch in lowered["batches"]] == [[1, 24], [3, 24]]
    assert lowered["batches"][1]["prompt_lengths"] == [24, 16, 8]
    lowered_checks = [check for check in measurements["checks"] if check["batch"] == "left-padded 3x24"]
    assert [check["stage"] for check in lowered_checks] == ["codegen aten, packed weights"] * 2 + [
        "codegen aten, packed weights + runtime"]  # logits vs graph and reference; greedy tokens vs reference
    assert all(check["ok"] for check in lowered_checks)
    assert lowered["cache_consistency"].startswith("implied")
    assert any("lowered program (codegen aten, packed weights): 6/6 checks passed" in note for note in entry["notes"])


def _perturb_silu(monkeypatch):
    """The aten emitter binds SiLU to a kernel that is off by 0.05."""
    emit = cpu.emit_aten_source

    def broken_emit(graph_module, pack_weights=False):
        source, bound = emit(graph_module, pack_weights)
        if "aten_silu_default" in bound:
            silu = bound["aten_silu_default"]
            bound["aten_silu_default"] = lambda *args: silu(*args) + 0.05
        return source, bound

    monkeypatch.setattr(cpu, "emit_aten_source", broken_emit)


def _perturb_packing(monkeypatch):
    """Packed weights are packed from a slightly scaled copy."""
    pack = cpu_kernels._pack
    monkeypatch.setattr(cpu_kernels, "_pack", lambda weight: pack(weight * 1.01))


@pytest.mark.parametrize("breakage", [_perturb_silu, _perturb_packing], ids=["emitter", "packed weights"])
def test_broken_codegen_is_caught_after_lowering_where_the_graph_check_passes(monkeypatch, breakage):
    model = tiny_model("llama")
    breakage(monkeypatch)
    recorded = DEFAULT.replace("{name: verify}", "{name: verify, fail: false}")
    measurements = _verify_entry(lmforge.optimize(model, recorded))["measurements"]
    graph_checks = [check for check in measurements["checks"] if check["stage"].startswith("pass ")]
    assert len(graph_checks) == 3 and all(check["ok"] for check in graph_checks)  # the graph-level check alone passes
    failed = [check for check in measurements["checks"] if not check["ok"]]
    assert failed and {check["stage"] for check in failed} == {"codegen aten, packed weights"}
    assert measurements["status"] == "failed (recorded only, fail: false)"
    with pytest.raises(LmforgeError, match=r"^verify \(codegen aten, packed weights\): prefill logits of the lowered "
                                           r"program vs the program graph \(batch 1 1x24\): max difference"):
        lmforge.optimize(model, DEFAULT)


def test_broken_speculative_acceptance_is_caught_and_blames_the_runtime(monkeypatch):
    model = tiny_model("llama")
    entry = _verify_entry(lmforge.optimize(model, LOOKUP))
    speculation = entry["measurements"]["lowered"]["speculation"]
    assert speculation["sources"] == ["prompt_lookup"] and speculation["drafted"] > 0
    assert "runtime, speculative decoding" in _stages(entry)
    accept = engine_module.accept

    def off_by_one(logits, drafts, *args):  # the token after the accepted drafts is one id too high
        accepted, own = accept(logits, drafts, *args)
        return accepted, (own + 1) % logits.shape[-1]

    monkeypatch.setattr(engine_module, "accept", off_by_one)
    with pytest.raises(LmforgeError, match=r"^verify \(runtime, speculative decoding\): 32 greedy tokens with drafts "
                                           r"vs without \(batch 1 1x24\): row 0, new token"):
        lmforge.optimize(model, LOOKUP)


def test_broken_left_padding_is_blamed_on_the_runtime(monkeypatch):
    monkeypatch.setattr(engine_module, "left_padding", lambda attention_mask, input_ids: None)  # pads are attended
    with pytest.raises(LmforgeError, match=r"^verify \(runtime, left padding\): prefill logits of the lowered program "
                                           r"vs the reference model"):
        lmforge.optimize(tiny_model("llama"), DEFAULT)


def test_broken_cached_decoding_is_blamed_on_the_runtime(monkeypatch):
    step = engine_module.Engine.step

    def shifted(self, input_ids, positions, start, *args, **kwargs):  # decode steps one position too far
        return step(self, input_ids, positions + int(start > 0), start, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "step", shifted)
    with pytest.raises(LmforgeError, match=r"^verify \(runtime, KV cache decoding\): greedy tokens of the lowered "
                                           r"program vs the reference model \(each prompt alone\) \(batch 1 1x24\)"):
        lmforge.optimize(tiny_model("llama"), DEFAULT)


class _CharTokenizer:
    """Characters to token ids inside the tiny models' vocabulary: enough to cut calibration windows."""

    eos_token_id = 2

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[3 + ord(char) % 250 for char in text])


def _lossy(tmp_path, passes: str, verify: str = "{name: verify}") -> str:
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"word{index % 37} token{index % 11}" for index in range(200)))
    return (f"calibration: {{data: {text}, samples: 2, eval_samples: 2, seq_len: 32}}\n"
            f"passes: [{{name: cleanup}}, {passes}, {verify}]\nruntime: {{max_seq_len: 256}}")


def test_lossy_recipe_without_budget_checks_what_applies_and_says_so(tmp_path):
    recipe = _lossy(tmp_path, "{name: kv_share, mode: explicit, groups: [[0, 1]]}, {name: fuse_projections}, "
                              "{name: prompt_lookup}")
    entry = _verify_entry(lmforge.optimize(tiny_model("llama"), recipe, tokenizer=_CharTokenizer()))
    measurements = entry["measurements"]
    assert measurements["status"] == "passed" and "heldout_quality" in measurements
    assert any("no quality_budget" in note for note in entry["notes"])
    assert measurements["lowered"]["expected_tokens"] == "program after kv_share"
    assert measurements["lowered"]["cache_consistency"] == "checked"
    checks = {check["check"] for check in measurements["checks"]}
    assert "greedy tokens of the lowered program vs the program after kv_share (each prompt alone)" in checks
    assert {"runtime, KV cache decoding", "runtime, speculative decoding", "codegen aten, packed weights"} <= _stages(entry)


def test_per_token_program_checks_codegen_and_its_own_tokens_and_says_cache_consistency_does_not_apply(tmp_path):
    dynamic = "{name: ffn_skip, mode: dynamic, layers: [2], threshold: 0.5, warmup: 1}"
    model = tiny_model("llama", num_layers=4)
    entry = _verify_entry(lmforge.optimize(model, _lossy(tmp_path, dynamic), tokenizer=_CharTokenizer()))
    measurements = entry["measurements"]
    assert measurements["status"] == "passed"
    assert measurements["lowered"]["cache_consistency"] == ("not applicable: the program decides per decoded token "
                                                            "(ffn_skip dynamic)")
    assert _stages(entry) == {"codegen aten, packed weights", "codegen aten, packed weights + runtime"}
    assert len(measurements["checks"]) == 4  # logits vs graph and tokens vs the ffn_skip program, at both batches
    assert "in the same batch" in measurements["checks"][-1]["check"]


def test_reference_checkpoint_default_compile_verifies_the_lowered_program(ref_compiled):
    measurements = _verify_entry(ref_compiled)["measurements"]
    assert measurements["status"] == "passed"
    assert {"codegen aten, packed weights", "codegen aten, packed weights + runtime"} <= {
        check["stage"] for check in measurements["checks"]}


def test_the_checks_engines_refuse_token_ids_outside_the_vocabulary():
    """Each Engine the check builds knows the vocabulary, so a bad id is one LmforgeError there
    too, not an IndexError from inside the graph's embedding."""
    from lmforge.passes.verify import VerifyConfig
    from lmforge.verification import LoweredCheck

    compiled = lmforge.optimize(tiny_model("llama"), "passes: []\nruntime: {max_seq_len: 64}")
    check = LoweredCheck(compiled.engine, compiled.program, None, compiled.recipe.codegen, VerifyConfig(), None)
    vocab = compiled.program.config.vocab_size
    for engine in (check.plain, check.graph):
        assert engine.vocab_size == vocab
        with pytest.raises(LmforgeError, match="vocab"):
            engine.forward(torch.tensor([[1, vocab]]))
        with pytest.raises(LmforgeError, match="vocab"):
            engine.generate(torch.tensor([[1, -1]]), max_new_tokens=2)
