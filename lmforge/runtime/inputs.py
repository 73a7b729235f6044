"""Checks on what callers hand the runtime, so bad input fails with one `LmforgeError`
naming the problem instead of an IndexError deep inside an embedding lookup or a
RuntimeError from `torch.multinomial` — and before any cache slot is written, so the
model keeps working after the error."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from lmforge.errors import LmforgeError


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` name the same device when one of them leaves the index open."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_token_ids(input_ids: object, vocab_size: int | None, device: torch.device) -> torch.Tensor:
    """`input_ids` as a (batch, length) int64 tensor, or an error saying what is wrong."""
    if not isinstance(input_ids, torch.Tensor):
        raise LmforgeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise LmforgeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise LmforgeError(f"input_ids must be (batch >= 1, length >= 1), got shape {tuple(input_ids.shape)}")
    if not same_device(input_ids.device, device):
        raise LmforgeError(f"input_ids are on {input_ids.device} but the model runs on {device}")
    if vocab_size is not None:
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(outside.any()):
            row, column = (int(i) for i in outside.nonzero()[0])
            raise LmforgeError(f"token id {int(input_ids[row, column])} at row {row}, position {column} is outside "
                               f"the vocabulary (ids 0..{vocab_size - 1})")
    return input_ids.long()


def check_attention_mask(attention_mask: object, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The mask as int64 0/1 of `input_ids`' shape with a real token in every row, or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise LmforgeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise LmforgeError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                           f"{tuple(input_ids.shape)}")
    if not same_device(attention_mask.device, input_ids.device):
        raise LmforgeError(f"attention_mask is on {attention_mask.device} but input_ids are on {input_ids.device}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise LmforgeError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = (attention_mask == 0).all(dim=1)
    if bool(empty.any()):
        raise LmforgeError(f"row {int(empty.nonzero()[0])} of attention_mask is all padding; every row needs a "
                           "real token")
    return attention_mask.long()


def check_max_new_tokens(max_new_tokens: object) -> int:
    """At least one new token, as Hugging Face `generate` requires (it rejects 0 too)."""
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})")
    return int(max_new_tokens)


def check_eos_token_ids(eos_token_id: object) -> list[int] | None:
    """None (the model's own), or the end-of-sequence ids as a list of ints."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if is_integer(eos_token_id) else eos_token_id
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(is_integer(i) for i in ids):
        raise LmforgeError(f"eos_token_id must be an int or a list of ints (got {eos_token_id!r})")
    return [int(i) for i in ids]


def check_stop_strings(stop_strings: object) -> list[str] | None:
    """A list of non-empty strings (one string alone is accepted, as Hugging Face does)."""
    if not stop_strings:
        return None
    strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(strings, Sequence) or not all(isinstance(s, str) and s for s in strings):
        raise LmforgeError(f"stop_strings must be non-empty strings (got {stop_strings!r})")
    return list(strings)
