"""Next-token selection: greedy, or sampling with temperature, top-k and top-p.

The filters are applied in Hugging Face's order (temperature, top-k, top-p) so that the
same settings mean the same distribution in both.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.runtime.inputs import is_integer


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Every setting is checked whether or not it is used, so a NaN or a typo is caught
        before it reaches `torch.multinomial`; temperature 0 is refused only when sampling
        (greedy ignores it, as Hugging Face does)."""
        if not isinstance(self.do_sample, bool):
            raise LmforgeError(f"do_sample must be True or False (got {self.do_sample!r})")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise LmforgeError(f"temperature must be a finite number > 0 (got {self.temperature!r})")
        if self.temperature == 0 and self.do_sample:
            raise LmforgeError("temperature must be > 0 when sampling (got 0); use do_sample=False for greedy")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise LmforgeError(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if self.seed is not None and not is_integer(self.seed):
            raise LmforgeError(f"seed must be an integer or None (got {self.seed!r})")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits with temperature applied and tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def select_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of `(batch, vocab)` logits."""
    if not params.do_sample:
        return logits.argmax(-1)
    probs = filtered_logits(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
