"""Threads: two threads generating on one model take turns on its one cache, and models (or
cache-free forwards) in different threads run at once on per-thread forward contexts; in
every case each thread gets exactly what it gets alone."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lmforge
from tiny_models import tiny_model

RECIPE = "runtime: {max_seq_len: 128}\n"
ROUNDS = 4


def _prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    return lmforge.optimize(tiny_model("llama", seed=0), RECIPE), lmforge.optimize(tiny_model("qwen2", seed=1), RECIPE)


def _in_threads(*jobs):
    """Run each job `ROUNDS` times in its own thread, all threads released at once; the
    results of every round, per job."""
    start = threading.Barrier(len(jobs))

    def repeat(job):
        start.wait()
        return [job() for _ in range(ROUNDS)]

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [future.result() for future in [pool.submit(repeat, job) for job in jobs]]


def test_two_threads_generating_on_one_model_get_their_sequential_results(models):
    model = models[0]
    first, second = _prompt(1, 12, 0), _prompt(2, 30, 1)
    jobs = [lambda: model.generate(first, max_new_tokens=20, eos_token_id=[]),
            lambda: model.generate(second, max_new_tokens=14, eos_token_id=[])]
    expected = [job() for job in jobs]
    for results, alone in zip(_in_threads(*jobs), expected):
        assert all(torch.equal(result, alone) for result in results)


def test_two_models_in_two_threads_get_their_sequential_results(models):
    first, second = _prompt(1, 20, 2), _prompt(3, 9, 3)
    jobs = [lambda: models[0].generate(first, max_new_tokens=20, eos_token_id=[]),
            lambda: models[1].generate(second, max_new_tokens=20, eos_token_id=[])]
    expected = [job() for job in jobs]
    for results, alone in zip(_in_threads(*jobs), expected):
        assert all(torch.equal(result, alone) for result in results)


def test_forwards_in_two_threads_get_their_sequential_logits(models):
    model = models[0]
    first, second = _prompt(2, 40, 4), _prompt(1, 7, 5)
    jobs = [lambda: model(first).logits, lambda: model(second).logits]
    expected = [job() for job in jobs]
    for results, alone in zip(_in_threads(*jobs), expected):
        assert all(torch.equal(result, alone) for result in results)
