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
    it. The index of n-gram → last start position is updated incrementally.

    With `scale_by_match`, a match of n tokens proposes `ceil(num_draft * n / max_ngram)`
    tokens: on ref-llama-py's held-out code a 3-token match is followed by ~4 correct tokens
    on average, a 1-token match by ~1 (70 % of them by none), and every drafted token
    costs a row in the verify forward."""

    max_ngram: int = 3
    min_ngram: int = 1
    num_draft: int = 8
    scale_by_match: bool = False  # the pass defaults to True; artifacts saved before the option keep fixed drafts
    _index: dict[tuple, int] = field(default_factory=dict)
    _indexed: int = 0
    matched: int = 0  # n of the n-gram the last proposal matched (0: none), so a caller can ask for long matches

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
                length = -(-self.num_draft * n // self.max_ngram) if self.scale_by_match else self.num_draft
                self.matched = n
                return tokens[follow : follow + length]
        self.matched = 0
        return []


@dataclass
class ProfitabilityGate:
    """Stops drafting while drafts lose time. Each verified draft adds its accepted tokens
    (each saves a forward) minus `row_cost` per drafted token (the extra verify work, as a
    fraction of a one-token forward) to a balance that decays by `decay` per draft. When
    the balance falls below -`tolerance` (that much of a forward lost recently), drafting
    pauses for a cool-down that doubles each time (up to `max_cooldown` steps); the probe
    after it starts from that threshold, so a probe that misses pauses again at once and
    one that pays resumes drafting. Recent wins thus carry a run of cheap misses, while a
    source that keeps missing is switched off."""

    row_cost: float = 0.05
    decay: float = 0.9
    tolerance: float = 1.0
    max_cooldown: int = 32
    cooldown: int = 0
    waiting: int = 0
    balance: float = 0.0

    def should_draft(self) -> bool:
        if self.waiting > 0:
            self.waiting -= 1
            return False
        return True

    def record(self, accepted: int, drafted: int) -> None:
        self.balance = self.decay * self.balance + accepted - self.row_cost * drafted
        if self.balance >= 0:
            self.cooldown = 0
        elif self.balance < -self.tolerance:
            self.cooldown = min(max(1, 2 * self.cooldown), self.max_cooldown)
            self.waiting, self.balance = self.cooldown, -self.tolerance / self.decay


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
    uniform = torch.rand(batch, k, generator=generator, device=logits.device)
    row_accepts = (uniform < draft_probs).long().cumprod(-1).sum(-1)
    accepted = int(row_accepts.min())
    tokens = torch.empty(batch, dtype=torch.long, device=logits.device)
    for row, row_accepted in enumerate(row_accepts.tolist()):
        if row_accepted > accepted:  # this row accepted the draft here too: it is a valid sample
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
    """Draft candidates as a tree below the last accepted token (node 0, the root), one
    tree per batch row with the same shape: `parents[i]` is node i's parent, `depths[i]`
    its distance from the root, `tokens[row, i]` its token in that row; nodes are in
    breadth-first order, so parents come first."""

    parents: list[int]
    tokens: torch.Tensor  # (batch, nodes)
    depths: torch.Tensor

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root down to `node`."""
        path = [node]
        while path[-1] != 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def mask(self) -> torch.Tensor:
        """(n, n), on the tokens' device: node i may see node j when j is i or an ancestor of i.
        Built on the host from `parents` (a few rows) and copied over once."""
        size = len(self.parents)
        allowed = torch.eye(size, dtype=torch.bool)
        for node in range(1, size):
            allowed[node] |= allowed[self.parents[node]]
        return allowed.to(self.tokens.device)


Children = Callable[[int, torch.Tensor, int], torch.Tensor]


def build_tree(roots: torch.Tensor, widths: list[int], children: Children) -> TokenTree:
    """Trees below `roots` (B,) whose depth-d level holds, under every node of level d-1,
    `widths[d-1]` candidates: `children(d, parent_tokens, width)` maps (B, m) parent tokens
    to (B, m, width) tokens, best first — the same top-k of head d-1 under every parent for
    Medusa heads, which guess from the root alone, a top-k per parent for Hydra heads, which
    read the parent."""
    parents, depths, level = [-1], [0], [0]
    columns = [roots]
    for depth, width in enumerate(widths, start=1):
        candidates = children(depth, torch.stack([columns[node] for node in level], dim=1), width)
        next_level = []
        for index, parent in enumerate(level):
            for rank in range(width):
                parents.append(parent)
                depths.append(depth)
                columns.append(candidates[:, index, rank])
                next_level.append(len(columns) - 1)
        level = next_level
    return TokenTree(parents, torch.stack(columns, dim=1), torch.tensor(depths, device=roots.device))


def medusa_children(guesses: torch.Tensor) -> Children:
    """Children for heads that guess from the root only (`guesses`: (B, heads, vocab) logits)."""
    def top(depth: int, parents: torch.Tensor, width: int) -> torch.Tensor:
        return guesses[:, depth - 1].topk(width).indices[:, None].expand(-1, parents.shape[1], -1)
    return top


def accept_tree(logits: torch.Tensor, tree: TokenTree) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy verification of the trees from their forward's logits (B, n, vocab): per row
    the deepest path of nodes each equal to the model's choice after its parent, cut to the
    shortest row's depth so the rows stay aligned. Returns the paths (root first, equal
    length) and each row's next token: the model's own choice after its cut path."""
    predicted = logits.argmax(-1)
    depths = tree.depths.tolist()  # the walk is a host decision: copy what it reads once, not per node
    paths = []
    for choices, tokens in zip(predicted.tolist(), tree.tokens.tolist()):
        accepted = [True] + [False] * (len(tree.parents) - 1)
        best = 0
        for node in range(1, len(tree.parents)):
            parent = tree.parents[node]
            accepted[node] = accepted[parent] and tokens[node] == choices[parent]
            if accepted[node] and depths[node] > depths[best]:
                best = node
        paths.append(tree.path_to(best))
    depth = min(len(path) for path in paths)
    paths = [path[:depth] for path in paths]
    last = torch.tensor([path[-1] for path in paths], device=predicted.device)
    return paths, predicted[torch.arange(len(paths), device=predicted.device), last]


def compact_cache(buffers: list, start: int, paths: list[list[int]]) -> None:
    """Move each row's accepted path's keys and values (written at slots `start + node`) to
    consecutive slots `start + depth`, as if only the path had been fed."""
    if all(path == list(range(len(path))) for path in paths):
        return
    for buffer in buffers:
        if buffer is None:
            continue
        nodes = torch.tensor(paths, device=buffer[0].device)
        for tensor in buffer:
            index = (start + nodes)[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            tensor[:, :, start : start + nodes.shape[1]] = tensor.gather(2, index)
