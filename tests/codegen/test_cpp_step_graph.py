"""The compiled step's attention as plain aten (`codegen/cpp/step_graph.py`), checked eagerly
against a reference attention over the same cache slots: the products written as reductions
(decode and verify buckets) give what `matmul` gives."""

import math

import pytest
import torch

from lmforge.codegen.cpp.step_graph import _products_as_loops, cached_attention


def test_products_as_loops_equal_matmul():
    a, b = torch.randn(2, 4, 6, 32), torch.randn(2, 4, 32, 50)
    torch.testing.assert_close(_products_as_loops(a, b), a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 4])
def test_cached_attention_writes_the_cache_and_attends_causally(tokens):
    torch.manual_seed(0)
    batch, heads, kv_heads, head_dim, start, slots = 2, 4, 2, 8, 5, 16
    q = torch.randn(batch, heads, tokens, head_dim)
    k, v = torch.randn(batch, kv_heads, tokens, head_dim), torch.randn(batch, kv_heads, tokens, head_dim)
    key_cache, value_cache = torch.randn(batch, kv_heads, slots, head_dim), torch.randn(batch, kv_heads, slots, head_dim)
    pad = torch.tensor([0, 2])
    write_slots, key_slots = torch.arange(start, start + tokens), torch.arange(start + tokens)
    out = cached_attention(q, k, v, key_cache, value_cache, write_slots, key_slots, pad, 1 / math.sqrt(head_dim), 0, 0.0)
    torch.testing.assert_close(key_cache[:, :, start:start + tokens], k)
    torch.testing.assert_close(value_cache[:, :, start:start + tokens], v)
    keys = key_cache[:, :, :start + tokens].repeat_interleave(heads // kv_heads, dim=1)
    values = value_cache[:, :, :start + tokens].repeat_interleave(heads // kv_heads, dim=1)
    slot, query = key_slots[None, None, :], write_slots[None, :, None]
    allowed = ((slot <= query) & (slot >= pad[:, None, None]))[:, None]  # (B, 1, T, S)
    scores = (q @ keys.transpose(2, 3) / math.sqrt(head_dim)).masked_fill(~allowed, -math.inf)
    expected = (torch.softmax(scores, -1) @ values).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
