"""The paged KV cache: the attention kernel's paged path against its dense path on random
block layouts, the block allocator and its prefix cache, and which programs may be paged."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from torch import fx

from lmforge.compiler.ops import AttentionContext, attention, attention_context, streaming_attention
from lmforge.errors import LmforgeError
from lmforge.runtime.paged import (
    BlockAllocator,
    BlockTable,
    PagedKVCache,
    block_key,
    block_keys,
    paged_rows,
    paging_unsupported_reason,
)

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4
LAYOUT = [{"layer": 0, "cache": 0, "kv_heads": KV_HEADS, "head_dim": DIM}]


def _dense(q, k, v, cached_k, cached_v, start, window, softcap):
    """One request through the dense kernel: its first `start` keys already cached."""
    cache = (torch.zeros(1, KV_HEADS, 32, DIM), torch.zeros(1, KV_HEADS, 32, DIM))
    cache[0][:, :, :start], cache[1][:, :, :start] = cached_k, cached_v
    with attention_context(AttentionContext(kv=[cache], start=start, q_len=q.shape[2])):
        return attention(q, k, v, 0, DIM ** -0.5, window, softcap)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (5, 0.0), (0, 30.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_attention_equals_dense_on_random_block_layouts(seed, window, softcap):
    """Three requests (start, new tokens): a decode token, a prefill from 0 across block
    boundaries, a chunk after a cached prefix ending on a block boundary; their blocks are
    scattered over the pool in a random order, with GQA (4 query heads, 2 KV heads)."""
    generator = torch.Generator().manual_seed(seed)
    pieces = [(9, 1), (0, 11), (8, 5)]
    cache = PagedKVCache(LAYOUT, 16, BLOCK, torch.float32, torch.device("cpu"))
    order = torch.randperm(16, generator=generator).tolist()
    tables, qs, ks, vs, expected = [], [], [], [], []
    for start, count in pieces:
        end = start + count
        table = BlockTable([order.pop() for _ in range(-(-end // BLOCK))])
        keys, values = torch.randn(2, 1, KV_HEADS, end, DIM, generator=generator)
        slots = torch.tensor(table.slots(0, start, BLOCK), dtype=torch.long)
        cache.pools[0][0][:, :, slots], cache.pools[0][1][:, :, slots] = keys[:, :, :start], values[:, :, :start]
        q = torch.randn(1, HEADS, count, DIM, generator=generator)
        new_k, new_v = keys[:, :, start:], values[:, :, start:]
        expected.append(_dense(q, new_k, new_v, keys[:, :, :start], values[:, :, :start], start, window, softcap))
        tables.append(table)
        qs.append(q), ks.append(new_k), vs.append(new_v)
    rows = paged_rows([(t, s, c) for t, (s, c) in zip(tables, pieces)], BLOCK, torch.device("cpu"))
    context = AttentionContext(kv=cache.pools, start=0, q_len=sum(c for _, c in pieces), paged=rows)
    with attention_context(context):
        out = attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2), 0, DIM ** -0.5, window, softcap)
    torch.testing.assert_close(out, torch.cat(expected, 1), rtol=1e-5, atol=1e-5)
    written = cache.pools[0][0][:, :, torch.tensor(tables[1].slots(0, 11, BLOCK))]
    torch.testing.assert_close(written, ks[1])  # the prefill's keys landed in its scattered blocks


def test_the_paged_path_refuses_a_draft_tree():
    cache = PagedKVCache(LAYOUT, 2, BLOCK, torch.float32, torch.device("cpu"))
    table = BlockTable([1])
    rows = paged_rows([(table, 0, 2)], BLOCK, torch.device("cpu"))
    context = AttentionContext(kv=cache.pools, start=0, q_len=2, paged=rows, tree=torch.ones(2, 2, dtype=torch.bool))
    q, k = torch.randn(1, HEADS, 2, DIM), torch.randn(1, KV_HEADS, 2, DIM)
    with attention_context(context), pytest.raises(LmforgeError, match="paged cache"):
        torch.ops.lmforge.tree_attention(q, k, k, 0, 1.0, 0, 0.0)


def test_allocator_hands_out_all_or_nothing_and_takes_blocks_back():
    allocator = BlockAllocator(4)
    first = allocator.allocate(3)
    assert sorted(first) == [0, 1, 2] and allocator.free == 1
    assert allocator.allocate(2) is None and allocator.free == 1
    allocator.release(first)
    assert allocator.free == 4 and sorted(allocator.allocate(4)) == [0, 1, 2, 3]
    with pytest.raises(LmforgeError, match="released more often"):
        BlockAllocator(2).release([0])


def test_cache_reserves_blocks_as_a_table_grows_and_releases_them_at_once():
    cache = PagedKVCache(LAYOUT, 3, BLOCK, torch.float32, torch.device("cpu"))
    table = BlockTable()
    assert cache.reserve(table, 5) and len(table.blocks) == 2
    assert cache.reserve(table, 8) and len(table.blocks) == 2  # the second block still has room
    assert not cache.reserve(table, 13) and len(table.blocks) == 2  # four blocks needed, three exist
    assert table.slots(3, 6, BLOCK) == [table.blocks[0] * 4 + 3, table.blocks[1] * 4, table.blocks[1] * 4 + 1]
    cache.release(table)
    assert table.blocks == [] and cache.allocator.free == 3


def test_block_keys_chain_over_the_prefix():
    first = block_key(None, [1, 2, 3, 4])
    assert block_key(None, [1, 2, 3, 4]) == first
    assert block_key(first, [5, 6, 7, 8]) != block_key(block_key(None, [0, 2, 3, 4]), [5, 6, 7, 8])


def test_block_keys_cover_full_blocks_only_and_continue_a_chain():
    keys = block_keys(list(range(10)), 4)
    assert keys == [block_key(None, [0, 1, 2, 3]), block_key(keys[0], [4, 5, 6, 7])]
    assert block_keys([4, 5, 6, 7], 4, previous=keys[0]) == keys[1:]


def test_cached_blocks_are_found_by_key_and_survive_release_until_evicted_least_recently_used():
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(2), allocator.allocate(1)
    for block, key in zip(a + b, (10, 11, 20)):
        allocator.register(block, key)
    allocator.release(b)
    allocator.release(a)  # released tail first: a[1] is older than a[0]
    assert allocator.free == 4 and allocator.cached == 3
    assert allocator.lookup([10, 11, 12]) == a  # the longest cached run, referenced again
    allocator.release(a)
    assert allocator.lookup([11]) == [a[1]] and allocator.lookup([99, 10]) == []
    allocator.release([a[1]])
    fresh = allocator.allocate(2)  # the never-cached block, then the least recently used: b
    assert sorted(fresh) == sorted([3, *b]) and allocator.lookup([20]) == [] and allocator.cached == 2
    allocator.release(fresh)


def test_a_referenced_cached_block_is_never_evicted():
    allocator = BlockAllocator(3)
    held = allocator.allocate(3)
    for index, block in enumerate(held):
        allocator.register(block, 100 + index)
    allocator.release(held[1:])
    shared = allocator.lookup([100])  # a second reference to the still-held block
    assert shared == held[:1] and allocator.references[held[0]] == 2
    assert allocator.allocate(3) is None
    taken = allocator.allocate(2)
    assert sorted(taken) == sorted(held[1:]) and allocator.lookup([100]) == held[:1]
    assert allocator.free == 0 and allocator.allocate(1) is None


def test_registering_a_key_twice_keeps_the_first_block_and_frees_the_copy():
    allocator = BlockAllocator(2)
    first, copy = allocator.allocate(2)
    allocator.register(first, 7)
    allocator.register(copy, 7)
    allocator.release([first, copy])
    assert allocator.cached == 1 and allocator.lookup([7]) == [first]
    assert allocator.free_blocks == deque([copy])
    with pytest.raises(LmforgeError, match="not in use"):
        allocator.register(copy, 8)


def _graph_calling(op) -> fx.GraphModule:
    graph = fx.Graph()
    q = graph.placeholder("q")
    arguments = (q, q, q, 0, 1.0, 0, 0.0) if op is attention else (q, q, q, 0, 4, 16, 1.0, 0.0)
    graph.output(graph.call_function(op, arguments))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_only_plain_attention_on_the_aten_kernels_is_paged():
    plain = _graph_calling(attention)
    assert paging_unsupported_reason(plain, LAYOUT, "aten") is None
    assert "cpp backend" in paging_unsupported_reason(plain, LAYOUT, "cpp")
    assert "streaming_attention" in paging_unsupported_reason(_graph_calling(streaming_attention), LAYOUT, "aten")
    merged = [{**LAYOUT[0], "kind": "merged", "member": 0, "t": 0.5, "retain_threshold": 0.1}]
    assert "merged" in paging_unsupported_reason(plain, merged, "aten")
