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
    """The nodes drafted so far, in creation order (parents before children)."""

    parents: list[int]  # index of the parent candidate, -1 for the root
    depths: list[int]
    tokens: list[torch.Tensor]  # (B,) each
    scores: list[torch.Tensor]  # (B,) each: cumulative confidence
    slots: dict[int, int]  # candidate → tree slot of its drafter entry, once expanded
    outputs: dict[int, torch.Tensor]  # candidate → drafter feature after it (B, H), once expanded

    def add_children(self, parent: int, depth: int, probs: torch.Tensor, top_k: int, base: torch.Tensor) -> list[int]:
        values, indices = probs.topk(top_k, dim=-1)
        added = []
        for rank in range(top_k):
            self.parents.append(parent)
            self.depths.append(depth)
            self.tokens.append(indices[:, rank])
            self.scores.append(base * values[:, rank])
            added.append(len(self.parents) - 1)
        return added

    def mean(self, node: int) -> float:
        return float(self.scores[node].mean())

    def ancestors(self, node: int) -> list[int]:
        chain = []
        while node >= 0:
            chain.append(node)
            node = self.parents[node]
        return chain


def grow_tree(drafter: EagleDrafter, root: torch.Tensor, options: DynamicTree, room: int) -> TokenTree:
    """A dynamic draft tree below `root` (B,), the last accepted token, at most `room` deep,
    from the drafter's committed state. Writes drafter entries beyond the committed slots."""
    feature, base, position = drafter.committed
    depth_limit = max(1, min(room, options.max_depth))
    top_k = options.top_k
    nodes = _Candidates([], [], [], [], {}, {})
    probs = drafter.logits(feature[:, 0]).float().softmax(-1)
    frontier = nodes.add_children(-1, 1, probs, top_k, torch.ones_like(probs[:, 0]))
    written = 0
    for depth in range(1, depth_limit):
        ranked = sorted(frontier, key=lambda node: -nodes.mean(node))[:top_k]
        best = nodes.mean(ranked[0])
        settled = sum(1 for node in range(len(nodes.parents)) if node not in frontier and nodes.mean(node) >= best)
        if best < options.threshold or settled >= options.budget:
            break
        features = torch.stack([feature[:, 0] if nodes.parents[node] < 0 else nodes.outputs[nodes.parents[node]]
                                for node in ranked], dim=1)
        tokens = torch.stack([nodes.tokens[node] for node in ranked], dim=1)
        visible = torch.zeros(len(ranked), written + len(ranked), dtype=torch.bool)
        for index, node in enumerate(ranked):
            nodes.slots[node] = written + index
            for ancestor in nodes.ancestors(node):
                if ancestor in nodes.slots:
                    visible[index, nodes.slots[ancestor]] = True
        outputs = drafter.write_tree(features, tokens, (position + depth - 1).expand_as(tokens), base + written,
                                     visible.to(tokens.device))
        written += len(ranked)
        probs = drafter.logits(outputs).float().softmax(-1)
        frontier = []
        for index, node in enumerate(ranked):
            nodes.outputs[node] = outputs[:, index]
            frontier += nodes.add_children(node, depth + 1, probs[:, index], top_k, nodes.scores[node])
    return _token_tree(nodes, root, options.budget)


def _token_tree(nodes: _Candidates, root: torch.Tensor, budget: int) -> TokenTree:
    """The `budget` best candidates (a node only after its parent) as a breadth-first TokenTree."""
    chosen: set[int] = set()
    for node in sorted(range(len(nodes.parents)), key=lambda node: (-nodes.mean(node), node)):
        if len(chosen) == budget:
            break
        if nodes.parents[node] < 0 or nodes.parents[node] in chosen:
            chosen.add(node)
    order = sorted(chosen, key=lambda node: (nodes.depths[node], node))
    index = {node: position + 1 for position, node in enumerate(order)}
    parents = [-1] + [index.get(nodes.parents[node], 0) for node in order]
    tokens = torch.stack([root] + [nodes.tokens[node] for node in order], dim=1)
    depths = torch.tensor([0] + [nodes.depths[node] for node in order], device=root.device)
    return TokenTree(parents, tokens, depths)
