"""The `aten` backend's sparse attention kernels (block-sparse prefill, streaming heads over
a ring cache) against dense references under the same masks."""

import pytest
import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.codegen.aten.sparse import block_sparse_attention
from lmforge.compiler.kv_layout import RingSlot
from lmforge.compiler.ops import AttentionContext, attention_context, streaming_attention
from lmforge.compiler.sparse_patterns import (
    PATTERNS,
    causal_blocks,
    first_real_slot,
    pattern_blocks,
    streaming_allowed,
)

SCALE = 0.25


def _inputs(length=300, batch=2, heads=4, kv_heads=2, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k = torch.randn(batch, kv_heads, length, dim, generator=generator)
    v = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return q, k, v


def _causal_mask(length, pad):
    slots = torch.arange(length)
    allowed = (slots[None] <= slots[:, None])[None, None] & (slots.view(1, 1, 1, -1) >= first_real_slot(pad))
    return allowed | (slots[None] == slots[:, None])


def _token_mask(blocks, block, length):
    return blocks.repeat_interleave(block, -1).repeat_interleave(block, -2)[..., :length, :length]


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("pad", [None, torch.tensor([0, 7])])
def test_block_sparse_with_every_block_equals_dense(softcap, pad):
    q, k, v = _inputs()
    expected = attention_reference(q, k, v, _causal_mask(300, pad), SCALE, softcap)
    got = block_sparse_attention(q, k, v, causal_blocks(300, 32), 32, SCALE, softcap, pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad", [None, torch.tensor([3, 0])])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_block_sparse_pattern_equals_dense_under_the_same_mask(pattern, pad):
    q, k, v = _inputs(length=640)
    selected = pattern_blocks([PATTERNS.index(pattern)] * 4, q, k.repeat_interleave(2, 1), 64, 3, SCALE)
    assert 0.2 < selected.float().mean() < 0.6  # it really leaves blocks out
    mask = _token_mask(selected, 64, 640) & _causal_mask(640, pad)
    expected = attention_reference(q, k, v, mask, SCALE, 0.0)
    torch.testing.assert_close(block_sparse_attention(q, k, v, selected, 64, SCALE, 0.0, pad), expected, atol=1e-5, rtol=1e-5)


def _streaming_reference(q, k, v, pad, sink, window):
    slots = torch.arange(q.shape[2])
    allowed = streaming_allowed(slots.view(1, 1, -1, 1), slots.view(1, 1, 1, -1), first_real_slot(pad), sink, window)
    return attention_reference(q, k, v, allowed, SCALE, 0.0)


@pytest.mark.parametrize("pad", [None, torch.tensor([0, 70])])
@pytest.mark.parametrize("length", [100, 700])  # dense path, block-sparse path
def test_streaming_attention_equals_dense_masked_to_sinks_and_window(length, pad):
    q, k, v = _inputs(length=length)
    with attention_context(AttentionContext(kv=None, start=0, q_len=length, pad=pad)):
        got = streaming_attention(q, k, v, 0, 4, 64, SCALE, 0.0).transpose(1, 2)
    torch.testing.assert_close(got, _streaming_reference(q, k, v, pad, 4, 64), atol=1e-5, rtol=1e-5)
    if pad is not None:  # the mask itself: a late query sees the row's first 4 real tokens and its last 64
        slots = torch.arange(length)
        row = streaming_allowed(slots.view(1, 1, -1, 1), slots.view(1, 1, 1, -1), first_real_slot(pad), 4, 64)[1, 0, -1]
        expected = sorted({70, 71, 72, 73} | set(range(max(70, length - 64), length)))
        assert row.nonzero().flatten().tolist() == expected


def test_ring_cache_decoding_equals_recomputation_and_keeps_its_size():
    sink, window, slack = 4, 32, 4
    q, k, v = _inputs(length=40 + 3 * window)
    pad = torch.tensor([5, 0])
    ring = RingSlot.allocate(2, 2, 16, sink, window, sink + window + slack, torch.float32)
    size = ring.nbytes()
    outputs, start = [], 0
    for length in [40] + [1, 3, 2, 5] * 100:  # a prefill, then single tokens and verification chunks
        length = min(length, q.shape[2] - start)
        if length == 0:
            break
        chunk = slice(start, start + length)
        with attention_context(AttentionContext(kv=[ring], start=start, q_len=length, pad=pad)):
            outputs.append(streaming_attention(q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], 0, sink, window, SCALE,
                                               0.0).transpose(1, 2))
        start += length
        assert ring.nbytes() == size and ring.keys.shape[2] == sink + window + slack
    expected = _streaming_reference(q, k, v, pad, sink, window)
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, atol=1e-5, rtol=1e-5)


def test_ring_refuses_a_forward_longer_than_its_slack():
    ring = RingSlot.allocate(1, 1, 8, 2, 16, 2 + 16 + 3, torch.float32)
    ring.write(torch.zeros(1, 1, 30, 8), torch.zeros(1, 1, 30, 8), 0, None)
    with pytest.raises(Exception, match="slack"):
        ring.write(torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 5, 8), 30, None)
