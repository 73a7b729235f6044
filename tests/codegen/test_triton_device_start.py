"""The attention kernels with their start read on the device, as a step replayed from a CUDA
graph runs them: the position comes from a tensor (the forward's cache slots), decode
launches the split count of a full cache whatever the length (splits past the length are
empty and the combine stage gives them no weight), and the results are the reference
attention's. Through Triton's interpreter on the CPU (`TRITON_INTERPRET=1`, set by
conftest.py before Triton is imported), so shapes stay small."""

import pytest
import torch

from lmforge.codegen.aten.attention import attention_reference
from lmforge.codegen.triton import decode_attention as decode_module
from lmforge.codegen.triton.decode_attention import decode_attention
from lmforge.codegen.triton.prefill_attention import prefill_attention
from lmforge.compiler.ops import AttentionContext

BATCH, HEADS, KV_HEADS, HEAD_DIM, SLOTS = 2, 4, 1, 32, 1024
SCALE = HEAD_DIM**-0.5
PAD = torch.tensor([0, 3])


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference_decode(q, keys, values, position, window, softcap):
    mask = AttentionContext(kv=None, start=position, q_len=1, pad=PAD).mask(window)
    length = position + 1
    return attention_reference(q, keys[:, :, :length], values[:, :, :length], mask, SCALE, softcap)


@pytest.mark.parametrize("length, window, softcap", [(1, 0, 0.0), (63, 0, 30.0), (65, 0, 0.0), (65, 16, 0.0)])
def test_fixed_split_decode_reads_its_position_from_a_tensor(length, window, softcap):
    assert decode_module._split_count(BATCH * KV_HEADS, SLOTS) == 4  # the grid of every captured step
    q = _random(BATCH, HEADS, 1, HEAD_DIM, seed=0)
    keys, values = _random(BATCH, KV_HEADS, SLOTS, HEAD_DIM, seed=1), _random(BATCH, KV_HEADS, SLOTS, HEAD_DIM, seed=2)
    new_keys, new_values = _random(BATCH, KV_HEADS, 1, HEAD_DIM, seed=3), _random(BATCH, KV_HEADS, 1, HEAD_DIM, seed=4)
    written_keys, written_values = keys.clone(), values.clone()
    written_keys[:, :, length - 1], written_values[:, :, length - 1] = new_keys[:, :, 0], new_values[:, :, 0]
    expected = _reference_decode(q, written_keys, written_values, length - 1, window, softcap)
    for position in (torch.tensor([length - 1]), length - 1):  # on the device (fixed splits), then eager
        key_cache, value_cache = keys.clone(), values.clone()
        out = decode_attention(q, key_cache, value_cache, position, SCALE, window, softcap, pad=PAD.int(),
                               new_keys=new_keys, new_values=new_values)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(key_cache, written_keys) and torch.equal(value_cache, written_values)


def test_a_replayed_decode_launch_follows_the_position_tensor():
    """The same launch arguments over consecutive steps, only the tensor's value changing
    in place: what a graph replay does."""
    key_cache = _random(BATCH, KV_HEADS, SLOTS, HEAD_DIM, seed=5)
    value_cache = _random(BATCH, KV_HEADS, SLOTS, HEAD_DIM, seed=6)
    position = torch.zeros(3, dtype=torch.long)  # a verify step's slots; the kernel reads the first
    q = _random(BATCH, HEADS, 1, HEAD_DIM, seed=7)
    for step in (62, 63, 64):
        position.copy_(torch.arange(step, step + 3))
        out = decode_attention(q, key_cache, value_cache, position, SCALE, pad=PAD.int())
        torch.testing.assert_close(out, _reference_decode(q, key_cache, value_cache, step, 0, 0.0),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tree", [False, True])
def test_prefill_with_its_start_on_the_device_equals_the_launch_argument(tree):
    q_len, start, slots = 4, 60, 128
    q = _random(BATCH, HEADS, q_len, HEAD_DIM, seed=8)
    keys, values = _random(BATCH, KV_HEADS, slots, HEAD_DIM, seed=9), _random(BATCH, KV_HEADS, slots, HEAD_DIM, seed=10)
    new_keys = _random(BATCH, KV_HEADS, q_len, HEAD_DIM, seed=11)
    new_values = _random(BATCH, KV_HEADS, q_len, HEAD_DIM, seed=12)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool) if tree else None
    results = []
    for first in (start, torch.arange(start, start + q_len)):
        key_cache, value_cache = keys.clone(), values.clone()
        out = prefill_attention(q, key_cache, value_cache, first, SCALE, pad=PAD.int(), tree=mask,
                                new_keys=new_keys, new_values=new_values)
        results.append((out, key_cache, value_cache))
    for eager, on_device in zip(*results):
        assert torch.equal(eager, on_device)
