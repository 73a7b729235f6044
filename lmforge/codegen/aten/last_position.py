"""`last_position` on the `aten` backend: the LM head's input rows, with the gradient that
passes training through it need."""

from __future__ import annotations

import torch

from lmforge.compiler.ops import current_context


def aten_last_position(hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's input: only the last position when the forward asks for `last_only`
    (as Hugging Face's `logits_to_keep=1` in a prefill), the rows a paged step samples from
    (`PagedRows.logit_rows`), else every position."""
    context = current_context()
    if context.paged is not None and context.paged.logit_rows is not None:
        return hidden[:, context.paged.logit_rows]
    return hidden[:, -1:].clone() if context.last_only else hidden.clone()


def _last_position_setup_context(ctx, inputs, output) -> None:
    ctx.shape, ctx.last_only = inputs[0].shape, current_context().last_only


def _last_position_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    if not ctx.last_only:
        return grad
    full = grad.new_zeros(ctx.shape)
    full[:, -1:] = grad
    return full


torch.library.register_autograd(
    "lmforge::last_position", _last_position_backward, setup_context=_last_position_setup_context
)
