"""Triton attention kernels and ops against lmforge's PyTorch attention.

There is no GPU here: the kernels run in Triton's interpreter on CPU tensors. Triton reads
TRITON_INTERPRET when a `@triton.jit` function is defined, so it is set before the kernel
modules are imported (set later, launches fail with "0 active drivers"). The interpreter
runs one program instance after another (about a millisecond each), so shapes are small.
bf16 is not tested: the interpreter's `tl.dot` multiplies raw bf16 bit patterns
(triton-lang/triton#11584); it needs a GPU.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from lmforge.codegen.aten import PYTHON_KERNELS  # noqa: E402
from lmforge.codegen.aten.attention import attention_reference  # noqa: E402
from lmforge.codegen.aten.sparse import block_sparse_attention  # noqa: E402
from lmforge.codegen.roofline import PEAK_BANDWIDTH, decode_attention_roofline, decode_splits  # noqa: E402
from lmforge.codegen.triton import decode_attention as decode_module  # noqa: E402
from lmforge.codegen.triton import prefill_attention as prefill_module  # noqa: E402
from lmforge.codegen.triton.attention import PYTHON_FALLBACKS, TRITON_KERNELS  # noqa: E402
from lmforge.codegen.triton.decode_attention import decode_attention  # noqa: E402
from lmforge.codegen.triton.prefill_attention import prefill_attention  # noqa: E402
from lmforge.codegen.triton.refused import TRITON_REFUSED  # noqa: E402
from lmforge.compiler.kv_layout import RingSlot  # noqa: E402
from lmforge.compiler.ops import (  # noqa: E402
    AttentionContext,
    attention,
    attention_context,
    sparse_attention,
    streaming_attention,
    tree_attention,
)
from lmforge.compiler.sparse_patterns import a_shape_blocks, streaming_allowed  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}
TREE = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)


def _tensors(batch, heads, kv_heads, q_len, slots, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(dtype)
    return q, k, v


def _close(actual, expected, dtype):
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    "batch, heads, kv_heads, head_dim, length, window, softcap, pad, dtype",
    [
        (2, 4, 1, 80, 1, 0, 0.0, None, torch.float32),
        (2, 2, 2, 64, 63, 0, 30.0, [0, 5], torch.float32),
        (2, 4, 1, 80, 65, 16, 0.0, [3, 0], torch.float16),
        (2, 2, 2, 64, 3, 0, 0.0, [5, 0], torch.float32),  # a padding query sees itself
        (1, 4, 1, 64, 1000, 0, 0.0, None, torch.float32),  # several splits
    ],
)
def test_decode_matches_reference(batch, heads, kv_heads, head_dim, length, window, softcap, pad, dtype):
    q, k, v = _tensors(batch, heads, kv_heads, 1, length + 5, head_dim, dtype)  # slots past the length are ignored
    pad = torch.tensor(pad) if pad is not None else None
    mask = AttentionContext(kv=None, start=length - 1, q_len=1, pad=pad).mask(window)
    expected = attention_reference(q, k[:, :, :length], v[:, :, :length], mask, head_dim**-0.5, softcap)
    out = decode_attention(q, k, v, length - 1, head_dim**-0.5, window, softcap,
                           pad=pad.int() if pad is not None else None)
    _close(out, expected, dtype)


@pytest.mark.parametrize("per_head", [False, True])
def test_decode_reads_slots_by_position(per_head):
    """A cache whose slot order is not position order (a ring; an evicting cache, whose
    positions differ per KV head), with empty slots, under a sink + window rule."""
    batch, heads, kv_heads, slots, sink, window, query = 2, 4, 2, 24, 2, 6, 40
    q, k, v = _tensors(batch, heads, kv_heads, 1, slots, 64, torch.float32)
    generator = torch.Generator().manual_seed(1)
    shape = (batch, kv_heads, slots) if per_head else (batch, slots)
    positions = torch.randperm(query + 1, generator=generator)[: slots].expand(*shape).clone()
    positions[..., 0] = query  # the query's own key
    positions[..., 1] = -1
    if per_head:
        positions[:, 1] = positions[:, 1].roll(3, dims=-1)
    pad = torch.tensor([0, 3])
    mask_positions = positions.repeat_interleave(heads // kv_heads, 1) if per_head else positions[:, None]
    allowed = streaming_allowed(torch.tensor(query), mask_positions[:, :, None, :], pad.view(-1, 1, 1, 1), sink, window)
    expected = attention_reference(q, k, v, allowed, 0.125, 0.0)
    out = decode_attention(q, k, v, query, 0.125, window, sink=sink, pad=pad.int(), key_positions=positions.int())
    _close(out, expected, torch.float32)


def _context_mask(start, q_len, pad, tree, window):
    return AttentionContext(kv=None, start=start, q_len=q_len, pad=pad, tree=tree).mask(window)


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, start, q_len, window, softcap, pad, tree, dtype",
    [
        (4, 1, 80, 0, 65, 0, 0.0, None, None, torch.float32),
        (2, 2, 64, 0, 37, 16, 30.0, [5, 0], None, torch.float32),
        (4, 1, 80, 60, 4, 0, 0.0, [0, 3], None, torch.float32),  # verification of 4 tokens
        (4, 1, 80, 60, 4, 0, 0.0, [0, 3], None, torch.float16),
        (2, 1, 64, 10, 4, 0, 0.0, [2, 0], TREE, torch.float32),
        (2, 2, 64, 0, 3, 0, 0.0, [2, 0], None, torch.float32),  # padding queries see themselves
    ],
)
def test_prefill_matches_reference(heads, kv_heads, head_dim, start, q_len, window, softcap, pad, tree, dtype):
    q, k, v = _tensors(2, heads, kv_heads, q_len, start + q_len + 3, head_dim, dtype)
    pad = torch.tensor(pad) if pad is not None else None
    kv_len = start + q_len
    mask = _context_mask(start, q_len, pad, tree, window)
    expected = attention_reference(q, k[:, :, :kv_len], v[:, :, :kv_len], mask, head_dim**-0.5, softcap)
    out = prefill_attention(q, k, v, start, head_dim**-0.5, window, softcap,
                            pad=pad.int() if pad is not None else None, tree=tree)
    assert not out.isnan().any()
    _close(out, expected, dtype)


def test_prefill_streaming_rule_with_sinks():
    """Sinks and window of a streaming head over a padded prompt walk two key ranges."""
    q, k, v = _tensors(2, 2, 1, 40, 40, 64, torch.float32)
    pad, sink, window = torch.tensor([0, 6]), 4, 8
    slots = torch.arange(40)
    allowed = streaming_allowed(slots.view(1, 1, -1, 1), slots.view(1, 1, 1, -1), pad.view(-1, 1, 1, 1), sink, window)
    expected = attention_reference(q, k, v, allowed, 0.125, 0.0)
    out = prefill_attention(q, k, v, 0, 0.125, window, sink=sink, pad=pad.int())
    _close(out, expected, torch.float32)


@pytest.mark.parametrize("block", [16, 24])
def test_block_sparse_prefill_matches_python(block):
    """Block lists from an A-shape pattern; a block of 24 tokens is walked in 32-row tiles."""
    q, k, v = _tensors(2, 2, 1, 70, 70, 64, torch.float32)
    pad = torch.tensor([0, 9])
    selected = a_shape_blocks(70, block, 2)
    expected = block_sparse_attention(q, k, v, selected[None, None], block, 0.125, 0.0, pad)
    count = selected.shape[0]
    lists = torch.stack([torch.cat([row.nonzero().flatten(), torch.full((count,), -1)])[:count] for row in selected])
    out = prefill_attention(q, k, v, 0, 0.125, pad=pad.int(), blocks=lists[None, None], block=block)
    _close(out, expected, torch.float32)


def _run_both(op, ctx_args, caches, inputs, extra):
    """The op's Triton and Python kernels on identical copies of the cache, each under its
    own (equal) context; returns both outputs."""
    outputs = []
    for kernels, cache in zip((TRITON_KERNELS, PYTHON_KERNELS), caches):
        with attention_context(AttentionContext(kv=cache, **ctx_args)):
            outputs.append(kernels[op](*inputs, 0, *extra))
    return outputs


def _assert_same_caches(triton_cache, python_cache):
    """Bit for bit, NaN in the slots neither has written yet included."""
    for ours, theirs in zip(triton_cache[0], python_cache[0]):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0, equal_nan=True)


def _unwritten_caches(shape, dtype, written=0, seed=5):
    """Two equal (key, value) caches: random entries in slots ..written, NaN after, so a
    kernel that read a slot of this forward before writing it would return NaN."""
    generator = torch.Generator().manual_seed(seed)
    cache = torch.full(shape, float("nan"), dtype=dtype)
    cache[:, :, :written] = torch.randn(*shape[:2], written, shape[3], generator=generator).to(dtype)
    return [[(cache.clone(), cache.clone() + 1)] for _ in range(2)]


@pytest.mark.parametrize("window, kv_heads, dtype", [
    (0, 1, torch.float32), (6, 1, torch.float32), (0, 2, torch.float32), (0, 2, torch.float16)])
def test_attention_op_prefill_verify_decode(window, kv_heads, dtype):
    """Prefill 9 padded tokens, verify 4, decode 1, with the kernels writing the cache: the
    outputs equal the Python op's and the caches are bit for bit the same."""
    batch, heads, head_dim, pad = 2, 4, 64, torch.tensor([3, 0])
    caches = _unwritten_caches((batch, kv_heads, 32, head_dim), dtype)
    for step, (start, q_len) in enumerate([(0, 9), (9, 4), (13, 1)]):
        q, k, v = _tensors(batch, heads, kv_heads, q_len, q_len, head_dim, dtype, seed=step)
        ours, theirs = _run_both(attention, dict(start=start, q_len=q_len, pad=pad), caches, (q, k, v),
                                 (head_dim**-0.5, window, 0.0))
        assert ours.shape == theirs.shape == (batch, q_len, heads, head_dim) and ours.is_contiguous()
        _close(ours, theirs, dtype)
        _assert_same_caches(*caches)


def test_attention_op_decode_over_several_splits():
    """A decode step at position 700 split three ways per row and KV head: the split that
    holds slot 700 writes the step's key and value (into a transposed view, as the graph
    hands them), the others read only older slots; output and cache equal the Python op's."""
    batch, heads, kv_heads, head_dim, start, pad = 2, 4, 2, 64, 700, torch.tensor([0, 37])
    assert decode_module._split_count(batch * kv_heads, start + 1 - 37) == 3
    caches = _unwritten_caches((batch, kv_heads, start + 4, head_dim), torch.float32, written=start)
    q, k, v = _tensors(batch, heads, kv_heads, 1, 1, head_dim, torch.float32, seed=6)
    k, v = (tensor.transpose(1, 2).contiguous().transpose(1, 2) for tensor in (k, v))
    ours, theirs = _run_both(attention, dict(start=start, q_len=1, pad=pad), caches, (q, k, v),
                             (head_dim**-0.5, 0, 0.0))
    _close(ours, theirs, torch.float32)
    _assert_same_caches(*caches)


def test_a_forward_past_the_cache_is_refused():
    caches = _unwritten_caches((1, 1, 8, 64), torch.float32)
    for start, q_len in ((8, 1), (6, 3)):
        q, k, v = _tensors(1, 2, 1, q_len, q_len, 64, torch.float32)
        with attention_context(AttentionContext(kv=caches[0], start=start, q_len=q_len)), \
                pytest.raises(LmforgeError, match="this cache has 8 slots"):
            TRITON_KERNELS[attention](q, k, v, 0, 0.125, 0, 0.0)


def test_launches_over_no_queries_return_empty_outputs():
    """An empty batch (decode) or a forward of no tokens (prefill) launches no program and
    returns an empty output of the attention ops' layout."""
    q, k, v = _tensors(1, 4, 2, 1, 8, 16, torch.float32)
    assert decode_attention(q[:0], k[:0], v[:0], 3, 0.25).shape == (0, 4, 1, 16)
    assert prefill_attention(q[:, :, :0], k, v, 0, 0.25).shape == (1, 4, 0, 16)


def test_kernels_write_only_a_dense_cache_without_sinks():
    """A ring (keys read by position) or a streaming rule is written by `RingSlot.write`."""
    q, k, v = _tensors(1, 2, 1, 3, 8, 64, torch.float32)
    new = dict(new_keys=k[:, :, :3], new_values=v[:, :, :3])
    with pytest.raises(LmforgeError, match="without attention sinks"):
        prefill_attention(q, k, v, 0, 0.125, 4, sink=2, **new)
    with pytest.raises(LmforgeError, match="dense cache"):
        decode_attention(q[:, :, :1], k, v, 3, 0.125, key_positions=torch.arange(8, dtype=torch.int32)[None],
                         new_keys=k[:, :, :1], new_values=v[:, :, :1])


def test_tree_attention_op():
    shape = (1, 1, 16, 64)
    caches = [[(torch.randn(shape, generator=torch.Generator().manual_seed(2)),) * 2] for _ in range(2)]
    caches = [[(key.clone(), value.clone()) for key, value in cache] for cache in caches]
    q, k, v = _tensors(1, 2, 1, 4, 4, 64, torch.float32, seed=3)
    ours, theirs = _run_both(tree_attention, dict(start=6, q_len=4, tree=TREE), caches, (q, k, v), (0.125, 0, 0.0))
    _close(ours, theirs, torch.float32)
    _assert_same_caches(*caches)
    with attention_context(AttentionContext(kv=caches[0], start=6, q_len=4, tree=TREE)), pytest.raises(LmforgeError):
        TRITON_KERNELS[attention](q, k, v, 0, 0.125, 0, 0.0)


RING_SINK, RING_WINDOW, RING_HEAD_DIM = 2, 4, 64


@pytest.fixture
def rings():
    """Two equal one-layer caches of a streaming head for a batch of 2: RingSlots with sink 2,
    window 4 and a slack of 3 tokens, for `_run_both`."""
    return [[RingSlot.allocate(2, 1, RING_HEAD_DIM, RING_SINK, RING_WINDOW, RING_SINK + RING_WINDOW + 3,
                               torch.float32)] for _ in range(2)]


def _streaming_both(rings, start, q_len, pad, seed):
    q, k, v = _tensors(2, 2, 1, q_len, q_len, RING_HEAD_DIM, torch.float32, seed=seed)
    return _run_both(streaming_attention, dict(start=start, q_len=q_len, pad=pad), rings, (q, k, v),
                     (RING_SINK, RING_WINDOW, 0.125, 0.0))


def test_streaming_op_over_a_ring(rings):
    """Prefill, verify 3 tokens, decode 1 through a ring: outputs, ring entries and their
    positions equal the Python op's."""
    for step, (start, q_len) in enumerate([(0, 12), (12, 3), (15, 1)]):
        _close(*_streaming_both(rings, start, q_len, torch.tensor([0, 2]), seed=step), torch.float32)
        for field in ("keys", "values", "slots"):
            assert torch.equal(getattr(rings[0][0], field), getattr(rings[1][0], field))


def test_streaming_op_chunked_padded_prompt(rings):
    """A second chunk whose first tokens are still left padding (row 0 pads 6 slots): the
    ring never stores padding, yet those queries must see their own keys."""
    for step, (start, q_len) in enumerate([(0, 4), (4, 4)]):
        _close(*_streaming_both(rings, start, q_len, torch.tensor([6, 0]), seed=step), torch.float32)


def test_sparse_op_prefill():
    """A sparse prefill over the min_length: per-head patterns, outputs and cache as Python's."""
    batch, heads, head_dim, length, block = 1, 2, 64, 40, 16
    shape = (batch, 1, 48, head_dim)
    caches = [[(torch.zeros(shape), torch.zeros(shape))] for _ in range(2)]
    q, k, v = _tensors(batch, heads, 1, length, length, head_dim, torch.float32, seed=4)
    ours, theirs = _run_both(sparse_attention, dict(start=0, q_len=length), caches, (q, k, v),
                             (0.125, 0, 0.0, [0, 2], 2, block, 32))
    _close(ours, theirs, torch.float32)
    _assert_same_caches(*caches)


def test_cache_free_forward_must_start_at_zero():
    q, k, v = _tensors(1, 2, 1, 2, 2, 64, torch.float32)
    context = AttentionContext(kv=None, start=3, q_len=2)
    with attention_context(context), pytest.raises(LmforgeError, match="position 0"):
        TRITON_KERNELS[attention](q, k, v, 0, 0.125, 0, 0.0)


def test_kernel_table_covers_every_python_kernel():
    """Every op has a triton kernel or is refused at compile, with a reason; never both."""
    assert TRITON_KERNELS.keys() | TRITON_REFUSED.keys() == PYTHON_KERNELS.keys()
    assert not TRITON_KERNELS.keys() & TRITON_REFUSED.keys()
    assert all(reason for reason in TRITON_REFUSED.values())
    for op in PYTHON_FALLBACKS:
        assert TRITON_KERNELS[op] is PYTHON_KERNELS[op]
    for op in (attention, tree_attention, streaming_attention, sparse_attention):
        assert TRITON_KERNELS[op] is not PYTHON_KERNELS[op]


@pytest.mark.parametrize("module", [decode_module, prefill_module])
def test_aot_specs_name_every_kernel_parameter(module):
    for kernel, signature, constexprs, num_warps in module.aot_specs(80, 4, torch.float16):
        assert list(signature) == kernel.arg_names
        assert all(signature[name] == "constexpr" for name in constexprs)
        assert num_warps in (4, 8)


class _RecordedLaunches:
    """Stands in for a `@triton.jit` kernel: records each launch's keyword arguments."""

    def __init__(self):
        self.keywords = []

    def __getitem__(self, grid):
        return lambda *args, **keywords: self.keywords.append(keywords)


def _launched_config(keywords: dict) -> dict:
    return {name: value for name, value in keywords.items() if name.startswith("BLOCK_") or name == "num_warps"}


def _aot_config(entry) -> dict:
    _, _, constexprs, num_warps = entry
    return {**{name: value for name, value in constexprs.items() if name.startswith("BLOCK_")},
            "num_warps": num_warps}


@pytest.mark.parametrize("dtype, head_dim, q_len, tree, sparse_block", [
    (torch.float16, 128, 100, False, None), (torch.float16, 64, 40, True, None), (torch.float32, 128, 20, False, None),
    (torch.float32, 64, 70, False, 64), (torch.float32, 128, 33, True, None)])
def test_prefill_launches_what_aot_compiles(monkeypatch, dtype, head_dim, q_len, tree, sparse_block):
    """The launcher's tiles and warps are those `aot_specs` reports for the same forward."""
    launches = _RecordedLaunches()
    monkeypatch.setattr(prefill_module, "prefill_attention_kernel", launches)
    q, k, v = _tensors(1, 2, 1, q_len, q_len, head_dim, dtype)
    mask = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool)) if tree else None
    blocks = torch.zeros(1, 1, -(-q_len // 64), 1, dtype=torch.int32) if sparse_block else None
    prefill_module.prefill_attention(q, k, v, 0, 0.125, tree=mask, blocks=blocks, block=sparse_block or 64)
    (entry,) = prefill_module.aot_specs(head_dim, 2, dtype, q_len=q_len, tree=tree, sparse_block=sparse_block)
    assert _launched_config(launches.keywords[0]) == _aot_config(entry)


@pytest.mark.parametrize("dtype, head_dim, group", [(torch.float16, 64, 2), (torch.float32, 128, 8)])
def test_decode_launches_what_aot_compiles(monkeypatch, dtype, head_dim, group):
    launches = _RecordedLaunches()
    monkeypatch.setattr(decode_module, "decode_attention_partial", launches)
    q, k, v = _tensors(1, group, 1, 1, 8, head_dim, dtype)
    decode_module.decode_attention(q, k, v, 7, 0.125)
    partial, _ = decode_module.aot_specs(head_dim, group, dtype)
    assert _launched_config(launches.keywords[0]) == _aot_config(partial)


def test_roofline_says_which_split_count_it_uses():
    """An eager step splits by the keys it scans; a captured one by the cache's size."""
    eager = decode_splits(4, 600)
    captured = decode_splits(4, 600, cache_slots=4096)
    assert (eager.count, captured.count) == (3, 16)  # 600 keys: 3 splits of >= 256; 4096 slots: the cap
    assert eager.rule == "eager step: by the 600 keys it scans"
    assert captured.rule == "step captured in a CUDA graph: by the cache's 4096 slots"
    bandwidth = PEAK_BANDWIDTH["H100-SXM"]
    eager_bytes, captured_bytes = (decode_attention_roofline(1, 8, 4, 64, 2, 600, splits, bandwidth)
                                   for splits in (eager, captured))
    assert captured_bytes.splits is captured and eager_bytes.kv_bytes == captured_bytes.kv_bytes
    assert captured_bytes.query_bytes == eager_bytes.query_bytes * 16 // 3
    with pytest.raises(LmforgeError, match="cannot hold 600 tokens"):
        decode_splits(4, 600, cache_slots=512)
