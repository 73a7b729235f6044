"""Speculative sampling with drafts that were themselves sampled (the EAGLE drafter's chain
when decoding samples), and with draft trees (recursive rejection sampling).

The published rule (Leviathan et al., Chen et al.): a draft token x drawn from the
drafter's q is accepted with probability min(1, p(x) / q(x)) under the model's p; at the
first rejection the token is drawn from norm(max(p - q, 0)) instead. The token at every
position is then distributed exactly as p, whatever q is. `speculative.accept` is the
special case of a deterministic draft (q one-hot on x). Rows of a batch advance together by
the smallest accepted length, as there: a row that accepted further keeps its draft token at
that position, which is the token its own run of the rule produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.runtime.sampling import SamplingParams, filtered_logits
from lmforge.runtime.speculative import TokenTree


@dataclass(frozen=True)
class DrawnChain:
    """Draft tokens (B, k) and the distributions q (B, k, V) they were drawn from."""

    tokens: torch.Tensor
    probs: torch.Tensor


def accept_drawn(
    logits: torch.Tensor, drafts: DrawnChain, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, torch.Tensor]:
    """Verify sampled drafts against `logits` (B, k + 1, V) of the forward that fed the last
    token plus the drafts. Returns the number of draft tokens every row accepted, `a`, and
    each row's token for position `a`."""
    tokens, q = drafts.tokens, drafts.probs
    batch, k = tokens.shape
    p = filtered_logits(logits, params).softmax(-1)
    p_drafted = p[:, :k].gather(-1, tokens[..., None]).squeeze(-1)
    q_drafted = q.gather(-1, tokens[..., None]).squeeze(-1)
    uniform = torch.rand(batch, k, generator=generator, device=logits.device)
    row_accepts = (uniform * q_drafted < p_drafted).long().cumprod(-1).sum(-1)  # u < p/q without dividing by 0
    accepted = int(row_accepts.min())
    chosen = torch.empty(batch, dtype=torch.long, device=logits.device)
    for row, row_accepted in enumerate(row_accepts.tolist()):
        if row_accepted > accepted:
            chosen[row] = tokens[row, accepted]
            continue
        distribution = p[row, accepted]
        if accepted < k:
            residual = (distribution - q[row, accepted]).clamp_min(0)
            distribution = residual if float(residual.sum()) > 0 else distribution  # p == q never rejects
        chosen[row] = torch.multinomial(distribution / distribution.sum(), 1, generator=generator)[0]
    return accepted, chosen


def accept_tree_sampled(
    logits: torch.Tensor, tree: TokenTree, params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[list[int]], torch.Tensor]:
    """Recursive rejection sampling over a tree of deterministic drafts (SpecInfer's multi-draft
    rule, each child's q one-hot on its token; EAGLE's trees are the drafter's top-k): from the
    root, a node's children are tried in order, child x accepted with probability p'(x), p' the
    model's filtered distribution at the node (`logits` (B, n, V) of the tree's forward) with the
    children rejected before x removed and renormalised. An accepted child becomes the node;
    when all are rejected (or at a leaf) the token is drawn from p'. Each token is thus drawn
    exactly from p: p'(x) is p conditioned on not being a rejected sibling. Rows advance together
    by the shortest accepted path (as `speculative.accept_tree`): a row cut shorter keeps its
    accepted child at the cut, the token its own walk drew there. Returns the paths (root first,
    equal length) and each row's token after its path."""
    p = filtered_logits(logits, params).softmax(-1)
    batch, size = tree.tokens.shape
    children: list[list[int]] = [[] for _ in range(size)]
    for node in range(1, size):
        children[tree.parents[node]].append(node)
    at_parent = torch.tensor([0] + tree.parents[1:], device=logits.device)
    p_drafted = p[:, at_parent].gather(-1, tree.tokens[..., None]).squeeze(-1).tolist()  # p at the parent of each node's token
    uniform = torch.rand(batch, size, generator=generator, device=logits.device).tolist()
    paths, rejected = [], []
    for row in range(batch):
        path, removed, refused = [0], 0.0, []
        while True:
            for child in children[path[-1]]:
                chance = p_drafted[row][child]
                if chance > 0 and uniform[row][child] * max(1.0 - removed, 0.0) < chance:
                    path.append(child)
                    removed, refused = 0.0, []
                    break
                removed += chance
                refused.append(child)
            else:
                break
        paths.append(path)
        rejected.append(refused)
    depth = min(len(path) for path in paths)
    chosen = torch.empty(batch, dtype=torch.long, device=logits.device)
    for row, path in enumerate(paths):
        if len(path) > depth:
            chosen[row] = tree.tokens[row, path[depth]]
            continue
        distribution = p[row, path[-1]].clone()
        distribution[tree.tokens[row, rejected[row]]] = 0.0
        total = distribution.sum()
        distribution = distribution / total if float(total) > 0 else p[row, path[-1]]  # rounding: rejected held all of p
        chosen[row] = torch.multinomial(distribution, 1, generator=generator)[0]
    return [path[:depth] for path in paths], chosen
