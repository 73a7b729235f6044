"""`ffn_skip_gate` on the `aten` backend: the host-side decision `torch.cond` branches on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.compiler.ops import current_context


def aten_ffn_skip_gate(
    before: torch.Tensor, after: torch.Tensor, threshold: float, warmup: int, layer: int
) -> torch.Tensor:
    """Whether `layer` may skip its FFN for this forward: only when decoding one token
    per row with a cache, after `warmup` decode steps, and when the residual stream of
    every row barely turned across the previous FFN (cosine of its input and output at
    the last position >= `threshold`). Prefill, verification of several tokens and
    cache-free forwards always compute every FFN, so skipping is a decode-time decision."""
    context = current_context()
    if context.kv is None or context.q_len != 1 or context.generated < warmup:
        return torch.tensor(False)  # a host-side predicate: `torch.cond` branches on it in Python
    cosine = F.cosine_similarity(before[:, -1].float(), after[:, -1].float(), dim=-1)
    skip = bool((cosine >= threshold).all())
    if skip and context.skip_counts is not None:
        context.skip_counts[layer] = context.skip_counts.get(layer, 0) + 1
    return torch.tensor(skip)
