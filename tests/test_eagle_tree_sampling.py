"""Sampled decoding with a draft tree stays lossless: recursive rejection sampling
(`rejection.accept_tree_sampled`) keeps the first and second tokens distributed exactly as
plain sampling's — on a hand-made tree over a bigram distribution, row by row and in a batch
whose rows advance by the shortest accepted path, and through the engine with the EAGLE
drafter's dynamic tree. A plausible wrong rule (siblings tried without renormalising after a
rejection) fails the same test."""

import torch
from scipy_free_chi2 import chi_square_p_value
from test_eagle import _bigram, _exact_drafter
from test_eagle_sampling import P_VALUE, SAMPLING, _fits
from tiny_models import tiny_model

import lmforge
from lmforge.draft_heads import save_heads
from lmforge.runtime.rejection import accept_tree_sampled
from lmforge.runtime.sampling import SamplingParams, filtered_logits
from lmforge.runtime.speculative import TokenTree

VOCAB, ROOT = 6, 0
# root -> 1, 2, 3; 1 -> 4, 2; 2 -> 5: siblings on two levels, a leaf at depth 1 (3) and at depth 2
PARENTS, TOKENS = [-1, 0, 0, 0, 1, 1, 2], [ROOT, 1, 2, 3, 4, 2, 5]
DEPTHS = [0, 1, 1, 1, 2, 2, 2]
ROUNDS = 600  # samples per token: 600 rounds of one row, 150 of four


def _transition() -> torch.Tensor:
    """A bigram distribution whose mass sits on and off the tree, so every rule path runs."""
    generator = torch.Generator().manual_seed(7)
    return torch.softmax(2 * torch.randn(VOCAB, VOCAB, generator=generator), dim=-1)


def _unnormalised(logits, tree, params, generator):
    """Wrong: each sibling accepted with p(x) itself, not p renormalised after the rejected ones."""
    p = filtered_logits(logits, params).softmax(-1)[0]
    node, path, refused = 0, [0], []
    while True:
        kids = [child for child in range(1, len(tree.parents)) if tree.parents[child] == node]
        for child in kids:
            if float(torch.rand(1, generator=generator)) < p[node, tree.tokens[0, child]]:
                node = child
                path.append(child)
                refused = []
                break
            refused.append(child)
        else:
            break
    residual = p[node].clone()
    residual[tree.tokens[0, refused]] = 0
    return [path], torch.multinomial(residual / residual.sum(), 1, generator=generator)


def _tree_samples(rule, batch: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Counts of the first two tokens after ROOT over ROUNDS rounds of `batch` rows verifying the
    tree by `rule`, each round's tokens completed by plain sampling; and how many rounds
    accepted 0, 1, 2 drafts."""
    transition, generator = _transition(), torch.Generator().manual_seed(0)
    tokens = torch.tensor(TOKENS).expand(batch, -1)
    tree = TokenTree(PARENTS, tokens, torch.tensor(DEPTHS))
    logits = transition[tokens].log()
    counts, accepted = torch.zeros(2, VOCAB), [0, 0, 0]
    for _ in range(ROUNDS // batch):
        paths, own = rule(logits, tree, SamplingParams(do_sample=True), generator)
        accepted[len(paths[0]) - 1] += 1
        for row, path in enumerate(paths):
            drawn = [TOKENS[node] for node in path[1:]] + [int(own[row])]
            if len(drawn) < 2:
                drawn.append(int(torch.multinomial(transition[drawn[0]], 1, generator=generator)))
            counts[0, drawn[0]] += 1
            counts[1, drawn[1]] += 1
    return counts[0], counts[1], accepted


def _fit(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    return chi_square_p_value(counts, probabilities.double() * counts.sum())


def test_recursive_rejection_keeps_both_token_distributions():
    transition = _transition().double()
    for batch in (1, 4):
        first, second, accepted = _tree_samples(accept_tree_sampled, batch)
        assert batch > 1 or min(accepted) > 50, accepted  # rounds ending at the root, at depth 1 and at depth 2
        assert _fit(first, transition[ROOT]) > P_VALUE
        assert _fit(second, transition[ROOT] @ transition) > P_VALUE


def test_a_wrong_tree_rule_is_caught():
    transition = _transition().double()
    first, second, _ = _tree_samples(_unnormalised, 1)
    assert min(_fit(first, transition[ROOT]), _fit(second, transition[ROOT] @ transition)) < P_VALUE


def test_sampling_with_a_dynamic_tree_keeps_both_token_distributions(tmp_path):
    """Through the engine: a bigram model, the drafter whose argmax is the model's (its top-k
    children are often rejected when sampling), a dynamic tree of 6 nodes, 6 calls of 100 rows."""
    model = _bigram(tiny_model("llama"))
    save_heads(tmp_path, _exact_drafter(model, depth=2), model, {})
    compiled = lmforge.optimize(model, f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {tmp_path}, "
                                "dynamic_tree: {budget: 6, top_k: 2}}]\nruntime: {max_seq_len: 64}")
    with torch.no_grad():
        transition = filtered_logits(model(torch.arange(256)[:, None]).logits[:, 0],
                                     SamplingParams(**SAMPLING)).softmax(-1).double()
    prompt, counts, drafted, verified = torch.tensor([[5, 17, 42, 9]]), torch.zeros(2, 256), 0, 0
    for call in range(6):
        tokens = compiled.generate(prompt.repeat(100, 1), max_new_tokens=4, eos_token_id=[], **SAMPLING, seed=call)
        for index in range(2):
            counts[index] += torch.bincount(tokens[:, prompt.shape[1] + 1 + index], minlength=256).float()
        drafted += compiled.engine.speculation_stats["drafted"]
        verified += compiled.engine.speculation_stats["forwards"] - 1
    assert drafted > 2 * verified > 0  # trees: a chain of the drafter's depth 2 drafts at most 2 per verify
    second = transition[9] @ transition
    assert _fits(counts[0], second) > P_VALUE
    assert _fits(counts[1], second @ transition) > P_VALUE
