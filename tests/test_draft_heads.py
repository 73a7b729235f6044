"""Medusa and Hydra draft heads: real training improves them, the pass fuses them losslessly, the
runtime drafts with them and greedy output stays exact, and heads for another model are refused."""

import json
import math

import pytest
import torch
from cache_checks import assert_cache_holds_only_accepted_tokens
from tiny_models import tiny_model
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.draft_heads import MedusaHeads, agreement, save_heads, train_heads
from lmforge.errors import LmforgeError

runner = CliRunner()
PLAIN = "passes: [{name: cleanup}, {name: fuse_projections}]\nruntime: {max_seq_len: 256}"


def _tiny_heads(directory, model) -> tuple[MedusaHeads, torch.Tensor]:
    """Heads for a tiny model after a few real training steps, saved to `directory`."""
    ids = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    heads, _ = train_heads(model, ids, count=3, kind="medusa", steps=3)
    save_heads(directory, heads, model, {})
    return heads, ids


def _recipe(heads_dir) -> str:
    return (f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {heads_dir}}}, {{name: fuse_projections}}, "
            "{name: verify}]\nruntime: {max_seq_len: 256}")


def test_train_heads_cli_improves_agreement_and_resumes(tmp_path, ref_path, ref_tokenizer):
    from lmforge.benchmarking import split_heldout, text_windows

    arguments = ["train-heads", str(ref_path), "-o", str(tmp_path / "heads"), "--data", str(ref_path / "heldout.txt"),
                 "--first-half", "--steps", "12", "--json"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["kind"] == "hydra", "the default kind is the one measured faster"
    first_half = text_windows(split_heldout((ref_path / "heldout.txt").read_text())[0], ref_tokenizer, 128)
    assert record["first_half"] and record["train_windows"] + 16 == first_half.shape[0]  # 16 held out
    assert record["heldout_agreement"][0] > record["heldout_agreement_untrained"][0] + 0.1
    assert (tmp_path / "heads" / "heads.safetensors").is_file()
    arguments[arguments.index("12")] = "16"
    resumed = json.loads(runner.invoke(app, arguments).stdout)
    assert resumed["resumed_from"] == 12


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fused_heads_keep_base_logits_and_greedy_output(tmp_path, arch):
    model = tiny_model(arch, num_layers=2)
    heads, ids = _tiny_heads(tmp_path, model)
    fused, plain = lmforge.optimize(model, _recipe(tmp_path)), lmforge.optimize(model, PLAIN)
    assert fused.program.history[-1]["measurements"]["greedy_match"]  # verify: base logits unchanged
    prompt = ids[:2, :12]
    raw = fused.engine.runner  # the program's own output: base logits, then every head's
    with attention_context(AttentionContext(kv=None, start=0, q_len=12)):
        output = raw(prompt, torch.arange(12).expand(2, 12))
    with torch.no_grad():
        hidden = model(prompt, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(output[..., 1:, :], heads.logits(hidden), atol=1e-4, rtol=1e-4)
    expected = plain.generate(prompt, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(fused.generate(prompt, max_new_tokens=20, eos_token_id=[]), expected)
    assert fused.engine.speculation_stats["drafted"] > 0


def test_reference_checkpoint_with_heads_stays_greedy_exact_through_an_artifact(tmp_path, ref_path, ref_hf, heldout_prompts):
    windows = torch.tensor([p[:24] for p in heldout_prompts] * 4)
    heads, _ = train_heads(ref_hf, windows, count=3, kind="medusa", steps=4, batch=4)
    save_heads(tmp_path, heads, ref_hf, {"heldout_agreement": agreement(heads, ref_hf, windows[:3])})
    fused, plain = lmforge.optimize(ref_path, _recipe(tmp_path)), lmforge.optimize(ref_path, PLAIN)
    for prompt in heldout_prompts:
        ids = torch.tensor([prompt])
        assert torch.equal(fused.generate(ids, max_new_tokens=40), plain.generate(ids, max_new_tokens=40))
    fused.save(tmp_path / "artifact")
    loaded = lmforge.load(tmp_path / "artifact")
    ids = torch.tensor([heldout_prompts[0]])
    assert torch.equal(loaded.generate(ids, max_new_tokens=40), plain.generate(ids, max_new_tokens=40))


def test_heads_of_another_model_are_refused(tmp_path):
    other = tiny_model("llama", seed=1)
    save_heads(tmp_path, MedusaHeads.initial(other.get_output_embeddings().weight, 2), other, {})
    with pytest.raises(LmforgeError, match="trained for another model"):
        lmforge.optimize(tiny_model("llama", seed=0), _recipe(tmp_path))
    with pytest.raises(LmforgeError, match="holds no heads.json"):
        lmforge.optimize(tiny_model("llama"), _recipe(tmp_path / "missing"))


def test_tree_node_logits_equal_running_each_path_alone():
    from lmforge.codegen.cpu import lower
    from lmforge.compiler.recipe import CodegenConfig
    from lmforge.passes.draft_heads import use_tree_attention
    from lmforge.runtime.engine import Engine
    from lmforge.runtime.speculative import build_tree, medusa_children

    model = tiny_model("llama", num_layers=2)
    compiled = lmforge.optimize(model, PLAIN)
    prompt = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    guesses = torch.randn(1, 3, 256, generator=torch.Generator().manual_seed(4))
    tree = build_tree(prompt[:, -1], [3, 2, 1], medusa_children(guesses))
    assert len(tree.parents) == 1 + 3 + 6 + 6
    compiled.engine._ensure_cache(1, 64)
    with pytest.raises(LmforgeError, match="not rewritten for them"):  # plain attention refuses tree masks
        compiled.engine.step(tree.tokens, tree.depths[None], 0, None, every_position=True, tree=tree.mask())
    program = compiled.program.clone()
    assert use_tree_attention(program) == 2  # the graph rewrite: every layer's attention becomes tree_attention
    engine = Engine(lower(program, CodegenConfig()), program.meta["kv_cache"], max_seq_len=64)
    engine._ensure_cache(1, 64)
    engine.step(prompt[:, :-1], torch.arange(9)[None], 0, None)
    tree_logits = engine.step(tree.tokens, (9 + tree.depths)[None], 9, None, every_position=True, tree=tree.mask())
    for node in range(len(tree.parents)):
        alone = torch.cat([prompt[0, :-1], tree.tokens[0, tree.path_to(node)]])[None]
        torch.testing.assert_close(tree_logits[0, node], compiled(alone).logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tree_verification_is_greedy_exact_and_compacts_the_cache(tmp_path, arch):
    model = tiny_model(arch, num_layers=2)
    _, ids = _tiny_heads(tmp_path, model)
    recipe = (f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {tmp_path}, tree: [3, 2, 1]}}, "
              "{name: fuse_projections}]\nruntime: {max_seq_len: 256}")
    tree, plain = lmforge.optimize(model, recipe), lmforge.optimize(model, PLAIN)
    prompt = ids[:1, :12]
    tokens = tree.generate(prompt, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(tokens, plain.generate(prompt, max_new_tokens=30, eos_token_id=[]))
    assert tree.engine.speculation_stats["drafted"] >= 15  # at least one tree of 15 candidates was verified
    assert_cache_holds_only_accepted_tokens(tree.engine, tokens)
    batch = ids[:3, :12]  # one tree per row, same shape; rows advance by the shortest accepted path
    tokens = tree.generate(batch, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(tokens, plain.generate(batch, max_new_tokens=30, eos_token_id=[]))
    assert tree.engine.speculation_stats["drafted"] >= 15
    assert_cache_holds_only_accepted_tokens(tree.engine, tokens)


def test_compaction_moves_the_accepted_path_to_consecutive_slots():
    from lmforge.runtime.speculative import compact_cache

    key = torch.arange(16.0).view(1, 1, 16, 1).expand(1, 2, 16, 3).clone()
    value = -key
    compact_cache([(key, value), None], 4, [[0, 2, 5, 9]])  # root at slot 4, then nodes 2, 5, 9 of the tree
    assert key[0, 1, 4:8, 2].tolist() == [4.0, 6.0, 9.0, 13.0] and value[0, 0, 5, 0] == -6.0
    assert key[0, 0, :4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # the prefix is untouched


def test_tree_verification_on_the_reference_checkpoint(tmp_path, ref_path, ref_hf, ref_tokenizer):
    from lmforge.passes.calibrate import token_windows

    windows = token_windows(ref_path / "heldout.txt", ref_tokenizer, 128)
    heads, _ = train_heads(ref_hf, windows[:200], count=3, kind="medusa", steps=15, lr=2e-3)
    save_heads(tmp_path, heads, ref_hf, {})
    recipe = (f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {tmp_path}, tree: [3, 2, 1]}}, "
              "{name: fuse_projections}]\nruntime: {max_seq_len: 512}")
    tree, plain = lmforge.optimize(ref_path, recipe), lmforge.optimize(ref_path, PLAIN)
    prompt = windows[-1:, :100]
    tokens = tree.generate(prompt, max_new_tokens=64, eos_token_id=[])
    assert torch.equal(tokens, plain.generate(prompt, max_new_tokens=64, eos_token_id=[]))
    stats = tree.engine.speculation_stats
    assert stats["accepted"] > 0 and stats["forwards"] < 64
    assert_cache_holds_only_accepted_tokens(tree.engine, tokens, tolerance=1e-4)
    padded = windows[-3:-1, :100].clone()
    mask = torch.ones_like(padded)
    mask[1, :30] = 0  # a left-padded row in a batch of trees
    tokens = tree.generate(padded, mask, max_new_tokens=48, eos_token_id=[])
    assert torch.equal(tokens, plain.generate(padded, mask, max_new_tokens=48, eos_token_id=[]))
    assert tree.engine.speculation_stats["accepted"] > 0


def test_auto_tree_picks_the_most_tokens_per_second_from_measurements(tmp_path):
    from lmforge.passes.draft_heads import expected_accepted

    hits = [[0.5, 0.2, 0.1, 0.05], [0.4, 0.2, 0.1, 0.05], [0.3, 0.1, 0.1, 0.05]]
    assert expected_accepted([1, 1], hits) == pytest.approx(0.5 + 0.5 * 0.4)
    assert expected_accepted([2, 1, 1], hits) == pytest.approx(0.7 + 0.7 * 0.4 + 0.7 * 0.4 * 0.3)
    model = tiny_model("llama", num_layers=2)
    heads, _ = _tiny_heads(tmp_path, model)
    save_heads(tmp_path, heads, model, {"heldout_rank_hits": hits})
    recipe = f"passes: [{{name: draft_heads, path: {tmp_path}, tree: auto}}]\nruntime: {{max_seq_len: 128}}"
    compiled = lmforge.optimize(model, recipe)
    candidates = compiled.program.history[0]["measurements"]["tree_candidates"]
    best = max(candidates, key=lambda candidate: candidate["tokens_per_second"])
    assert compiled.program.meta["speculation"]["draft_heads"]["tree"] == best["tree"]
    assert all(c["verify_ms"] > 0 and c["nodes"] == 1 + sum(math.prod(c["tree"][: d + 1]) for d in range(len(c["tree"])))
               for c in candidates)
    save_heads(tmp_path, heads, model, {})
    with pytest.raises(LmforgeError, match="per-rank hit rates"):
        lmforge.optimize(model, recipe)


def test_typical_acceptance_is_used_for_sampled_decoding_with_heads(tmp_path):
    model = tiny_model("llama", num_layers=2)
    _, ids = _tiny_heads(tmp_path, model)
    recipe = (f"passes: [{{name: draft_heads, path: {tmp_path}, typical_acceptance: {{epsilon: 0.0001, delta: 0.0001}}}}]"
              "\nruntime: {max_seq_len: 128}")
    compiled = lmforge.optimize(model, recipe)
    assert compiled.program.meta["speculation"]["draft_heads"]["typical_acceptance"] == {"epsilon": 0.0001, "delta": 0.0001}
    out = compiled.generate(ids[:1, :8], max_new_tokens=24, do_sample=True, seed=0, eos_token_id=[])
    stats = compiled.engine.speculation_stats
    assert out.shape == (1, 32)
    # a near-zero threshold keeps almost every drafted token: far fewer forwards than tokens
    assert stats["accepted"] > 0.8 * stats["drafted"] and stats["forwards"] < 14


def test_hydra_heads_train_draft_sequentially_and_stay_greedy_exact(tmp_path, ref_path, ref_hf, heldout_prompts):
    from lmforge.draft_heads import HydraHeads, initial_heads
    from lmforge.passes.calibrate import token_windows

    windows = token_windows(ref_path / "heldout.txt", lmforge.api.load_tokenizer(ref_path), 64)
    heldout = windows[-8:]
    untrained = agreement(initial_heads(ref_hf, 2, "hydra"), ref_hf, heldout)
    heads, _ = train_heads(ref_hf, windows[:-8], count=2, kind="hydra", steps=25, lr=2e-3, batch=4)
    trained = agreement(heads, ref_hf, heldout)
    assert isinstance(heads, HydraHeads) and trained[0] > untrained[0] + 0.1
    hidden = torch.randn(1, ref_hf.config.hidden_size)
    # each head conditions on the token before it: another previous token changes its logits
    assert not torch.allclose(heads.head_logits(0, hidden, torch.tensor([5])), heads.head_logits(0, hidden, torch.tensor([6])))
    save_heads(tmp_path / "hydra", heads, ref_hf, {"heldout_agreement": trained})
    recipe = _recipe(tmp_path / "hydra").replace("{name: fuse_projections}", "{name: prompt_lookup}, {name: fuse_projections}")
    compiled, plain = lmforge.optimize(ref_path, recipe), lmforge.optimize(ref_path, PLAIN)
    assert compiled.program.meta["speculation"]["draft_heads"]["kind"] == "hydra" and compiled.program.drafter
    drafted = 0
    for prompt in heldout_prompts:
        ids = torch.tensor([prompt])
        tokens = compiled.generate(ids, max_new_tokens=40, eos_token_id=[])
        assert torch.equal(tokens, plain.generate(ids, max_new_tokens=40, eos_token_id=[]))
        drafted += compiled.engine.speculation_stats["drafted"]
    assert drafted > 0
    tree_recipe = recipe.replace(f"path: {tmp_path / 'hydra'}}}", f"path: {tmp_path / 'hydra'}, tree: [2, 2]}}")
    tree = lmforge.optimize(ref_path, tree_recipe)
    assert tree.program.meta["speculation"]["draft_heads"]["tree"] == [2, 2]
    for prompt in heldout_prompts:  # a tree of each Hydra head's top 2 after each parent, verified in one forward
        ids = torch.tensor([prompt])
        assert torch.equal(tree.generate(ids, max_new_tokens=40, eos_token_id=[]),
                           plain.generate(ids, max_new_tokens=40, eos_token_id=[]))
    compiled.save(tmp_path / "artifact")
    assert (tmp_path / "artifact" / "drafter.safetensors").is_file()
    ids = torch.tensor([heldout_prompts[0]])
    assert torch.equal(lmforge.load(tmp_path / "artifact").generate(ids, max_new_tokens=40, eos_token_id=[]),
                       plain.generate(ids, max_new_tokens=40, eos_token_id=[]))


@pytest.mark.parametrize("kind, tensors, problem", [
    ("hydra", {"block_weight": torch.zeros(2, 8, 16), "block_bias": torch.zeros(2, 8), "output": torch.zeros(2, 32, 8)},
     "not hydra heads for this model: tensor 'embedding' is missing"),
    ("medusa", {"block_weight": torch.zeros(16, 8), "block_bias": torch.zeros(16), "output": torch.zeros(2, 31, 8)},
     "not medusa heads for this model: tensor 'output' is torch.float32 (2, 31, 8), not float (2, 32, 8)"),
    ("medusa", {"output": torch.zeros(2, 32, 8)},
     "not medusa heads for this model: tensors ['output'], not ['block_bias', 'block_weight', 'output']"),
], ids=["hydra-missing", "medusa-vocabulary", "medusa-missing"])
def test_malformed_heads_files_are_refused_in_one_line(tmp_path, kind, tensors, problem):
    """A heads directory for the right model (its fingerprint matches) whose tensors do not
    make the heads it names: the dataclasses raised TypeError or failed at the first draft."""
    import safetensors.torch

    from lmforge.draft_heads import lm_head_fingerprint, load_heads

    lm_head = torch.randn(32, 8)
    (tmp_path / "heads.json").write_text(json.dumps({"kind": kind, "lm_head_fingerprint": lm_head_fingerprint(lm_head)}))
    safetensors.torch.save_file(tensors, tmp_path / "heads.safetensors")
    with pytest.raises(LmforgeError) as info:
        load_heads(tmp_path, lm_head)
    assert str(info.value) == f"draft_heads: {tmp_path / 'heads.safetensors'}: {problem}"
    (tmp_path / "heads.json").write_text("[1, 2")
    with pytest.raises(LmforgeError, match="heads.json is not a JSON object"):
        load_heads(tmp_path, lm_head)
