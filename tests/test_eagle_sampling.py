"""Sampled decoding with the EAGLE drafter stays lossless: its chain is drawn from the
drafter's distribution q and verified by the rejection rule (accept with min(1, p/q), else
draw from norm(max(p - q, 0))), so the first and second speculative tokens are distributed
exactly as plain sampling's — through the engine (a batch, whose rows advance by the
smallest accepted length) and row by row over a 2-token chain (acceptance at depth 2).
Two plausible wrong rules fail the same tests."""

import pytest
import torch
import torch.nn.functional as F
from scipy_free_chi2 import chi_square_p_value
from test_eagle import _bigram, _exact_drafter
from tiny_models import tiny_model

import lmforge
from lmforge.draft_heads import save_heads
from lmforge.runtime import engine as engine_module
from lmforge.runtime.rejection import DrawnChain, accept_drawn
from lmforge.runtime.sampling import SamplingParams, filtered_logits

SAMPLING = dict(do_sample=True, temperature=1.0, top_k=4)
ROWS, CALLS = 100, 15  # 1,500 samples per token from 15 seeded generate calls
CHAINS = 1500  # row-by-row chains of 2 drafts
P_VALUE = 0.001  # chi-square: the correct rule scores above it (seeded, so deterministic), the wrong ones below


@pytest.fixture(scope="module")
def sampled_setup(tmp_path_factory):
    """A bigram model (next-token distribution T[current token]), a drafter whose argmax is the
    model's but whose logits are scaled otherwise (q != p, overlapping), and the exact marginals."""
    model = _bigram(tiny_model("llama"))
    path = tmp_path_factory.mktemp("eagle")
    save_heads(path, _exact_drafter(model, depth=2), model, {})
    compiled = lmforge.optimize(model, f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {path}}}]\n"
                                "runtime: {max_seq_len: 64}")
    with torch.no_grad():
        logits = model(torch.arange(256)[:, None]).logits[:, 0]
        drafted = filtered_logits(F.linear(model.get_input_embeddings().weight, model.get_output_embeddings().weight),
                                  SamplingParams(**SAMPLING)).softmax(-1)  # the drafter's q after each token
    transition = filtered_logits(logits, SamplingParams(**SAMPLING)).softmax(-1).double()
    prompt = torch.tensor([[5, 17, 42, 9]])
    first = transition[9]  # plain sampling's first token, then the speculative ones (room for a chain of 2)
    return compiled, prompt, first @ transition, first @ transition @ transition, transition.float(), drafted


def _speculative_samples(compiled, prompt) -> tuple[torch.Tensor, torch.Tensor, dict]:
    counts, totals = torch.zeros(2, 256), {"drafted": 0, "accepted": 0}
    for call in range(CALLS):
        tokens = compiled.generate(prompt.repeat(ROWS, 1), max_new_tokens=4, eos_token_id=[],
                                   **SAMPLING, seed=call)
        for index in range(2):
            counts[index] += torch.bincount(tokens[:, prompt.shape[1] + 1 + index], minlength=256).float()
        for key in totals:
            totals[key] += compiled.engine.speculation_stats[key]
    return counts[0], counts[1], totals


def _fits(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    expected = probabilities.float() * counts.sum()
    support = expected > 0
    if counts[~support].sum() > 0:
        return 0.0  # a token the model never samples
    return chi_square_p_value(counts[support], expected[support])


def _inverted_ratio(logits, drafts: DrawnChain, params, generator):
    """Wrong: accept with min(1, q/p) instead of min(1, p/q) (rows of one, as the chain test feeds)."""
    p = filtered_logits(logits, params).softmax(-1)[0]
    accepted = 0
    for depth, token in enumerate(drafts.tokens[0].tolist()):
        if float(torch.rand(1, generator=generator)) * p[depth, token] >= drafts.probs[0, depth, token]:
            residual = (p[depth] - drafts.probs[0, depth]).clamp_min(0)
            return accepted, torch.multinomial(residual / residual.sum(), 1, generator=generator)
        accepted += 1
    return accepted, torch.multinomial(p[accepted], 1, generator=generator)


def _resample_from_p(logits, drafts: DrawnChain, params, generator):
    """Wrong: accept with min(1, p/q), but a rejected row draws from p itself instead of the
    positive part of p - q."""
    p = filtered_logits(logits, params).softmax(-1)
    tokens, k = drafts.tokens, drafts.tokens.shape[1]
    p_drafted = p[:, :k].gather(-1, tokens[..., None])[..., 0]
    q_drafted = drafts.probs.gather(-1, tokens[..., None])[..., 0]
    uniform = torch.rand(tokens.shape, generator=generator)
    row_accepts = (uniform * q_drafted < p_drafted).long().cumprod(-1).sum(-1)
    accepted = int(row_accepts.min())
    fresh = torch.multinomial(p[:, accepted], 1, generator=generator)[:, 0]
    return accepted, torch.where(row_accepts > accepted, tokens[:, min(accepted, k - 1)], fresh)


def _chain_samples(transition, drafted, rule, root: int = 9) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`CHAINS` single-row rounds: a chain x1 ~ q(root), x2 ~ q(x1) verified against the
    model's p at root, x1, x2 by `rule`; a round that stops early is completed by plain
    sampling. Returns the counts of the first two tokens and how often 0, 1, 2 drafts passed."""
    generator, params = torch.Generator().manual_seed(0), SamplingParams(do_sample=True)
    counts, passed = torch.zeros(2, 256), [0, 0, 0]
    for _ in range(CHAINS):
        first = torch.multinomial(drafted[root], 1, generator=generator)
        second = torch.multinomial(drafted[first[0]], 1, generator=generator)
        chain = torch.cat([first, second])
        logits = transition[torch.cat([torch.tensor([root]), chain])].log()[None]
        accepted, own = rule(logits, DrawnChain(chain[None], drafted[torch.tensor([root, first[0]])][None]), params,
                             generator)
        tokens = [*chain[:accepted].tolist(), int(own[0])]
        if len(tokens) < 2:
            tokens.append(int(torch.multinomial(transition[tokens[0]], 1, generator=generator)))
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
        passed[accepted] += 1
    return counts[0], counts[1], passed


def test_speculative_sampling_keeps_both_token_distributions(sampled_setup):
    compiled, prompt, second, third, transition, drafted = sampled_setup
    first_counts, second_counts, totals = _speculative_samples(compiled, prompt)
    assert totals["drafted"] > 0, totals
    assert _fits(first_counts, second) > P_VALUE
    assert _fits(second_counts, third) > P_VALUE
    first_counts, second_counts, passed = _chain_samples(transition, drafted, accept_drawn)
    assert min(passed) > 100, passed  # rejections at depth 1 and 2, and whole chains accepted
    assert _fits(first_counts, transition[9]) > P_VALUE
    assert _fits(second_counts, transition[9].double() @ transition.double()) > P_VALUE


@pytest.mark.parametrize("wrong_rule", [_inverted_ratio, _resample_from_p])
def test_a_wrong_acceptance_rule_is_caught(sampled_setup, monkeypatch, wrong_rule):
    compiled, prompt, second, third, transition, drafted = sampled_setup
    first_counts, second_counts, _ = _chain_samples(transition, drafted, wrong_rule)
    marginal = transition[9].double() @ transition.double()
    assert min(_fits(first_counts, transition[9]), _fits(second_counts, marginal)) < P_VALUE
    if wrong_rule is _resample_from_p:  # the engine-level test catches it as well
        monkeypatch.setattr(engine_module, "accept_drawn", wrong_rule)
        first_counts, second_counts, _ = _speculative_samples(compiled, prompt)
        assert min(_fits(first_counts, second), _fits(second_counts, third)) < P_VALUE
