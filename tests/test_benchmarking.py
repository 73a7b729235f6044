"""Benchmark helpers: engines are timed alternately, and held-out text is split between the
half draft heads train on and the half benchmark prompts come from."""

import torch

from lmforge.benchmarking import prompt_text_for, run_alternately, split_heldout, text_windows, time_alternating


def test_engines_run_in_turn_after_one_warm_up_each():
    calls = []
    results = run_alternately({name: lambda name=name: calls.append(name) or len(calls) for name in "abc"}, repeats=3)
    assert calls == list("abc") * 4
    assert results == {"a": [4, 7, 10], "b": [5, 8, 11], "c": [6, 9, 12]}


def test_alternate_timing_counts_new_tokens_of_every_row():
    timings = time_alternating({"short": lambda: torch.zeros(2, 8), "long": lambda: torch.zeros(2, 15)}, 5, repeats=2)
    assert timings["short"].new_tokens == 2 * 3 and timings["long"].new_tokens == 2 * 10
    assert timings["long"].output.shape == (2, 15) and timings["long"].seconds >= 0


def test_benchmark_prompts_come_from_the_half_heads_do_not_train_on(ref_path, ref_tokenizer):
    text = (ref_path / "heldout.txt").read_text()
    training, prompts = split_heldout(text)
    assert training + prompts == text and abs(len(training) - len(prompts)) <= 1
    assert prompt_text_for(ref_path) == prompts
    windows = text_windows(training, ref_tokenizer, 128)
    assert windows.shape[0] == len(ref_tokenizer(training).input_ids) // 128
