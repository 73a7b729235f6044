"""What `train-heads --kind eagle` measures on held-out text and stores with the drafter, so
that the `draft_heads` pass can shape dynamic trees without text of its own.

- `confidence_threshold`: adaptive depth. A draft node costs one more row in the verify
  forward (the profitability gate counts it as `ProfitabilityGate.row_cost` of a forward) and
  pays off only when accepted. Chain drafts are binned by their cumulative confidence (the
  product of the drafter's top-1 probabilities along the chain); going from the most
  confident bin down, the threshold is the upper edge of the first bin accepted less often
  than that cost. The runtime stops expanding a tree once its best frontier scores below it.
- `tree_acceptance`: for each node budget, the mean number of drafted tokens a dynamic tree of
  that budget gets accepted, drafted exactly as the runtime drafts (`runtime.eagle_tree`) at
  held-out origins whose continuations are the model's own greedy tokens. The pass weighs it
  against verify latency measured per width to choose the budget.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.eagle.drafter import EagleDrafter
from lmforge.eagle.training import _base_features
from lmforge.runtime.eagle_tree import DynamicTree, grow_tree
from lmforge.runtime.speculative import ProfitabilityGate, TokenTree

BREAK_EVEN = ProfitabilityGate.row_cost
CONFIDENCE_EDGES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0)
BUDGETS = (1, 2, 4, 8, 12, 16, 24, 32)
TOP_K = 4  # the `dynamic_tree.top_k` default


def confidence_threshold(drafter: EagleDrafter, hidden: torch.Tensor, sequences: torch.Tensor, prompt_len: int) -> float:
    """The adaptive-depth threshold from greedy chains at the held-out origins of `sequences`
    (B, T), whose base hidden states are `hidden` (B, T, H)."""
    length, depth = sequences.shape[1], drafter.depth
    origins = slice(prompt_len - 1, length - depth - 1)
    with torch.no_grad():
        steps = drafter.unrolled(hidden, sequences, depth)
    confidence = torch.ones(sequences[:, origins].shape)
    reached = torch.ones_like(confidence, dtype=torch.bool)
    scores, accepted = [], []
    for step, features in enumerate(steps):
        top = drafter.logits(features).float().softmax(-1).max(-1)
        confidence = confidence * top.values[:, origins]
        matched = reached & (top.indices[:, origins] == sequences[:, prompt_len + step + 1 : length - depth + step + 1])
        scores.append(confidence[reached])
        accepted.append(matched[reached])
        reached = matched
    scores, accepted = torch.cat(scores), torch.cat(accepted).float()
    for high, low in zip(CONFIDENCE_EDGES, CONFIDENCE_EDGES[1:]):
        inside = (scores >= low) & (scores < high) if high < 1.0 else scores >= low
        if inside.any() and float(accepted[inside].mean()) < BREAK_EVEN:
            return high
    return 0.0


def _accepted_depth(tree: TokenTree, truth: list[int]) -> int:
    """How deep the tree's path equal to `truth` (the tokens after the root) goes."""
    tokens, depths = tree.tokens[0].tolist(), tree.depths.tolist()
    matched, deepest = [True] + [False] * (len(tokens) - 1), 0
    for node in range(1, len(tokens)):
        parent = tree.parents[node]
        matched[node] = matched[parent] and tokens[node] == truth[depths[node] - 1]
        deepest = max(deepest, depths[node]) if matched[node] else deepest
    return deepest


def tree_acceptance(drafter: EagleDrafter, hidden: torch.Tensor, sequences: torch.Tensor, prompt_len: int,
                    threshold: float, budgets: tuple[int, ...] = BUDGETS, stride: int = 4) -> dict[str, float]:
    """Per budget (as a string key, for JSON), the mean accepted depth of the runtime's dynamic
    tree at every `stride`-th held-out origin of each row of `sequences`, one row at a time."""
    length, depth = sequences.shape[1], drafter.depth
    positions = torch.arange(length)[None]
    totals, origins = dict.fromkeys(budgets, 0), 0
    with torch.no_grad():
        for row in range(sequences.shape[0]):
            ids, states = sequences[row : row + 1], hidden[row : row + 1]
            drafter.start(1, length + TOP_K * depth + 1, None, hidden.device)
            drafter.extend(states[:, :prompt_len], ids[:, 1 : prompt_len + 1], positions[:, :prompt_len], 0)
            for origin in range(prompt_len - 1, length - depth - 1):
                if (origin - prompt_len + 1) % stride == 0:
                    truth = ids[0, origin + 2 : origin + 2 + depth].tolist()
                    for budget in budgets:
                        tree = grow_tree(drafter, ids[:, origin + 1], DynamicTree(budget, TOP_K, threshold, depth), depth)
                        totals[budget] += _accepted_depth(tree, truth)
                    origins += 1
                drafter.extend(states[:, origin + 1 : origin + 2], ids[:, origin + 2 : origin + 3],
                               positions[:, origin + 1 : origin + 2], origin + 1)
    return {str(budget): round(total / max(origins, 1), 4) for budget, total in totals.items()}


def tree_measurements(drafter: EagleDrafter, model: Any, sequences: torch.Tensor, prompt_len: int) -> dict:
    """The threshold and the tree acceptance per budget, as `heads.json` stores them."""
    hidden, _ = _base_features(model, sequences)
    threshold = confidence_threshold(drafter, hidden, sequences, prompt_len)
    return {"tree_threshold": threshold, "tree_top_k": TOP_K,
            "tree_accepted_per_budget": tree_acceptance(drafter, hidden, sequences, prompt_len, threshold)}
