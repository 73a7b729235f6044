"""Speculative decoding in the runtime: draft sources and the acceptance rules.

A draft proposes the next few tokens; one forward verifies them all (the attention op
already handles several new tokens after a cached prefix) and the acceptance rule keeps
the longest prefix the model agrees with, plus one token of the model's own. Greedy
acceptance keeps exactly the tokens plain greedy decoding would produce; sampled
acceptance is the speculative-sampling rejection rule for a deterministic draft, which
leaves the sampled distribution unchanged. Rows of a batch advance together by the
smallest accepted length, so their caches stay aligned and nothing is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.runtime.sampling import SamplingParams, filtered_logits


@dataclass
class PromptLookup:
    """Draft by n-gram lookup (prompt lookup decoding): find the most recent earlier
    occurrence of the sequence's last n tokens (longest n first) and propose what followed
    it. The index of n-gram → last start position is updated incrementally."""

    max_ngram: int = 3
    min_ngram: int = 1
    num_draft: int = 8
    _index: dict[tuple, int] = field(default_factory=dict)
    _indexed: int = 0

    def reset(self) -> None:
        self._index.clear()
        self._indexed = 0

    def propose(self, tokens: list[int]) -> list[int]:
        """Up to `num_draft` tokens that followed the latest earlier match of the suffix."""
        for end in range(self._indexed + 1, len(tokens)):  # n-grams that end before the last token
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n >= 0:
                    self._index[tuple(tokens[end - n : end])] = end
        self._indexed = max(self._indexed, len(tokens) - 1)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            follow = self._index.get(tuple(tokens[-n:]))
            if follow is not None:
                return tokens[follow : follow + self.num_draft]
        return []


@dataclass
class ProfitabilityGate:
    """Stops drafting while drafts keep being rejected: after a draft with nothing
    accepted, skip drafting for a cool-down that doubles each time (up to `max_cooldown`
    steps), then probe again; any accepted token resets it."""

    max_cooldown: int = 32
    cooldown: int = 0
    waiting: int = 0

    def should_draft(self) -> bool:
        if self.waiting > 0:
            self.waiting -= 1
            return False
        return True

    def record(self, accepted: int) -> None:
        if accepted > 0:
            self.cooldown = 0
        else:
            self.cooldown = min(max(1, 2 * self.cooldown), self.max_cooldown)
            self.waiting = self.cooldown


@dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa's typical acceptance, an opt-in approximation for sampled decoding: a draft
    token is kept when its probability exceeds min(epsilon, delta * exp(-entropy)) of the
    model's distribution there, instead of by the rejection rule. Faster (more accepted),
    but the output no longer follows the model's distribution exactly."""

    epsilon: float = 0.09
    delta: float = 0.3


def accept(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    typical: TypicalAcceptance | None = None,
) -> tuple[int, torch.Tensor]:
    """Verify `drafts` (batch, k) against `logits` (batch, k + 1, vocab) of the forward
    that fed the last token plus the drafts. Returns the number of draft tokens every row
    accepted, `a`, and each row's token for position `a` (its own next token there)."""
    batch, k = drafts.shape
    if not params.do_sample:
        predicted = logits.argmax(-1)
        agree = (predicted[:, :k] == drafts).long().cumprod(-1).sum(-1)
        accepted = int(agree.min())
        return accepted, predicted[:, accepted]
    probs = filtered_logits(logits, params).softmax(-1)
    draft_probs = probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    if typical is not None:
        entropy = -(probs[:, :k] * probs[:, :k].clamp_min(1e-12).log()).sum(-1)
        threshold = torch.minimum(torch.full_like(entropy, typical.epsilon), typical.delta * torch.exp(-entropy))
        accepted = int((draft_probs > threshold).long().cumprod(-1).sum(-1).min())
        return accepted, torch.multinomial(probs[:, accepted], 1, generator=generator).squeeze(-1)
    uniform = torch.rand(batch, k, generator=generator)
    row_accepts = (uniform < draft_probs).long().cumprod(-1).sum(-1)
    accepted = int(row_accepts.min())
    tokens = torch.empty(batch, dtype=torch.long)
    for row in range(batch):
        if row_accepts[row] > accepted:  # this row accepted the draft here too: it is a valid sample
            tokens[row] = drafts[row, accepted]
            continue
        distribution = probs[row, accepted].clone()
        if accepted < k:  # rejected draft: sample from the rest of the distribution
            distribution[drafts[row, accepted]] = 0.0
            distribution = distribution / distribution.sum()
        tokens[row] = torch.multinomial(distribution, 1, generator=generator)[0]
    return accepted, tokens


@dataclass
class TokenTree:
    """Draft candidates as a tree below the last accepted token (node 0, the root):
    `parents[i]` is node i's parent, `tokens[i]` its token, `depths[i]` its distance from
    the root; nodes are in breadth-first order, so parents come first."""

    parents: list[int]
    tokens: torch.Tensor
    depths: torch.Tensor

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root down to `node`."""
        path = [node]
        while path[-1] != 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def mask(self) -> torch.Tensor:
        """(n, n): node i may see node j when j is i or an ancestor of i."""
        size = len(self.parents)
        allowed = torch.eye(size, dtype=torch.bool)
        for node in range(1, size):
            allowed[node] |= allowed[self.parents[node]]
        return allowed


Children = Callable[[int, torch.Tensor, int], torch.Tensor]


def build_tree(root_token: int, widths: list[int], children: Children) -> TokenTree:
    """A tree whose depth-d level holds, under every node of level d-1, `widths[d-1]`
    candidates: `children(d, parent_tokens, width)` gives them as (parents, width) tokens,
    best first — the same top-k of head d-1 under every parent for Medusa heads, which
    guess from the root alone, a top-k per parent for Hydra heads, which read the parent."""
    parents, tokens, depths, level = [-1], [root_token], [0], [0]
    for depth, width in enumerate(widths, start=1):
        candidates = children(depth, torch.tensor([tokens[node] for node in level]), width).tolist()
        next_level = []
        for parent, row in zip(level, candidates):
            for token in row:
                parents.append(parent)
                tokens.append(token)
                depths.append(depth)
                next_level.append(len(tokens) - 1)
        level = next_level
    return TokenTree(parents, torch.tensor(tokens), torch.tensor(depths))


def medusa_children(guesses: torch.Tensor) -> Children:
    """Children for heads that guess from the root only (`guesses`: (heads, vocab) logits)."""
    return lambda depth, parents, width: guesses[depth - 1].topk(width).indices.expand(len(parents), -1)


def accept_tree(logits: torch.Tensor, tree: TokenTree) -> tuple[list[int], int]:
    """Greedy verification of a tree from its forward's logits (n, vocab): the deepest
    path of nodes each equal to the model's choice after its parent, and the model's own
    next token after that path. Returns the path's node indices (root first)."""
    predicted = logits.argmax(-1).tolist()
    accepted = [True] + [False] * (len(tree.parents) - 1)
    best = 0
    for node in range(1, len(tree.parents)):
        parent = tree.parents[node]
        accepted[node] = accepted[parent] and int(tree.tokens[node]) == predicted[parent]
        if accepted[node] and tree.depths[node] > tree.depths[best]:
            best = node
    return tree.path_to(best), predicted[best]


def compact_cache(buffers: list, start: int, path: list[int]) -> None:
    """Move the keys and values of the accepted path's nodes (written at slots
    `start + node`) to consecutive slots `start + depth`, as if only the path had been fed."""
    for depth, node in enumerate(path):
        if node == depth:
            continue
        for buffer in buffers:
            if buffer is None:
                continue
            for tensor in buffer:
                tensor[:, :, start + depth] = tensor[:, :, start + node]
