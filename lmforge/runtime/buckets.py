"""Prompt-length buckets: the runtime feeds the program a small, fixed set of shapes.

Why. Resident memory grew with every `generate` call whose prompt had a length not seen
before (ref-llama-py, prompts of 16–115 tokens at batches of 1–3: 0.79 → 3.0 GB in 200
calls). Python's heap did not grow (tracemalloc: flat), `malloc_trim` gave almost nothing
back, and a fixed prompt shape did not grow at all: the growth is live native memory keyed
by shape. The packed linear layers (`mkldnn::_linear_pointwise`, codegen's default) build a
oneDNN primitive per input shape, and two caches keep every one: oneDNN's primitive cache
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) and ideep's computation cache (`LRU_CACHE_CAPACITY`),
1024 entries each, each entry holding buffers that scale with the rows it multiplies.
Measured on one 704×256 packed weight fed 399 different row counts: +232 MB of live
`malloc` memory, about half in each cache (+114 MB with the oneDNN cache off, +1 MB with
both off), stable when the same shapes come again. A prefill multiplies batch × prompt
length rows, so every new prompt length added entries for each weight shape of the model.

The fix at the source: a prefill (and a cache-free forward) is left-padded to a bucket
length, so the program only ever sees about four prompt lengths per doubling (16, 32, 48,
…, 112, 128, 160, 192, …). Padding is the runtime's ordinary left padding (masked keys,
positions counted from the first real token), so results are unchanged up to float
rounding; the cost is at most a quarter more prefill rows (fewer for long prompts). Decode
and verification forwards already have bounded shapes (batch × (1 + drafts)).
"""

from __future__ import annotations

import torch

MIN_BUCKET = 16


def bucket_length(length: int) -> int:
    """The smallest bucket >= `length`: multiples of 16 up to 128, then four per doubling."""
    step = max(MIN_BUCKET, 1 << max(0, (length - 1).bit_length() - 3))
    return -(-length // step) * step


def pad_to_bucket(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """`input_ids` and its mask left-padded to the bucket of its length, at most to
    `limit` columns; returns them and the number of columns added (0: unchanged)."""
    length = input_ids.shape[1]
    target = bucket_length(length) if limit is None else min(bucket_length(length), max(limit, length))
    added = target - length
    if added == 0:
        return input_ids, attention_mask, 0
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    ids = torch.cat([input_ids.new_full((input_ids.shape[0], added), pad_token_id), input_ids], dim=1)
    return ids, torch.cat([mask.new_zeros((mask.shape[0], added)), mask], dim=1), added
