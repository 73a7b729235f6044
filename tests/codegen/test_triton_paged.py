"""The Triton paged attention kernel (`codegen/triton/paged_attention.py`) in Triton's
interpreter, against the `aten` paged kernel and against dense attention per request, over
random block layouts and ragged steps; and a tiny Llama compiled for the `triton` backend
served by the continuous scheduler, which must give every request the greedy tokens
`generate` gives it alone.

TRITON_INTERPRET is set before any kernel module is imported (see test_triton_attention.py).
bf16 is not run: the interpreter's `tl.dot` multiplies raw bf16 bit patterns
(triton-lang/triton#11584); it needs a GPU.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import CharTokenizer, tiny_model  # noqa: E402

import lmforge  # noqa: E402
from lmforge.codegen.aten.attention import attention_reference  # noqa: E402
from lmforge.codegen.aten.paged import paged_attention as aten_paged_attention  # noqa: E402
from lmforge.codegen.triton import attention as triton_attention_module  # noqa: E402
from lmforge.codegen.triton.paged_attention import launch_config, paged_attention, split_count  # noqa: E402
from lmforge.compiler.ops import AttentionContext  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.runtime.paged import BlockTable, paged_rows  # noqa: E402
from lmforge.serve.app import make_scheduler  # noqa: E402
from lmforge.serve.continuous import ContinuousScheduler  # noqa: E402
from lmforge.serve.metrics import ServeMetrics  # noqa: E402
from lmforge.serve.scheduler import GenerationParams, Request  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3}


def _step(pieces, heads, kv_heads, head_dim, block_size, dtype, seed):
    """A random paged step: each piece (start, count) a request whose earlier positions are
    already in a pool, its blocks scattered over the pool at random. Returns q, k, v, the
    pools, the rows and each request's blocks."""
    generator = torch.Generator().manual_seed(seed)
    needed = [-(-(start + count) // block_size) for start, count in pieces]
    order = torch.randperm(sum(needed) + 3, generator=generator).tolist()  # 3 blocks nobody holds
    tables, taken = [], 0
    for count in needed:
        tables.append(BlockTable(order[taken : taken + count]))
        taken += count
    slots = (sum(needed) + 3) * block_size
    key_pool = torch.randn(1, kv_heads, slots, head_dim, generator=generator).to(dtype)
    value_pool = torch.randn(1, kv_heads, slots, head_dim, generator=generator).to(dtype)
    tokens = sum(count for _, count in pieces)
    q = torch.randn(1, heads, tokens, head_dim, generator=generator).to(dtype)
    k = torch.randn(1, kv_heads, tokens, head_dim, generator=generator).to(dtype)
    v = torch.randn(1, kv_heads, tokens, head_dim, generator=generator).to(dtype)
    rows = paged_rows([(table, start, count) for table, (start, count) in zip(tables, pieces)], block_size,
                      torch.device("cpu"))
    return q, k, v, key_pool, value_pool, rows, tables


def _dense(q, k, v, key_pool, value_pool, pieces, tables, block_size, scale, window, softcap):
    """Each request alone: its keys gathered in position order (the new ones from k and v)
    and dense causal attention with the window, at its positions. (1, T, Hq, D)."""
    outputs, first = [], 0
    for (start, count), table in zip(pieces, tables):
        old = torch.tensor(table.slots(0, start, block_size), dtype=torch.long)
        keys = torch.cat([key_pool.index_select(2, old), k[:, :, first : first + count]], dim=2)
        values = torch.cat([value_pool.index_select(2, old), v[:, :, first : first + count]], dim=2)
        queries = torch.arange(start, start + count)[:, None]
        positions = torch.arange(start + count)[None, :]
        mask = positions <= queries
        if window > 0:
            mask &= positions > queries - window
        out = attention_reference(q[:, :, first : first + count], keys, values, mask[None, None], scale, softcap)
        outputs.append(out.transpose(1, 2))
        first += count
    return torch.cat(outputs, dim=1)


def _close(actual, expected, dtype):
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


CASES = [  # pieces (start, count), heads, kv heads, head_dim, block size, window, softcap, dtype
    # decode rows and prompt chunks crossing block boundaries, GQA 4:1
    ([(0, 7), (13, 1), (5, 9), (30, 1)], 8, 2, 32, 4, 0, 0.0, torch.float32),
    # a window shorter than the contexts, soft-capped scores, 2:1, fp16, head_dim padded 24 -> 32
    ([(9, 1), (3, 6), (0, 1), (17, 5)], 4, 2, 24, 4, 5, 30.0, torch.float16),
    # a chunk longer than a tile (64 // 2 tokens), block size 16, no GQA
    ([(20, 40), (2, 1)], 2, 2, 16, 16, 0, 0.0, torch.float32),
    # decode only, long contexts: split over several programs, then combined
    ([(300, 1), (520, 1), (64, 1)], 4, 1, 16, 8, 0, 0.0, torch.float32),
    # decode only, split, under a window and soft-cap in fp16
    ([(400, 1), (290, 1)], 4, 2, 32, 16, 300, 20.0, torch.float16),
]


@pytest.mark.parametrize("pieces, heads, kv_heads, head_dim, block_size, window, softcap, dtype", CASES)
def test_paged_kernel_matches_aten_and_dense_attention(pieces, heads, kv_heads, head_dim, block_size, window,
                                                       softcap, dtype):
    q, k, v, key_pool, value_pool, rows, tables = _step(pieces, heads, kv_heads, head_dim, block_size, dtype,
                                                        seed=len(pieces) + head_dim)
    scale = head_dim**-0.5
    dense = _dense(q, k, v, key_pool, value_pool, pieces, tables, block_size, scale, window, softcap)
    aten_pools = (key_pool.clone(), value_pool.clone())
    context = AttentionContext(kv=[aten_pools], start=0, q_len=q.shape[2], paged=rows)
    expected = aten_paged_attention(q, k, v, aten_pools, context, scale, window, softcap)

    out = paged_attention(q, k, v, key_pool, value_pool, rows, scale, window, softcap)

    assert out.shape == expected.shape == (1, q.shape[2], heads, head_dim)
    _close(out, expected, dtype)
    _close(out, dense, dtype)
    # the step's keys and values were written to their slots, nothing else changed
    assert torch.equal(key_pool, aten_pools[0]) and torch.equal(value_pool, aten_pools[1])


def test_long_decode_steps_are_split_and_chunked_steps_are_not():
    assert split_count(3, 521) == 3  # 521 keys: three splits of at least 256
    assert split_count(3, 200) == 1
    assert split_count(256, 4096) == 1  # enough programs already
    decode, chunk = launch_config(4, 128, 2, decode=True), launch_config(4, 128, 2, decode=False)
    assert (decode["BLOCK_M"], decode["BLOCK_G"]) == (1, 16)  # a token's heads padded to tl.dot's 16 rows
    assert (chunk["BLOCK_M"], chunk["BLOCK_G"]) == (16, 4)
    assert launch_config(4, 128, 4, decode=False)["BLOCK_M"] == 4  # fp32 at head_dim 128: 16 rows
    assert launch_config(64, 64, 4, decode=False)["BLOCK_M"] == 1  # a group wider than a tile: one token


def test_a_step_without_block_tables_is_refused():
    q, k, v, key_pool, value_pool, rows, _ = _step([(3, 2)], 2, 1, 16, 4, torch.float32, seed=0)
    bare = type(rows)(rows.write_slots, rows.key_slots, rows.query_requests, rows.query_positions,
                      rows.key_requests, rows.key_positions)
    with pytest.raises(LmforgeError, match="block tables"):
        paged_attention(q, k, v, key_pool, value_pool, bare, 0.25)


NEW_TOKENS = 4


@pytest.fixture(scope="module")
def triton_llama():
    recipe = "codegen: {backend: triton, targets: []}\nruntime: {max_seq_len: 32, dtype: float32}\n"
    return lmforge.optimize(tiny_model("llama", num_layers=1), recipe)


def test_a_triton_artifact_is_served_by_the_continuous_scheduler(triton_llama, monkeypatch):
    """Three prompts joining at different steps, one chunked over several steps, each gets
    the greedy tokens `generate` gives it alone, every step through the Triton paged kernel."""
    launches = []

    def counted(*args, **kwargs):
        launches.append(args[5].pieces)
        return paged_attention(*args, **kwargs)

    monkeypatch.setattr(triton_attention_module, "paged_attention", counted)
    scheduler = make_scheduler(triton_llama, ServeMetrics(), max_batch=4, max_tokens_per_step=12)
    assert isinstance(scheduler, ContinuousScheduler)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (length,), generator=generator).tolist() for length in (6, 15, 3)]
    eos, alone = set(triton_llama.engine.eos_token_ids), []
    for prompt in prompts:
        new = triton_llama.engine.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
        alone.append(new[: next((i for i, token in enumerate(new) if token in eos), len(new))])
    scheduler = ContinuousScheduler(triton_llama.engine, CharTokenizer(), max_batch=4, max_tokens_per_step=12,
                                    block_size=4)
    requests = []
    for prompt in prompts:
        requests.append(Request(prompt, GenerationParams(NEW_TOKENS), lambda event: None))
        scheduler.submit(requests[-1])
        scheduler.step()
    while scheduler.step():
        pass
    assert [request.output_ids for request in requests] == alone
    assert any(len(pieces) == 3 and max(count for _, _, count in pieces) > 1 for pieces in launches)  # mixed step
    assert any(all(count == 1 for _, _, count in pieces) for pieces in launches)  # a decode-only step
    assert scheduler.cache.allocator.free == scheduler.cache.allocator.count


def test_a_triton_gemma2_is_served_with_steps_that_only_prefill(monkeypatch):
    """Gemma2 soft-caps its logits in a generated kernel after the LM head. Prompts prefilled
    4 tokens a step: the first steps run only prompt chunks, need no logits, and launch that
    kernel over zero rows. Each request still gets `generate`'s greedy tokens."""
    recipe = "codegen: {backend: triton, targets: []}\nruntime: {max_seq_len: 32, dtype: float32}\n"
    gemma2 = lmforge.optimize(tiny_model("gemma2", num_layers=1), recipe)
    logit_rows = []

    def counted(*args, **kwargs):
        logit_rows.append(len(args[5].logit_rows))
        return paged_attention(*args, **kwargs)

    monkeypatch.setattr(triton_attention_module, "paged_attention", counted)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (length,), generator=generator).tolist() for length in (9, 5)]
    eos, alone = set(gemma2.engine.eos_token_ids), []
    for prompt in prompts:
        new = gemma2.engine.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
        alone.append(new[: next((i for i, token in enumerate(new) if token in eos), len(new))])
    scheduler = ContinuousScheduler(gemma2.engine, CharTokenizer(), max_batch=2, max_tokens_per_step=4,
                                    block_size=4)
    requests = [Request(prompt, GenerationParams(NEW_TOKENS), lambda event: None) for prompt in prompts]
    for request in requests:
        scheduler.submit(request)
    while scheduler.step():
        pass
    assert [request.output_ids for request in requests] == alone
    assert 0 in logit_rows and max(logit_rows) == 2  # steps that only prefill, and steps that sample both
    assert scheduler.cache.allocator.free == scheduler.cache.allocator.count
