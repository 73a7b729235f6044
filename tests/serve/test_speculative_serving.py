"""Lossless speculation per request in a continuous batch. On saved and loaded artifacts of a
tiny random llama that draft by prompt lookup or with (untrained, tiny) Medusa heads,
requests joining at different steps each get exactly what `lmforge.load(...).generate` gives
them alone (greedy, and seeded sampling through the rejection rule), also under preemption
in a tiny block pool, and blocks held only by rejected drafts are freed at once. A random
model rarely continues a repetition, so a llama whose attention output is zeroed (its next
token depends on its last token only) walks a cycle of tokens: fed that cycle, prompt lookup
gets more than one token per forward, and a stop string inside an accepted chain ends the
request there."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import CharTokenizer, tiny_model

import lmforge
from lmforge.draft_heads import MedusaHeads, save_heads
from lmforge.runtime.paged import block_keys
from lmforge.runtime.sampling import SamplingParams
from lmforge.serve.continuous import ContinuousScheduler
from lmforge.serve.scheduler import GenerationParams, Request

NEW_TOKENS = 10
RUNTIME = "runtime: {max_seq_len: 96}"


@pytest.fixture(scope="module", params=["prompt_lookup", "draft_heads"])
def drafting(request, tmp_path_factory):
    """A loaded artifact of tiny llama that drafts by `request.param`."""
    model, directory = tiny_model("llama"), tmp_path_factory.mktemp(request.param)
    if request.param == "prompt_lookup":
        recipe = f"passes: [{{name: prompt_lookup, num_draft: 4}}]\n{RUNTIME}"
    else:
        save_heads(directory / "heads", MedusaHeads.initial(model.get_output_embeddings().weight, 3), model, {})
        recipe = f"passes: [{{name: draft_heads, path: {directory / 'heads'}}}]\n{RUNTIME}"
    lmforge.optimize(model, recipe).save(directory / "artifact")
    return lmforge.load(directory / "artifact")


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, 256, (length,), generator=generator).tolist() for length in (6, 21, 33, 14)]


_ALONE: dict[tuple, list[int]] = {}


def _alone(model, prompt: list[int], sampling: SamplingParams = SamplingParams()) -> list[int]:
    """What `generate` gives the prompt alone, cut after an end-of-sequence token (computed
    once per model, prompt and sampling)."""
    key = (id(model), tuple(prompt), sampling)
    if key not in _ALONE:
        _ALONE[key] = _generate_alone(model, prompt, sampling)
    return _ALONE[key]


def _generate_alone(model, prompt: list[int], sampling: SamplingParams) -> list[int]:
    new = model.engine.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, sampling=sampling)[0, len(prompt):]
    new = new.tolist()
    eos = set(model.engine.eos_token_ids)
    return new[: next((i for i, token in enumerate(new) if token in eos), len(new))]


def _scheduler(model, tokenizer=None, **options) -> ContinuousScheduler:
    return ContinuousScheduler(model.engine, tokenizer or CharTokenizer(), **{"max_batch": 8, "block_size": 4, **options})


def _submit(scheduler, prompt: list[int], sampling: SamplingParams = SamplingParams(), stop=()) -> Request:
    request = Request(prompt, GenerationParams(NEW_TOKENS, sampling, tuple(stop)), lambda event: None)
    scheduler.submit(request)
    return request


def _poison_past_computed(scheduler) -> None:
    """Fill the slots each running request holds past its computed tokens (rejected drafts'
    keys and values among them) with NaN: a query that read one would get NaN logits. Its
    prefix-cache keys cover its own computed tokens only."""
    block_size = scheduler.cache.block_size
    for sequence in scheduler.running:
        table = sequence.table
        assert len(table.blocks) == math.ceil(sequence.computed / block_size)  # no block of rejected slots only
        assert sequence.registered * block_size <= sequence.computed
        assert sequence.keys == block_keys(sequence.tokens[: len(sequence.keys) * block_size], block_size)
        slots = torch.tensor(table.slots(sequence.computed, len(table.blocks) * block_size, block_size), dtype=torch.long)
        for pool in scheduler.cache.pools:
            for tensor in pool or ():
                tensor.index_fill_(2, slots, float("nan"))


def _run(scheduler, prompts, samplings=None) -> list[Request]:
    """One request joins per step, then steps run until every request is done; after every
    step the slots past each running request's computed tokens are poisoned."""
    requests = []
    for index, prompt in enumerate(prompts):
        requests.append(_submit(scheduler, prompt, samplings[index] if samplings else SamplingParams()))
        scheduler.step()
        _poison_past_computed(scheduler)
    while scheduler.step():
        _poison_past_computed(scheduler)
    return requests


def test_staggered_requests_with_drafts_each_get_their_tokens_alone(drafting, prompts):
    """Greedy requests, and a seeded sampled one: its drafts go through the rejection rule,
    drawing from its generator as `generate` does, so it gets `generate`'s sample."""
    samplings = [SamplingParams(), SamplingParams(), SamplingParams(),
                 SamplingParams(do_sample=True, temperature=0.7, top_k=20, seed=1)]
    scheduler = _scheduler(drafting)
    requests = _run(scheduler, prompts, samplings)
    assert [r.output_ids for r in requests] == [_alone(drafting, p, s) for p, s in zip(prompts, samplings)]
    assert scheduler.metrics.draft_tokens > scheduler.metrics.accepted_draft_tokens  # some drafts were rejected
    assert scheduler.cache.allocator.free == scheduler.cache.allocator.count
    rendered = scheduler.metrics.render()
    assert f"lmforge_accepted_draft_tokens_total {scheduler.metrics.accepted_draft_tokens}" in rendered


@pytest.fixture(scope="module")
def looping():
    """A tiny llama with prompt lookup whose next token depends on its last one only, and a
    prompt that walks one of its cycles of 4 or more tokens four times."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        following = model(torch.arange(model.config.vocab_size)[:, None]).logits[:, -1].argmax(-1).tolist()
    for start in range(len(following)):
        walk = [start]
        while following[walk[-1]] not in walk:
            walk.append(following[walk[-1]])
        cycle = walk[walk.index(following[walk[-1]]):]
        if len(cycle) >= 4:
            break
    compiled = lmforge.optimize(model, f"passes: [{{name: prompt_lookup, num_draft: 4}}]\n{RUNTIME}")
    return compiled, cycle * 4


def test_a_repetitive_prompt_gets_more_than_one_token_per_forward(looping):
    model, prompt = looping
    scheduler, forwards = _scheduler(model), []
    forward = scheduler.forward
    scheduler.forward = lambda pieces: forwards.append(pieces) or forward(pieces)
    requests = [_submit(scheduler, prompt), _submit(scheduler, prompt[1:])]
    while scheduler.step():
        pass
    assert [r.output_ids for r in requests] == [_alone(model, prompt), _alone(model, prompt[1:])]
    assert sum(len(r.output_ids) for r in requests) / len(forwards) > 2  # two requests, each > 1 per forward
    assert scheduler.metrics.accepted_draft_tokens > 0


@pytest.mark.parametrize("drafting", ["draft_heads"], indirect=True)  # heads draft at every step
def test_preemption_under_a_tiny_block_pool_with_drafts_changes_no_token(drafting, prompts):
    scheduler = _scheduler(drafting, kv_blocks=11)  # 44 tokens: the longest request (33 + 10) and little else
    requests = _run(scheduler, prompts)
    assert scheduler.preemptions > 0 and scheduler.metrics.draft_tokens > 0
    assert [r.output_ids for r in requests] == [_alone(drafting, prompt) for prompt in prompts]
    assert scheduler.cache.allocator.free == 11


class DistinctTokenizer:
    """Every token decodes to its own character, so a stop string can name one token."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x100 + int(token)) for token in ids)


def test_a_stop_string_inside_an_accepted_chain_ends_the_request_there(looping):
    model, prompt = looping
    expected = _alone(model, prompt)
    scheduler, steps = _scheduler(model, DistinctTokenizer()), []
    request = _submit(scheduler, prompt)
    while scheduler.step():
        steps.append(len(request.output_ids))
    assert request.output_ids == expected
    # a token that arrived with a later one in the same step, and appears nowhere before it
    inside = [index for before, after in zip([0, *steps], steps) for index in range(before, after - 1)
              if expected[index] not in expected[:index]]
    assert inside, "no step accepted a draft: the test needs a chain to stop inside"
    stop = inside[0]
    scheduler = _scheduler(model, DistinctTokenizer())
    request = _submit(scheduler, prompt, stop=[DistinctTokenizer().decode([expected[stop]])])
    while scheduler.step():
        pass
    assert request.finish_reason == "stop" and request.output_ids == expected[: stop + 1]
    assert scheduler.cache.allocator.free == scheduler.cache.allocator.count
