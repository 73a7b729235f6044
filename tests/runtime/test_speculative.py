"""Speculative decoding with prompt-lookup drafts: greedy-exact, distribution-exact sampling,
cache contents after rejection, and the draft source and gate on their own."""

import pytest
import torch
from cache_checks import assert_cache_holds_only_accepted_tokens
from scipy_free_chi2 import chi_square_p_value
from tiny_models import tiny_model

import lmforge
from lmforge.runtime.sampling import SamplingParams
from lmforge.runtime.speculative import ProfitabilityGate, PromptLookup, accept

PLAIN = "passes: [{name: cleanup}, {name: fuse_projections}]\nruntime: {max_seq_len: 256}"
LOOKUP = "passes: [{name: cleanup}, {name: fuse_projections}, {name: prompt_lookup, num_draft: 6}]\nruntime: {max_seq_len: 256}"


def _repetitive_prompts(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Prompts that repeat a phrase (lookup hits) after random tokens (lookup misses)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        phrase = torch.randint(3, vocab, (6,), generator=generator)
        noise = torch.randint(3, vocab, (10,), generator=generator)
        rows.append(torch.cat([noise, phrase, noise[:4], phrase, phrase[:3]]))
    return torch.stack(rows)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=2, min_ngram=1, num_draft=3)
    assert lookup.propose([1, 2, 3, 4, 9, 1, 2]) == [3, 4, 9]
    assert lookup.propose([1, 2, 3, 4, 9, 1, 2, 3, 7, 7, 8]) == []  # 8 never appeared before, 7,8 neither
    assert PromptLookup(max_ngram=3).propose([5, 6, 5, 6, 5]) == [6, 5]  # (5, 6, 5) opened the list, then came 6, 5
    assert PromptLookup().propose([4]) == []


def test_shorter_matches_propose_shorter_drafts():
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]

    def scaled(tokens):
        return PromptLookup(max_ngram=3, num_draft=6, scale_by_match=True).propose(tokens)

    assert scaled([*text, 1, 2, 3]) == [4, 5, 6, 7, 8, 9]  # 3-token match: all 6
    assert scaled([*text, 20, 2, 3]) == [4, 5, 6, 7]  # (2, 3) matched: ceil(6 * 2 / 3)
    assert scaled([*text, 20, 21, 9]) == [10, 11]  # (9) matched: ceil(6 / 3)
    assert PromptLookup(max_ngram=3, num_draft=6).propose([*text, 20, 21, 9]) == [10, 11, 12, 13, 20, 21]


def test_gate_backs_off_while_drafts_are_rejected_and_probes_again():
    gate = ProfitabilityGate(row_cost=0.1, decay=0.5, tolerance=1.0, max_cooldown=4)
    pattern = []
    for _ in range(13):
        drafting = gate.should_draft()
        pattern.append(drafting)
        if drafting:
            gate.record(0, 8)  # each miss loses 0.8 of a forward
    # two misses pass the tolerance; then every probe misses and pauses again, twice as long
    assert pattern == [True, True, False, True, False, False, True, False, False, False, False, True, False]
    while not gate.should_draft():
        pass
    gate.record(2, 8)  # a draft that paid off: no more waiting
    assert gate.should_draft() and gate.should_draft()


def test_gate_lets_recent_wins_carry_cheap_misses():
    gate = ProfitabilityGate(row_cost=0.05, decay=0.9, tolerance=1.0)
    gate.record(5, 10)
    for _ in range(9):  # each miss costs 10 rows = half a forward; the decaying win covers eight of them
        assert gate.should_draft()
        gate.record(0, 10)
    assert not gate.should_draft()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "phi"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculation_equals_plain_greedy(arch, batch):
    model = tiny_model(arch, num_layers=2)
    prompts = _repetitive_prompts(batch, model.config.vocab_size, seed=2)  # a seed whose outputs hit the lookup
    plain, lookup = lmforge.optimize(model, PLAIN), lmforge.optimize(model, LOOKUP)
    expected = plain.generate(prompts, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(lookup.generate(prompts, max_new_tokens=40, eos_token_id=[]), expected)
    assert lookup.engine.speculation_stats["drafted"] > 0


def test_greedy_speculation_on_the_reference_checkpoint(ref_path, heldout_prompts):
    plain, lookup = lmforge.optimize(ref_path, PLAIN), lmforge.optimize(ref_path, LOOKUP)
    accepted = 0
    for prompt in heldout_prompts:
        ids = torch.tensor([prompt])
        assert torch.equal(lookup.generate(ids, max_new_tokens=60), plain.generate(ids, max_new_tokens=60))
        accepted += lookup.engine.speculation_stats["accepted"]
    assert accepted > 0  # code repeats itself: some drafts were right
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :15] = 0  # left padding in a batch
    batch = torch.tensor([heldout_prompts[0][:40], heldout_prompts[2][:40]])
    assert torch.equal(lookup.generate(batch, mask, max_new_tokens=30), plain.generate(batch, mask, max_new_tokens=30))


def test_cache_after_a_rejected_draft_holds_the_accepted_path_only():
    model = tiny_model("llama", num_layers=2)
    lookup = lmforge.optimize(model, LOOKUP)
    prompt = _repetitive_prompts(1, model.config.vocab_size)
    tokens = lookup.generate(prompt, max_new_tokens=30, eos_token_id=[])
    assert lookup.engine.speculation_stats["accepted"] < lookup.engine.speculation_stats["drafted"]  # some rejected
    assert_cache_holds_only_accepted_tokens(lookup.engine, tokens)


def test_sampled_acceptance_keeps_the_model_distribution():
    """The rejection rule with a deterministic draft: the token it returns at the first
    position is distributed exactly as the model's (filtered) distribution there."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 12, generator=generator) * 1.5
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=8, seed=0)
    probs = torch.softmax(torch.where(logits[0, 0] >= logits[0, 0].topk(8).values[-1], logits[0, 0] / 0.9, -torch.inf), -1)
    rows = 500  # 40 calls of 500 independent rows each: 20,000 samples without 20,000 Python round trips
    draft = torch.tensor([[int(probs.argmax()), 3]]).repeat(rows, 1)
    counts = torch.zeros(12)
    sampler = torch.Generator().manual_seed(1)
    for _ in range(40):
        accepted, own = accept(logits.repeat(rows, 1, 1), draft, params, sampler)
        first = draft[:, 0] if accepted > 0 else own  # with a rejection in the batch, `own` is each row's first token
        counts += torch.bincount(first, minlength=12).float()
    expected = probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0
    assert chi_square_p_value(counts[support], expected[support]) > 0.01


def test_typical_acceptance_keeps_drafts_above_the_entropy_threshold():
    from lmforge.runtime.speculative import TypicalAcceptance

    probs = torch.tensor([0.7, 0.2, 0.05, 0.05])
    logits = probs.log().expand(1, 4, 4).clone()
    params = SamplingParams(do_sample=True, seed=0)
    # entropy 0.87 nats: threshold min(0.09, 0.3 * exp(-0.87)) = 0.09 keeps tokens 0 and 1, stops at token 2
    accepted, own = accept(logits, torch.tensor([[0, 1, 2]]), params, torch.Generator().manual_seed(0), TypicalAcceptance())
    assert accepted == 2 and 0 <= int(own[0]) < 4
    strict = TypicalAcceptance(epsilon=0.9, delta=2.0)  # threshold min(0.9, 0.84) = 0.84: nothing is typical enough
    assert accept(logits, torch.tensor([[0, 1, 2]]), params, torch.Generator().manual_seed(0), strict)[0] == 0
