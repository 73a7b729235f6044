"""Prefix caching in the continuous scheduler on tiny random models, driven step by step: a
request whose prompt starts with blocks already cached computes only the rest (counted from
the tokens fed to the model) and still gets the tokens `generate` gives it alone — while the
blocks' first owner runs or after it finished, under LRU eviction in a tiny pool, for a
prompt identical to a cached one, and with preemption among requests sharing blocks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_models import CharTokenizer

from lmforge.serve.app import make_scheduler
from lmforge.serve.continuous import ContinuousScheduler
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.scheduler import GenerationParams, Request

NEW_TOKENS = 8
BLOCK = 4
PREFIX = 40  # ten full blocks


def _random_tokens(length: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(model, prompt: list[int]) -> list[int]:
    """What `generate` gives the prompt alone, cut after an end-of-sequence token."""
    new = model.engine.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS)[0, len(prompt):].tolist()
    eos = set(model.engine.eos_token_ids)
    return new[: next((i for i, token in enumerate(new) if token in eos), len(new))]


class _Run:
    """A scheduler whose forwards are counted: prompt tokens fed to the model per request."""

    def __init__(self, model, **options) -> None:
        self.scheduler = ContinuousScheduler(model.engine, CharTokenizer(),
                                             **{"max_batch": 8, "block_size": BLOCK, **options})
        self.fed: Counter = Counter()
        forward = self.scheduler.forward

        def counted(pieces):
            for piece in pieces:
                prompt_end = len(piece.sequence.request.prompt_ids)
                self.fed[piece.sequence.request.id] += max(0, min(piece.start + piece.count, prompt_end) - piece.start)
            return forward(pieces)

        self.scheduler.forward = counted

    def submit(self, prompt: list[int]) -> Request:
        request = Request(prompt, GenerationParams(NEW_TOKENS), lambda event: None)
        self.scheduler.submit(request)
        return request

    def finish(self) -> None:
        while self.scheduler.step():
            pass

    def computed_prompt_tokens(self, request: Request) -> int:
        return self.fed[request.id]

    def assert_all_blocks_free(self) -> None:
        allocator = self.scheduler.cache.allocator
        assert allocator.free == allocator.count and not any(allocator.references)


@pytest.mark.parametrize("first_still_running", [True, False])
def test_a_shared_prefix_is_computed_once_and_changes_no_token(both, first_still_running):
    prefix = _random_tokens(PREFIX, 0)
    prompts = [prefix + _random_tokens(7, 1), prefix + _random_tokens(5, 2)]
    run = _Run(both)
    first = run.submit(prompts[0])
    run.scheduler.step()  # the first prompt's prefill: its ten prefix blocks are cached
    if not first_still_running:
        run.finish()
    second = run.submit(prompts[1])
    run.finish()
    assert run.computed_prompt_tokens(first) == len(prompts[0])
    assert run.computed_prompt_tokens(second) == 5  # only its tail
    assert [first.output_ids, second.output_ids] == [_alone(both, p) for p in prompts]
    assert run.scheduler.metrics.prefix_hit_tokens == PREFIX
    assert run.scheduler.metrics.prefix_query_tokens == len(prompts[0]) + len(prompts[1])
    run.assert_all_blocks_free()


def test_without_prefix_caching_every_prompt_is_computed_whole(model):
    prefix = _random_tokens(PREFIX, 0)
    prompts = [prefix + _random_tokens(7, 1), prefix + _random_tokens(5, 2)]
    run = _Run(model, prefix_caching=False)
    requests = [run.submit(prompts[0])]
    run.finish()
    requests.append(run.submit(prompts[1]))
    run.finish()
    assert [run.computed_prompt_tokens(r) for r in requests] == [len(p) for p in prompts]
    assert run.scheduler.metrics.prefix_hit_tokens == 0 and run.scheduler.cache.allocator.cached == 0
    assert "prefix caching off" in run.scheduler.describe()
    served = make_scheduler(model, ServeMetrics(), max_batch=2, max_tokens_per_step=64, prefix_caching=False)
    assert not served.prefix_caching  # what `lmforge serve --no-prefix-cache` builds


def test_a_prompt_identical_to_a_cached_one_computes_its_last_block_only(model):
    """A 40-token prompt fills ten blocks; asked again, nine are taken from the cache and
    the tenth is computed anew for the last token's logits (cached blocks are never written)."""
    prompt = _random_tokens(PREFIX, 3)
    run = _Run(model)
    requests = [run.submit(prompt)]
    run.finish()
    requests.append(run.submit(prompt))
    run.finish()
    assert [run.computed_prompt_tokens(r) for r in requests] == [PREFIX, BLOCK]
    assert [r.output_ids for r in requests] == [_alone(model, prompt)] * 2
    run.assert_all_blocks_free()


def test_identical_prompts_admitted_together_are_each_computed_and_cached_once(model):
    prompt = _random_tokens(PREFIX, 3)
    run = _Run(model)
    requests = [run.submit(prompt), run.submit(prompt)]
    run.finish()
    assert [run.computed_prompt_tokens(r) for r in requests] == [PREFIX, PREFIX]  # nothing was cached yet
    assert [r.output_ids for r in requests] == [_alone(model, prompt)] * 2
    allocator = run.scheduler.cache.allocator
    assert allocator.cached == len(allocator.block_of_key) == len(set(allocator.block_of_key.values()))
    run.assert_all_blocks_free()


def test_lru_eviction_in_a_tiny_pool_evicts_a_prefix_tail_first_and_keeps_tokens_exact(model):
    """16 blocks of 4 tokens. A (44-token prompt, 8 new tokens) leaves 12 full blocks cached;
    B (40 other tokens) needs 12 blocks: the 4 never cached, then A's 8 least recently used
    — its tail, released last first — so asked again, A finds its first 4 blocks only."""
    prompt_a, prompt_b = _random_tokens(44, 4), _random_tokens(PREFIX, 6)
    run = _Run(model, kv_blocks=16)
    a = run.submit(prompt_a)
    run.finish()
    allocator = run.scheduler.cache.allocator
    assert allocator.cached == (len(prompt_a) + len(a.output_ids) - 1) // BLOCK == 12
    b = run.submit(prompt_b)
    run.finish()
    again = run.submit(prompt_a)
    run.finish()
    assert run.computed_prompt_tokens(b) == PREFIX and len(b.output_ids) == NEW_TOKENS  # 47 tokens cached
    assert run.computed_prompt_tokens(again) == len(prompt_a) - 4 * BLOCK
    assert [a.output_ids, b.output_ids, again.output_ids] == [_alone(model, p) for p in (prompt_a, prompt_b, prompt_a)]
    run.assert_all_blocks_free()


def test_preemption_among_requests_sharing_prefix_blocks_recomputes_and_drops_nothing(model):
    """Five requests on a common 24-token prefix, one joining per step, in a 20-block pool
    (80 tokens): newer ones are preempted and recomputed, taking the shared blocks (and their
    own, where not evicted) from the cache again."""
    prefix = _random_tokens(24, 6)
    prompts = [prefix + _random_tokens(length, 10 + length) for length in (9, 17, 3, 12, 6)]
    run = _Run(model, kv_blocks=20)
    requests = []
    for prompt in prompts:
        requests.append(run.submit(prompt))
        run.scheduler.step()
    run.finish()
    assert run.scheduler.preemptions > 0
    assert [r.output_ids for r in requests] == [_alone(model, p) for p in prompts]
    assert run.scheduler.metrics.prefix_hit_tokens >= 24 * (len(prompts) - 1)
    run.assert_all_blocks_free()


def test_metrics_report_prefix_cache_hits_and_cached_blocks(model):
    prefix = _random_tokens(PREFIX, 0)
    run = _Run(model)
    run.submit(prefix + [7])
    run.finish()
    run.submit(prefix + [9])
    run.finish()
    text = run.scheduler.metrics.render()
    assert f"lmforge_prefix_cache_hit_tokens_total {PREFIX}" in text
    assert f"lmforge_prefix_cache_query_tokens_total {2 * (PREFIX + 1)}" in text
    assert f"lmforge_prefix_cache_blocks {run.scheduler.cache.allocator.cached}" in text
    assert run.scheduler.cache.allocator.cached > PREFIX // BLOCK
