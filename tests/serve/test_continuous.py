"""Continuous batching over the paged cache on tiny random models, driven step by step (no
thread, no HTTP): requests arriving at different steps, chunked prefill, preemption under a
tiny block pool and cancellation each give every request the tokens it gets alone from
`generate`, and blocks come back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import CharTokenizer

from lmforge.errors import LmforgeError
from lmforge.runtime.paged import BlockTable, PagedKVCache, paged_rows
from lmforge.runtime.sampling import SamplingParams
from lmforge.serve.app import make_scheduler
from lmforge.serve.continuous import ContinuousScheduler
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.scheduler import GenerationParams, Request, Scheduler

NEW_TOKENS = 8
PROMPT_LENGTHS = (5, 23, 40, 9, 17)


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


def _alone(model, prompt: list[int], sampling: SamplingParams = SamplingParams()) -> list[int]:
    """What `generate` gives the prompt alone, cut after an end-of-sequence token."""
    new = model.engine.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, sampling=sampling)[0, len(prompt):]
    eos = set(model.engine.eos_token_ids)
    new = new.tolist()
    return new[: next((i for i, token in enumerate(new) if token in eos), len(new))]


@pytest.fixture(scope="module")
def answers(prompts):
    """Each prompt's tokens alone, per model, computed once."""
    known = {}

    def get(model) -> list[list[int]]:
        if id(model) not in known:
            known[id(model)] = [_alone(model, prompt) for prompt in prompts]
        return known[id(model)]

    return get


@pytest.fixture(scope="module")
def alone(model, answers):
    return answers(model)


def _scheduler(model, **options) -> ContinuousScheduler:
    return ContinuousScheduler(model.engine, CharTokenizer(), **{"max_batch": 8, "block_size": 4, **options})


def _submit(scheduler, prompt: list[int], sampling: SamplingParams = SamplingParams()) -> Request:
    request = Request(prompt, GenerationParams(NEW_TOKENS, sampling), lambda event: None)
    scheduler.submit(request)
    return request


def _staggered(scheduler, prompts) -> list[Request]:
    """One request joins per step, then steps run until every request is done."""
    requests = []
    for prompt in prompts:
        requests.append(_submit(scheduler, prompt))
        scheduler.step()
    while scheduler.step():
        pass
    return requests


def test_requests_joining_at_different_steps_each_get_their_tokens_alone(both, prompts, answers):
    scheduler = _scheduler(both)
    requests = _staggered(scheduler, prompts)
    assert [r.output_ids for r in requests] == answers(both)
    assert all(r.finished for r in requests) and scheduler.cache.allocator.free == scheduler.cache.allocator.count
    assert scheduler.metrics.batch_sizes.count == len(prompts)  # every request joined a running batch


def test_chunked_prefill_rides_along_with_decode_tokens_and_changes_no_token(both, prompts, answers):
    scheduler = _scheduler(both, max_tokens_per_step=6)
    steps, forward = [], scheduler.forward
    scheduler.forward = lambda pieces: steps.append([p.count for p in pieces]) or forward(pieces)
    requests = _staggered(scheduler, prompts)
    assert [r.output_ids for r in requests] == answers(both)
    assert max(sum(counts) for counts in steps) == 6
    assert any(1 in counts and max(counts) > 1 for counts in steps)  # decode tokens beside a prompt chunk


def test_preemption_under_a_tiny_block_pool_recomputes_and_drops_nothing(model, prompts, alone):
    scheduler = _scheduler(model, kv_blocks=13)  # 52 tokens: the longest request (40 + 8) and little else
    requests = _staggered(scheduler, prompts)
    assert scheduler.preemptions > 0
    assert [r.output_ids for r in requests] == alone
    assert scheduler.cache.allocator.free == 13


def test_a_cancelled_request_frees_its_blocks_before_the_next_step(model, prompts, alone):
    scheduler = _scheduler(model)
    kept, cancelled = _submit(scheduler, prompts[0]), _submit(scheduler, prompts[2])
    scheduler.step()
    held = scheduler.cache.allocator.count - scheduler.cache.allocator.free
    scheduler.cancel(cancelled)
    scheduler.step()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.output_ids) == 1
    assert scheduler.cache.allocator.count - scheduler.cache.allocator.free == held - 40 // 4  # its 10 blocks
    while scheduler.step():
        pass
    assert kept.output_ids == alone[0] and scheduler.cache.allocator.free == scheduler.cache.allocator.count


def test_seeded_sampling_per_request_equals_generate_alone(model, prompts):
    samplings = [SamplingParams(do_sample=True, temperature=1.5, top_k=50, seed=seed) for seed in (1, 2)]
    scheduler = _scheduler(model, max_tokens_per_step=8)
    requests = [_submit(scheduler, prompts[1], samplings[0]), _submit(scheduler, prompts[3])]
    scheduler.step()
    requests.append(_submit(scheduler, prompts[1], samplings[1]))
    while scheduler.step():
        pass
    assert requests[0].output_ids == _alone(model, prompts[1], samplings[0])
    assert requests[2].output_ids == _alone(model, prompts[1], samplings[1]) != requests[0].output_ids
    assert requests[1].output_ids == _alone(model, prompts[3])


def test_a_request_larger_than_the_block_pool_is_refused(model):
    scheduler = _scheduler(model, kv_blocks=4)
    with pytest.raises(LmforgeError, match="KV block pool of 16 tokens"):
        _submit(scheduler, [5] * 12)


def test_programs_that_cannot_be_paged_are_served_one_batch_at_a_time_with_the_reason(model):
    options = dict(max_batch=2, max_tokens_per_step=64)
    assert isinstance(make_scheduler(model, ServeMetrics(), **options), ContinuousScheduler)
    cpp = SimpleNamespace(engine=model.engine, tokenizer=CharTokenizer(), program=model.program,
                          recipe=SimpleNamespace(codegen=SimpleNamespace(backend="cpp")))
    fallback = make_scheduler(cpp, ServeMetrics(), **options)
    assert isinstance(fallback, Scheduler) and "cpp backend has no paged attention kernel" in fallback.describe()


def test_paged_steps_in_chunks_give_the_cache_free_logits(both, prompts):
    """A prompt fed 7 tokens a step through the block pool (logits of every token kept) has
    the logits of one cache-free forward over the whole prompt."""
    engine, prompt = both.engine, prompts[2]
    cache = PagedKVCache(engine.kv_layout, 16, 4, engine.dtype, engine.device)
    table, chunks = BlockTable(), []
    with torch.no_grad():
        for start in range(0, len(prompt), 7):
            count = min(7, len(prompt) - start)
            assert cache.reserve(table, start + count)
            rows = paged_rows([(table, start, count)], 4, engine.device)
            ids = torch.tensor([prompt[start : start + count]])
            chunks.append(engine.step_paged(ids, torch.arange(start, start + count)[None], cache.pools, rows))
    expected = engine.forward(torch.tensor([prompt]))[0]
    torch.testing.assert_close(torch.cat(chunks), expected, rtol=1e-4, atol=1e-4)
