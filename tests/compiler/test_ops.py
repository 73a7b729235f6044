"""The attention op: fake and real agree, masks are right, a missing context is explained."""

import pytest
import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.compiler.ops import AttentionContext, attention, attention_context
from lmforge.errors import LmforgeError


def _qkv(batch=2, q_len=5, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, q_len, dim, generator=g),
        torch.randn(batch, kv_heads, q_len, dim, generator=g),
        torch.randn(batch, kv_heads, q_len, dim, generator=g),
    )


def test_fake_and_real_shapes_agree():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv()
    with attention_context(AttentionContext(kv=None, start=0, q_len=5)):
        real = attention(q, k, v, 0, 0.3, 0, 0.0)
    with FakeTensorMode() as mode:
        fake = attention(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), 0, 0.3, 0, 0.0)
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()


def test_missing_context_explains_how_to_set_it():
    q, k, v = _qkv()
    with pytest.raises(LmforgeError, match="outside a forward context.*attention_context"):
        attention(q, k, v, 0, 0.3, 0, 0.0)


def _dense(q, k, v, allowed, scale, softcap=0.0):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = q @ k.transpose(2, 3) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_window_padding_and_softcap_match_a_dense_reference(window, softcap):
    q, k, v = _qkv(q_len=7)
    pad = torch.tensor([0, 2])
    ctx = AttentionContext(kv=None, start=0, q_len=7, pad=pad)
    out = attention_reference(q, k, v, ctx.mask(window), 0.4, softcap)
    i = torch.arange(7)[:, None]
    j = torch.arange(7)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    allowed = allowed[None, None] & (j >= pad[:, None, None, None])
    torch.testing.assert_close(out[0], _dense(q, k, v, allowed, 0.4, softcap)[0])
    # padded row: real queries (slots 2..6) see only real keys
    torch.testing.assert_close(out[1, :, 2:], _dense(q, k, v, allowed | (i == j), 0.4, softcap)[1, :, 2:])
    assert torch.isfinite(out).all()


def test_op_writes_the_cache_at_start():
    q, k, v = _qkv(batch=1, q_len=1)
    cache = [(torch.zeros(1, 2, 10, 8), torch.zeros(1, 2, 10, 8))]
    with attention_context(AttentionContext(kv=cache, start=4, q_len=1)):
        attention(q, k, v, 0, 0.3, 0, 0.0)
    assert torch.equal(cache[0][0][:, :, 4:5], k) and cache[0][0][:, :, 5:].abs().sum() == 0
