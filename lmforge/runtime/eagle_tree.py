"""Dynamic draft trees (EAGLE-2): the drafter's own confidence shapes the tree it drafts.

Every candidate node's score is its cumulative draft confidence, the product of the
drafter's probabilities along its path from the root. Depth by depth, the `top_k` frontier
nodes with the highest score are expanded — one drafter forward for all of them, each
seeing the committed cache and its own ancestors (`EagleDrafter.write_tree`) — and each
gets its drafter's `top_k` tokens as children. Drafting stops at the depth limit, when the
best frontier node's score falls below `threshold` (adaptive depth: deeper drafts would
rarely be accepted), or when no child could enter the tree anymore. The tree verified is the
`budget` highest-scoring candidates: a child never scores above its parent, so they form a
tree, which `TokenTree` and the existing tree attention verify in one forward.

Rows of a batch share one tree shape (the tree attention mask is per batch); the shape is
chosen by the mean score over the rows, while each row's tokens are its own top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.eagle.drafter import EagleDrafter
from lmforge.runtime.speculative import TokenTree


@dataclass(frozen=True)
class DynamicTree:
    """How a dynamic tree grows: `budget` draft nodes at most (verify rows beyond the root),
    `top_k` children per expanded node and nodes expanded per depth, depth at most
    `max_depth`, and no expansion once the best frontier's cumulative confidence is below
    `threshold`."""

    budget: int
    top_k: int
    threshold: float
    max_depth: int

    def drafter_slots(self) -> int:
        """Drafter cache slots a tree writes beyond the committed ones."""
        return self.top_k * self.max_depth


@dataclass
class _Candidates:
    """The nodes drafted so far, in creation order (parents before children): their shape on
    the host, their tokens and scores on the device — one host copy of the scores' batch means
    per depth decides the shape, so growing a tree costs a few ops per depth, not per node."""

    parents: list[int]  # index of the parent candidate, -1 for the root
    depths: list[int]
    means: list[float]  # cumulative confidence, mean over the batch rows
    tokens: torch.Tensor  # (B, nodes)
    scores: torch.Tensor  # (B, nodes): cumulative confidence

    @classmethod
    def below_root(cls, probs: torch.Tensor, top_k: int) -> _Candidates:
        values, indices = probs.topk(top_k, dim=-1)
        return cls([-1] * top_k, [1] * top_k, values.mean(0).tolist(), indices, values)

    def add_children(self, parents: list[int], depth: int, probs: torch.Tensor, top_k: int) -> list[int]:
        """`top_k` children under each of `parents`, from their drafter probabilities (B, len(parents), V)."""
        values, indices = probs.topk(top_k, dim=-1)
        scores = (self.scores[:, parents, None] * values).flatten(1)
        first = len(self.parents)
        self.parents += [parent for parent in parents for _ in range(top_k)]
        self.depths += [depth] * scores.shape[1]
        self.means += scores.mean(0).tolist()
        self.tokens = torch.cat([self.tokens, indices.flatten(1)], dim=1)
        self.scores = torch.cat([self.scores, scores], dim=1)
        return list(range(first, len(self.parents)))


def grow_tree(drafter: EagleDrafter, root: torch.Tensor, options: DynamicTree, room: int) -> TokenTree:
    """A dynamic draft tree below `root` (B,), the last accepted token, at most `room` deep,
    from the drafter's committed state. Writes drafter entries beyond the committed slots."""
    feature, base, position = drafter.committed
    depth_limit = max(1, min(room, options.max_depth))
    top_k = options.top_k
    nodes = _Candidates.below_root(drafter.draft_logits(feature[:, 0]).float().softmax(-1), top_k)
    frontier = list(range(top_k))
    expanded: list[int] = []  # candidates written to the drafter's cache, in slot order
    sees: dict[int, list[int]] = {}  # expanded candidate → tree slots it attends to (its ancestors', its own)
    outputs = feature.expand(-1, top_k, -1)  # the drafter's features after the frontier's parents
    for depth in range(1, depth_limit):
        ranked = sorted(frontier, key=lambda node: -nodes.means[node])[:top_k]
        best = nodes.means[ranked[0]]
        in_frontier = set(frontier)
        settled = sum(1 for node, mean in enumerate(nodes.means) if node not in in_frontier and mean >= best)
        if best < options.threshold or settled >= options.budget:
            break
        parent_columns = [(node - frontier[0]) // top_k if depth > 1 else 0 for node in ranked]
        visible = torch.zeros(len(ranked), len(expanded) + len(ranked), dtype=torch.bool)
        for index, node in enumerate(ranked):
            sees[node] = sees.get(nodes.parents[node], []) + [len(expanded) + index]
            visible[index, sees[node]] = True
        outputs = drafter.write_tree(outputs[:, parent_columns], nodes.tokens[:, ranked],
                                     (position + depth - 1).expand(-1, len(ranked)), base + len(expanded),
                                     visible.to(root.device))
        expanded += ranked
        frontier = nodes.add_children(ranked, depth + 1, drafter.draft_logits(outputs).float().softmax(-1), top_k)
    return _token_tree(nodes, root, options.budget)


def _token_tree(nodes: _Candidates, root: torch.Tensor, budget: int) -> TokenTree:
    """The `budget` best candidates (a node only after its parent) as a breadth-first TokenTree."""
    chosen: set[int] = set()
    for node in sorted(range(len(nodes.parents)), key=lambda node: (-nodes.means[node], node)):
        if len(chosen) == budget:
            break
        if nodes.parents[node] < 0 or nodes.parents[node] in chosen:
            chosen.add(node)
    order = sorted(chosen, key=lambda node: (nodes.depths[node], node))
    index = {node: position + 1 for position, node in enumerate(order)}
    parents = [-1] + [index.get(nodes.parents[node], 0) for node in order]
    tokens = torch.cat([root[:, None], nodes.tokens[:, order]], dim=1)
    depths = torch.tensor([0] + [nodes.depths[node] for node in order], device=root.device)
    return TokenTree(parents, tokens, depths)
