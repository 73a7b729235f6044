"""EAGLE dynamic draft trees: their shape follows the drafter's confidence within the budget
and threshold, the drafter's cache rolls back exactly after a tree, greedy decoding with a
tree is plain greedy (tiny models, a padded batch, ref-llama-py), and the pass picks the
budget from measured acceptance and verify latency."""

import pytest
import torch
from test_eagle import PLAIN, _bigram, _exact_drafter, _random_drafter, _windows
from tiny_models import tiny_model

import lmforge
from lmforge.draft_heads import save_heads
from lmforge.eagle import greedy_continuations, initial_eagle
from lmforge.errors import LmforgeError
from lmforge.runtime.eagle_tree import DynamicTree, grow_tree


def _committed_drafter(model, length: int = 10):
    drafter, ids = _random_drafter(model), _windows(rows=2, length=length + 1)
    hidden = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(3))
    drafter.start(2, 64, None, "cpu")
    drafter.extend(hidden, ids[:, 1:], torch.arange(length).expand(2, length), 0)
    return drafter, ids


@pytest.mark.parametrize("budget, top_k, threshold", [(5, 2, 0.0), (12, 3, 0.0), (12, 3, 1.0)])
def test_tree_shape_follows_confidence_within_budget_and_threshold(budget, top_k, threshold):
    drafter, ids = _committed_drafter(tiny_model("llama"))
    with torch.no_grad():
        tree = grow_tree(drafter, ids[:, -1], DynamicTree(budget, top_k, threshold, max_depth=4), room=10)
    size = len(tree.parents)
    assert size - 1 == (top_k if threshold == 1.0 else budget)  # threshold 1: nothing is confident enough to expand
    assert tree.tokens.shape == (2, size) and torch.equal(tree.tokens[:, 0], ids[:, -1])
    assert all(tree.parents[node] < node for node in range(1, size))  # breadth-first: parents first
    depths = tree.depths.tolist()
    assert all(depths[node] == depths[tree.parents[node]] + 1 for node in range(1, size))
    assert max(depths) <= (1 if threshold == 1.0 else 4)
    first = drafter.logits(drafter.committed[0][:, 0]).topk(top_k).indices  # depth 1: the drafter's top-k, best first
    assert torch.equal(tree.tokens[:, 1 : 1 + top_k], first)


def test_cache_rolls_back_exactly_after_a_tree():
    """Drafting a tree writes speculative entries; committing an accepted path afterwards
    leaves the drafter as a fresh one fed that path at once."""
    model = tiny_model("llama")
    drafter, ids = _committed_drafter(model)
    extra = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4))
    path_tokens, path_positions = _windows(seed=9, rows=2, length=3), torch.arange(10, 13).expand(2, 3)
    with torch.no_grad():
        grow_tree(drafter, ids[:, -1], DynamicTree(10, 3, 0.0, max_depth=4), room=10)
        drafter.extend(extra, path_tokens, path_positions, 10)
        fresh, _ = _committed_drafter(model)
        fresh.extend(extra, path_tokens, path_positions, 10)
        torch.testing.assert_close(drafter.committed[0], fresh.committed[0])
        options = DynamicTree(8, 2, 0.0, max_depth=3)
        after, expected = grow_tree(drafter, ids[:, -1], options, 5), grow_tree(fresh, ids[:, -1], options, 5)
    assert after.parents == expected.parents and torch.equal(after.tokens, expected.tokens)


def _tree_recipe(path, tree: str = "{budget: 6, top_k: 2}") -> str:
    return (f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {path}, dynamic_tree: {tree}}}, "
            "{name: fuse_projections}]\nruntime: {max_seq_len: 256}")


def test_greedy_with_a_dynamic_tree_is_plain_greedy(tmp_path):
    """Drafts mostly accepted (a drafter exact for a bigram model) and mostly rejected (a
    random drafter swapped into the same engine): the output is plain greedy either way, for
    one prompt and a left-padded batch."""
    model = _bigram(tiny_model("llama"))
    save_heads(tmp_path, _exact_drafter(model), model, {})
    eagle, plain = lmforge.optimize(model, _tree_recipe(tmp_path)), lmforge.optimize(model, PLAIN)
    assert eagle.program.meta["speculation"]["draft_heads"]["eagle_tree"]["budget"] == 6
    ids = _windows(seed=5, rows=3, length=12)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    for drafts in ("exact", "random"):
        if drafts == "random":
            eagle.engine.drafter = _random_drafter(model).for_runtime()
        for prompt, attention_mask in ((ids[:1], None), (ids, mask)):
            expected = plain.generate(prompt, attention_mask, max_new_tokens=30, eos_token_id=[])
            assert torch.equal(eagle.generate(prompt, attention_mask, max_new_tokens=30, eos_token_id=[]), expected)
            stats = eagle.engine.speculation_stats
            assert stats["drafted"] > 0, stats
            if drafts == "exact":
                assert stats["accepted"] >= stats["forwards"] - 1, stats  # at least one draft accepted per verify
            else:
                assert stats["accepted"] < stats["drafted"] / 2, stats


def test_greedy_with_a_dynamic_tree_is_plain_greedy_on_the_reference(tmp_path, ref_hf, heldout_prompts):
    """ref-llama-py with a drafter that guesses the token just seen again (an initial one):
    right sometimes on this repetitive model, so paths of several depths are accepted."""
    save_heads(tmp_path, initial_eagle(ref_hf, 3), ref_hf, {})
    eagle = lmforge.optimize(ref_hf, _tree_recipe(tmp_path, "{budget: 8, top_k: 3}"))
    prompt = torch.tensor([heldout_prompts[0]])
    expected = greedy_continuations(ref_hf, prompt, 40)
    assert torch.equal(eagle.generate(prompt, max_new_tokens=40, eos_token_id=[]), expected)
    assert eagle.engine.speculation_stats["drafted"] > 0


def test_the_pass_picks_the_budget_from_measured_acceptance_and_latency(tmp_path):
    model = tiny_model("llama")
    measured = {"tree_accepted_per_budget": {"2": 0.5, "8": 1.5, "32": 1.6}, "tree_threshold": 0.03}
    save_heads(tmp_path, _random_drafter(model), model, measured)
    compiled = lmforge.optimize(model, _tree_recipe(tmp_path, "{}"))
    chosen = compiled.program.meta["speculation"]["draft_heads"]["eagle_tree"]
    entry = next(entry for entry in compiled.program.history if entry["pass"] == "draft_heads")
    candidates = entry["measurements"]["budget_candidates"]
    assert [candidate["budget"] for candidate in candidates] == [2, 8, 32]
    best = max(candidates, key=lambda candidate: (1 + candidate["expected_accepted"]) / candidate["verify_ms"])
    assert chosen == {"top_k": 4, "threshold": 0.03, "max_depth": 3, "budget": best["budget"]}


def test_dynamic_trees_are_refused_without_an_eagle_drafter_or_a_measured_budget(tmp_path):
    model = tiny_model("llama")
    save_heads(tmp_path, _random_drafter(model), model, {})
    with pytest.raises(LmforgeError, match="budget auto needs the drafter's held-out tree acceptance"):
        lmforge.optimize(model, _tree_recipe(tmp_path, "{}"))
    with pytest.raises(LmforgeError, match="use `dynamic_tree: {}` instead of `tree:`"):
        lmforge.optimize(model, f"passes: [{{name: draft_heads, path: {tmp_path}, tree: [2, 1]}}]")


def test_prompt_lookup_takes_over_from_the_drafter_only_on_a_long_match():
    from lmforge.runtime.engine import Engine
    from lmforge.runtime.speculative import ProfitabilityGate, PromptLookup

    def drafts(tokens: list[int], min_match: int):
        lookup = PromptLookup(max_ngram=3, num_draft=4)
        return Engine._drafts([lookup], lambda room: "drafter", ProfitabilityGate(), torch.tensor([tokens]), 8,
                              min_match=min_match)

    short = [5, 6, 7, 8, 9, 5]  # only "5" was seen before
    long = [5, 6, 7, 8, 9, 5, 6, 7]  # "5 6 7" was seen before
    assert drafts(short, 1).tolist() == [[6, 7, 8, 9]] and drafts(short, 3) == "drafter"
    assert drafts(long, 3).tolist() == [[8, 9, 5, 6]]


def test_greedy_with_a_dynamic_tree_and_prompt_lookup_is_plain_greedy(tmp_path):
    model = _bigram(tiny_model("llama"))
    save_heads(tmp_path, _exact_drafter(model), model, {})
    recipe = (f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {tmp_path}, dynamic_tree: {{budget: 6}}}}, "
              "{name: prompt_lookup, num_draft: 6}]\nruntime: {max_seq_len: 256}")
    eagle = lmforge.optimize(model, recipe)
    prompt = _windows(seed=7, rows=1, length=12)
    expected = greedy_continuations(model, prompt, 40)  # a bigram model soon cycles: lookup finds long matches
    assert torch.equal(eagle.generate(prompt, max_new_tokens=40, eos_token_id=[]), expected)
    assert eagle.engine.speculation_stats["accepted"] > 0
