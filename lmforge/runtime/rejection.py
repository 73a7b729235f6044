"""Speculative sampling with drafts that were themselves sampled (the EAGLE drafter's chain
when decoding samples).

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
