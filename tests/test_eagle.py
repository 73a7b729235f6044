"""EAGLE drafter: training lowers its loss and resumes exactly, its training-time test matches
what the runtime drafts, its cache rolls back exactly, and greedy output with it is plain greedy."""

import json

import pytest
import torch
from tiny_models import tiny_model

import lmforge
from lmforge.draft_heads import save_heads
from lmforge.eagle import eagle_loss, greedy_continuations, initial_eagle, train_eagle
from lmforge.eagle.training import _base_features
from lmforge.errors import LmforgeError

PLAIN = "passes: [{name: cleanup}, {name: fuse_projections}]\nruntime: {max_seq_len: 256}"


def _windows(seed: int = 0, rows: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def _random_drafter(model, depth: int = 3):
    """A drafter whose every weight is non-zero (an initial one has zero output blocks)."""
    drafter = initial_eagle(model, depth)
    generator = torch.Generator().manual_seed(1)
    for name in ("o", "down", "fc_bias"):
        drafter.weights[name] = torch.randn(drafter.weights[name].shape, generator=generator) * 0.1
    return drafter


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    model = tiny_model("llama")
    ids = _windows()
    hidden, logprobs = _base_features(model, ids)
    untrained = eagle_loss(initial_eagle(model, 3), hidden, logprobs, ids).item()
    trained, run = train_eagle(model, ids, depth=3, steps=12, lr=3e-3, batch=4)
    assert eagle_loss(trained, hidden, logprobs, ids).item() < 0.9 * untrained
    checkpoint = tmp_path / "training.safetensors"
    train_eagle(model, ids, depth=3, steps=8, lr=3e-3, batch=4, checkpoint=checkpoint)
    resumed, run = train_eagle(model, ids, depth=3, steps=12, lr=3e-3, batch=4, checkpoint=checkpoint)
    assert (run.resumed_from, run.steps_run) == (8, 4)
    for name, tensor in trained.weights.items():
        torch.testing.assert_close(resumed.weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_training_time_test_is_what_the_runtime_drafts():
    """Step k of the unrolled drafter at origin t == the runtime's k-th chain step after
    committing positions 0..t, when fed the same tokens."""
    model = tiny_model("llama")
    drafter, ids = _random_drafter(model), _windows(rows=2, length=20)
    hidden, _ = _base_features(model, ids)
    with torch.no_grad():
        steps = drafter.unrolled(hidden, ids, 3)
        origin, positions = 9, torch.arange(20).expand(2, 20)
        drafter.start(2, 32, None, "cpu")
        committed = drafter.extend(hidden[:, : origin + 1], ids[:, 1 : origin + 2], positions[:, : origin + 1], 0)
        torch.testing.assert_close(committed, steps[0][:, : origin + 1])
        feature, slot, position = drafter.committed
        for step in (1, 2):
            feature = drafter._write(feature, ids[:, origin + step + 1 : origin + step + 2], position, slot)
            slot, position = slot + 1, position + 1
            torch.testing.assert_close(feature[:, 0], steps[step][:, origin])


@pytest.mark.parametrize("padded", [False, True])
def test_cache_rollback_is_exact(padded):
    """After drafting (which writes speculative slots) and committing a different accepted
    path, the drafter's state and logits equal a fresh drafter fed the same path at once."""
    model = tiny_model("llama")
    drafter = _random_drafter(model)
    generator = torch.Generator().manual_seed(2)
    hidden, tokens = torch.randn(2, 14, 64, generator=generator), _windows(rows=2, length=14)
    pad = torch.tensor([0, 3]) if padded else None
    positions = torch.arange(14).expand(2, 14) - (pad[:, None] if padded else 0)
    with torch.no_grad():
        drafter.start(2, 20, pad, "cpu")
        drafter.extend(hidden[:, :8], tokens[:, :8], positions[:, :8], 0)
        drafter.draft(4)
        drafter.extend(hidden[:, 8:14], tokens[:, 8:14], positions[:, 8:14], 8)
        after_rollback = drafter.logits(drafter.committed[0]), drafter.draft(3)
        fresh = _random_drafter(model)
        fresh.start(2, 20, pad, "cpu")
        fresh.extend(hidden, tokens, positions, 0)
        torch.testing.assert_close(after_rollback[0], fresh.logits(fresh.committed[0]))
        assert torch.equal(after_rollback[1], fresh.draft(3))
    with pytest.raises(LmforgeError, match="extend at slot 9"):
        drafter.extend(hidden[:, :1], tokens[:, :1], positions[:, :1], 9)


def _bigram(model):
    """`model` with every attention and MLP output zeroed: its hidden state is the normalised
    embedding of the current token, so its greedy choice depends on that token alone."""
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def _exact_drafter(model, depth: int = 3):
    """For a `_bigram` model: fc keeps only the next token's embedding, whose LM-head argmax
    is the model's (the final norm only rescales it), so every draft is right."""
    drafter = initial_eagle(model, depth)
    hidden = drafter.shape.hidden
    drafter.weights["fc_weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
    return drafter


@pytest.mark.parametrize("arch, drafts", [("llama", "exact"), ("qwen2", "exact"), ("llama", "random")])
def test_greedy_with_the_eagle_drafter_is_plain_greedy(tmp_path, arch, drafts):
    """Every draft accepted (a drafter exact for a bigram model) and most rejected (a random
    drafter): the output is plain greedy either way, for one prompt and a left-padded batch."""
    model = tiny_model(arch)
    drafter = _exact_drafter(_bigram(model)) if drafts == "exact" else _random_drafter(model)
    save_heads(tmp_path, drafter, model, {})
    recipe = (f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {tmp_path}}}, {{name: fuse_projections}}]\n"
              "runtime: {max_seq_len: 256}")
    eagle, plain = lmforge.optimize(model, recipe), lmforge.optimize(model, PLAIN)
    ids = _windows(seed=5, rows=3, length=12)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    for prompt, attention_mask in ((ids[:1], None), (ids, mask)):
        expected = plain.generate(prompt, attention_mask, max_new_tokens=30, eos_token_id=[])
        assert torch.equal(eagle.generate(prompt, attention_mask, max_new_tokens=30, eos_token_id=[]), expected)
        stats = eagle.engine.speculation_stats
        if drafts == "exact":
            assert stats["accepted"] == stats["drafted"] > 0, stats
        else:
            assert stats["drafted"] > stats["accepted"], stats


def test_a_malformed_eagle_drafter_is_refused_in_one_line(tmp_path):
    model = tiny_model("llama")
    save_heads(tmp_path, initial_eagle(model, 2), model, {})
    config = json.loads((tmp_path / "heads.json").read_text())
    (tmp_path / "heads.json").write_text(json.dumps({**config, "heads": 0}))
    with pytest.raises(LmforgeError, match="draft depth 0"):
        lmforge.optimize(model, f"passes: [{{name: draft_heads, path: {tmp_path}}}]")
    del config["eagle"]["eps"]
    (tmp_path / "heads.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="lacks a valid shape"):
        lmforge.optimize(model, f"passes: [{{name: draft_heads, path: {tmp_path}}}]")


def test_training_stops_at_its_wall_clock_budget_and_resumes(tmp_path):
    model, checkpoint = tiny_model("llama"), tmp_path / "training.safetensors"
    _, run = train_eagle(model, _windows(), depth=2, steps=5, batch=2, checkpoint=checkpoint, seconds=0)
    assert (run.resumed_from, run.steps_run) == (0, 1)  # the first step ends past a zero budget
    _, run = train_eagle(model, _windows(), depth=2, steps=5, batch=2, checkpoint=checkpoint)
    assert (run.resumed_from, run.steps_run) == (1, 4)


def test_held_out_tree_measurements_follow_the_drafter():
    """A drafter always right: no confidence is too low (threshold 0), a budget of one node
    accepts one draft, 32 nodes reach the whole trained depth. A random drafter: low confidence is
    rarely accepted, so the threshold is above 0."""
    from lmforge.eagle.calibration import BUDGETS, tree_measurements

    model = _bigram(tiny_model("llama"))
    sequences = greedy_continuations(model, _windows(rows=2, length=8)[:1], 16)  # the other row reaches the pad
    # token, whose zero embedding ties every logit
    exact = tree_measurements(_exact_drafter(model), model, sequences, 8)
    assert exact["tree_threshold"] == 0.0 and list(exact["tree_accepted_per_budget"]) == [str(b) for b in BUDGETS]
    assert exact["tree_accepted_per_budget"]["1"] == 1.0 and exact["tree_accepted_per_budget"]["32"] == 3.0
    random = tree_measurements(_random_drafter(model), model, sequences, 8)
    assert random["tree_threshold"] > 0.0 and random["tree_accepted_per_budget"]["32"] < 1.0


def test_drafting_follows_weights_changed_after_a_start():
    """The fused, packed run-time projections are copies: a weight updated in place or
    replaced between two generations (training steps, a swapped drafter) is what the next
    drafts use, as a fresh drafter with those weights drafts."""
    model = tiny_model("llama")
    drafter, fresh = _random_drafter(model), _random_drafter(model)
    hidden, tokens = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(5)), _windows(rows=1, length=6)
    positions = torch.arange(6)[None]
    with torch.no_grad():
        drafter.start(1, 16, None, "cpu")
        drafter.extend(hidden, tokens, positions, 0)
        drafter.weights["o"].mul_(3.0)
        drafter.weights["lm_head"] = drafter.weights["lm_head"].flip(0)
        fresh.weights["o"], fresh.weights["lm_head"] = drafter.weights["o"], drafter.weights["lm_head"]
        for each in (drafter, fresh):
            each.start(1, 16, None, "cpu")
            each.extend(hidden, tokens, positions, 0)
        torch.testing.assert_close(drafter.draft_logits(drafter.committed[0]), fresh.logits(fresh.committed[0]))
