"""The serving scheduler on a real Engine running a toy program (no model, no HTTP): each
position's logits point at its token id + 1, so every answer is known in advance."""

from __future__ import annotations

import queue
import threading

import pytest
import torch
from transformers import AutoTokenizer

from lmforge.errors import LmforgeError
from lmforge.runtime.engine import Engine
from lmforge.runtime.sampling import SamplingParams
from lmforge.serve.scheduler import GenerationParams, Request, Scheduler

VOCAB = 4096
EOS = 4000
FAIL = 4001  # a prompt holding this token makes the program raise
LAYOUT = [{"cache": 0, "kv_heads": 1, "head_dim": 2}]


def count_up(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is the input token + 1: greedy decoding counts up."""
    if bool((input_ids == FAIL).any()):
        raise RuntimeError("the program failed")
    return torch.nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 10


@pytest.fixture(scope="module")
def tokenizer(ref_path):
    return AutoTokenizer.from_pretrained(ref_path)


@pytest.fixture
def scheduler(tokenizer):
    engine = Engine(count_up, LAYOUT, max_seq_len=64, eos_token_ids=[EOS], vocab_size=VOCAB, tokenizer=tokenizer)
    running = Scheduler(engine, tokenizer, max_batch=4, max_tokens_per_step=256)
    yield running
    running.stop()


def _submit(scheduler: Scheduler, prompt: list[int], **params) -> tuple[Request, queue.Queue]:
    events: queue.Queue = queue.Queue()
    request = Request(prompt, GenerationParams(**params), events.put)
    scheduler.submit(request)
    return request, events


def _drain(events: queue.Queue) -> list:
    received = []
    while not received or received[-1].finish_reason is None:
        received.append(events.get(timeout=60))
    return received


def test_rows_of_different_lengths_count_up_and_stop_at_their_own_limits(scheduler):
    waiting = [_submit(scheduler, prompt, max_tokens=limit) for prompt, limit in
               [([10, 11, 12], 5), ([100], 2), ([3995, 3996], 9)]]
    scheduler.start()
    results = [(request, _drain(events)) for request, events in waiting]
    assert results[0][0].output_ids == [13, 14, 15, 16, 17] and results[0][1][-1].finish_reason == "length"
    assert results[1][0].output_ids == [101, 102]
    assert results[2][0].output_ids == [3997, 3998, 3999] and results[2][1][-1].finish_reason == "stop"  # EOS
    assert [len(received) for _, received in results] == [6, 3, 5]  # tokens (EOS included) + the finish event
    assert scheduler.metrics.batch_sizes.count == 1  # all three started together


def test_a_stop_string_ends_the_request_and_streamed_pieces_add_up(scheduler, tokenizer):
    prompt = tokenizer("one two").input_ids
    scheduler.start()
    request, events = _submit(scheduler, [prompt[-1]], max_tokens=30)
    _drain(events)
    whole = tokenizer.decode(request.output_ids, skip_special_tokens=True)
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    request, events = _submit(scheduler, [prompt[-1]], max_tokens=30, stop=(stop,))
    received = _drain(events)
    assert "".join(event.text for event in received) == request.emitted == whole[: whole.index(stop)]
    assert received[-1].finish_reason == "stop"


def test_a_failing_batch_ends_its_requests_with_an_error_and_the_worker_goes_on(scheduler):
    scheduler.start()
    _, events = _submit(scheduler, [FAIL], max_tokens=3)
    assert _drain(events)[-1].error == "the program failed"
    request, events = _submit(scheduler, [7], max_tokens=2)
    _drain(events)
    assert request.output_ids == [8, 9]


def test_a_cancelled_request_stops_and_its_row_is_freed(scheduler):
    gate = threading.Event()
    original = scheduler.update

    def update_after_gate(batch, logits):
        gate.wait(timeout=60)
        return original(batch, logits)

    scheduler.update = update_after_gate
    scheduler.start()
    request, events = _submit(scheduler, [20], max_tokens=40)
    queued, queued_events = _submit(scheduler, [30], max_tokens=2)
    scheduler.cancel(request)
    gate.set()
    assert _drain(events)[-1].finish_reason == "cancelled" and request.output_ids == []
    _drain(queued_events)
    assert queued.output_ids == [31, 32]
    assert scheduler.metrics.requests == {"cancelled": 1, "length": 1}


def test_requests_the_cache_cannot_hold_are_refused(scheduler):
    with pytest.raises(LmforgeError, match="exceeds the model's context of 64"):
        _submit(scheduler, [1] * 60, max_tokens=5)


def test_seeded_rows_sample_as_they_would_alone(scheduler):
    sampled = dict(max_tokens=6, sampling=SamplingParams(do_sample=True, temperature=50.0, seed=3))
    together = [_submit(scheduler, [5], **sampled) for _ in range(3)] + [_submit(scheduler, [9], max_tokens=6)]
    scheduler.start()
    for _, events in together:
        _drain(events)
    alone, events = _submit(scheduler, [5], **sampled)
    _drain(events)
    assert alone.output_ids != [6, 7, 8, 9, 10, 11]  # sampled, not the greedy count
    assert [request.output_ids for request, _ in together[:3]] == [alone.output_ids] * 3
    assert together[3][0].output_ids == [10, 11, 12, 13, 14, 15]
