"""`kv_share`: fewer K/V projections, weights and cache bytes; budgets measured, not assumed."""

import pytest
import torch
from lossy_helpers import context, random_calibration, text_calibration
from tiny_models import tiny_model

import lmforge
from lmforge.compiler.capture import capture
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import decoded_logits, full_logits
from lmforge.passes.kv_share import HealConfig, KVShare, KVShareConfig, normalize_groups
from lmforge.runtime.kv_cache import StaticKVCache, kv_cache_bytes


def _kv_projections(program) -> int:
    return sum(role in entry.projections for entry in program.layers for role in ("k", "v"))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_explicit_groups_remove_projections_weights_and_cache(arch, tmp_path):
    model = tiny_model(arch, num_layers=4)
    data = random_calibration(model)
    program = capture(model)
    weight_bytes = sum(t.nbytes for t in program.state_dict().values())
    cache_bytes = StaticKVCache(program.meta["kv_cache"], 1, 64, torch.float32).nbytes()
    KVShare(KVShareConfig(mode="explicit", groups=[[0, 1], [2, 3]]))(program, context(model, data))
    assert _kv_projections(program) == 4  # layers 0 and 2 keep k and v; 1 and 3 lost theirs
    assert not any(f"layers__{i}__self_attn__{p}_proj" in name for name in program.state_dict() for i in (1, 3) for p in "kv")
    assert sum(t.nbytes for t in program.state_dict().values()) < weight_bytes
    assert StaticKVCache(program.meta["kv_cache"], 1, 64, torch.float32).nbytes() * 2 == cache_bytes
    assert [entry["cache"] for entry in program.meta["kv_cache"]] == [0, 0, 2, 2]
    ids = torch.randint(0, 256, (2, 18))
    torch.testing.assert_close(decoded_logits(program, ids, 5), full_logits(program, ids), atol=1e-4, rtol=1e-5)
    history = program.history[-1]
    assert history["measurements"]["kv_slots_after"] == 2 and "heldout_quality" in history["measurements"]


def test_shared_program_saves_fewer_weight_bytes_and_generates_like_full_recompute(tmp_path, ref_path, ref_hf):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 4, eval_samples: 4, seq_len: 64}}\n"
        "passes:\n  - name: cleanup\n  - name: kv_share\n    mode: explicit\n    groups: [[1, 2], [3, 4], [5, 6]]\n"
        "  - name: fuse_projections\nruntime: {max_seq_len: 256}\n"
    )
    baseline = lmforge.optimize(ref_path, "passes: [{name: cleanup}, {name: fuse_projections}]\nruntime: {max_seq_len: 256}")
    shared = lmforge.optimize(ref_path, recipe)
    baseline.save(tmp_path / "base"), shared.save(tmp_path / "shared")
    sizes = [(tmp_path / name / "weights.safetensors").stat().st_size for name in ("base", "shared")]
    kv_weight = ref_hf.model.layers[1].self_attn.k_proj.weight.nbytes
    assert sizes[0] - sizes[1] >= 3 * 2 * kv_weight
    layout = shared.program.meta["kv_cache"]
    assert kv_cache_bytes(layout, 2048) * 8 == kv_cache_bytes(baseline.program.meta["kv_cache"], 2048) * 5
    prompt = torch.tensor([[5, 17, 99, 3, 250, 7, 7, 31]])
    generated = shared.generate(prompt, max_new_tokens=12)
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, shared(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)
    baseline.generate(prompt, max_new_tokens=1)
    assert shared.engine.cache.nbytes() * 8 == baseline.engine.cache.nbytes() * 5


def test_auto_respects_the_budget_on_heldout_text(ref_path, ref_tokenizer, ref_hf):
    data = text_calibration(ref_path, ref_tokenizer, ref_hf)
    program = capture(ref_hf)
    result = KVShare(KVShareConfig(mode="auto"))(program, context(ref_hf, data, max_ppl_increase=0.08))
    groups = result.measurements["groups"]
    assert len(groups) < 8 and [0] in groups and [7] in groups
    measured = data.program_quality(program, "heldout")
    assert measured.ppl_increase <= 0.08
    assert result.measurements["trials"] and all("calibration_quality" in trial for trial in result.measurements["trials"])


def test_impossible_budget_says_how_close_it_got(ref_path, ref_tokenizer, ref_hf):
    data = text_calibration(ref_path, ref_tokenizer, ref_hf, samples=4, seq_len=64)
    with pytest.raises(LmforgeError, match=r"kv_share: no change fits the quality budget; the cheapest, groups \[.*\], "
                       r"costs perplexity \+\d+\.\d\d%, top-1 0\.\d+, KL \d\.\d+ on calibration text"):
        KVShare(KVShareConfig(mode="auto", candidates_per_round=2))(capture(ref_hf), context(ref_hf, data, max_ppl_increase=0.001))


def test_explicit_groups_are_validated():
    assert normalize_groups([[2, 3]], 5) == [[0], [1], [2, 3], [4]]
    for groups, message in [([[0, 2]], "consecutive"), ([[3, 4, 5]], "does not exist"), ([[0, 1], [1, 2]], "two groups")]:
        with pytest.raises(LmforgeError, match=message):
            normalize_groups(groups, 5)


def test_heal_improves_quality_and_resumes_from_its_checkpoint(tmp_path, ref_path, ref_tokenizer, ref_hf):
    data = text_calibration(ref_path, ref_tokenizer, ref_hf, samples=32, seq_len=64)
    checkpoint = tmp_path / "heal.safetensors"
    heal = HealConfig(steps=20, lr=2e-3, checkpoint=str(checkpoint))
    config = KVShareConfig(mode="explicit", groups=[[1, 2], [3, 4]], heal=heal)
    measurements = KVShare(config)(capture(ref_hf), context(ref_hf, data)).measurements
    before, after = measurements["heldout_quality_before_heal"], measurements["heldout_quality"]
    assert after["kl"] < 0.8 * before["kl"] and after["ppl_increase"] < before["ppl_increase"]
    assert measurements["heal"]["steps_run"] == 20 and checkpoint.is_file()
    longer = config.model_copy(update={"heal": heal.model_copy(update={"steps": 25})})
    resumed = KVShare(longer)(capture(ref_hf), context(ref_hf, data)).measurements["heal"]
    assert resumed["resumed_from"] == 20 and resumed["steps_run"] == 5


def test_fused_qkv_is_refused_with_the_order_to_use():
    model = tiny_model("phi3", num_layers=2)
    with pytest.raises(LmforgeError, match="fused projection"):
        KVShare(KVShareConfig(mode="explicit", groups=[[0, 1]]))(capture(model), context(model, random_calibration(model)))
