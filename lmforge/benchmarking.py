"""Timing helpers shared by `lmforge bench` and the scripts in benchmarks/.

Each measurement warms up first (so one-time allocation and lazy initialisation are not
counted) and reports the median of several timed runs. Engines compared with each other
(Hugging Face and lmforge, or several lmforge programs) are always timed alternately, run
by run on the same prompts (`run_alternately`), never one after the other: on a shared
machine the speed drifts, and timing one engine first would credit the drift to it.

Held-out text is split once for all: draft heads train on its first half
(`lmforge train-heads --first-half`, benchmarks/speculative.py) and benchmark prompts come
from its second half (`split_heldout`), so no benchmark prompts heads with text they saw.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from lmforge.errors import LmforgeError

T = TypeVar("T")


@dataclass
class Timing:
    seconds: float
    new_tokens: int
    output: torch.Tensor

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds


def run_alternately(runs: dict[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Each callable's results over `repeats` rounds, after one warm-up call each; every
    round calls all of them in turn, so that drifts in machine speed hit them alike."""
    for run in runs.values():
        run()
    results: dict[str, list[T]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def time_alternating(generators: dict[str, Callable[[], torch.Tensor]], prompt_len: int, repeats: int = 5) -> dict[str, Timing]:
    """Median wall time of each `generate()` (new tokens of all rows counted), the engines
    alternating run by run (`run_alternately`) so that their ratios stay meaningful."""
    def timed(generate: Callable[[], torch.Tensor]) -> Callable[[], tuple[float, torch.Tensor]]:
        def run() -> tuple[float, torch.Tensor]:
            start = time.perf_counter()
            output = generate()
            return time.perf_counter() - start, output
        return run

    results = run_alternately({name: timed(generate) for name, generate in generators.items()}, repeats)
    timings = {}
    for name, runs in results.items():
        output = runs[-1][1]
        timings[name] = Timing(statistics.median(seconds for seconds, _ in runs),
                               output.shape[0] * (output.shape[1] - prompt_len), output)
    return timings


def hf_kv_cache_bytes(config, tokens: int, bytes_per_value: int = 4) -> int:
    """Bytes of a Hugging Face model's full KV cache for `tokens` tokens (keys and values,
    every layer and KV head): what the benchmarks compare lmforge's cache layouts with."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * bytes_per_value


def heldout_prompts(text: str, tokenizer, count: int, length: int, stride: int = 9973) -> list[list[int]]:
    """`count` prompts of `length` tokens cut from evenly spaced places of `text`."""
    prompts = []
    for index in range(count):
        start = (index * stride) % max(1, len(text) - 4 * length)
        ids = tokenizer(text[start : start + 8 * length]).input_ids[:length]
        prompts.append(ids)
    return prompts


def split_heldout(text: str) -> tuple[str, str]:
    """(the half draft heads may train on, the half benchmark prompts come from)."""
    middle = len(text) // 2
    return text[:middle], text[middle:]


def text_windows(text: str, tokenizer, seq_len: int) -> torch.Tensor:
    """All consecutive windows of `seq_len` tokens of `text`, `(windows, seq_len)`."""
    if tokenizer is None:
        raise LmforgeError("reading text needs the model's tokenizer; use a checkpoint directory that has one")
    ids = tokenizer(text).input_ids
    windows = len(ids) // seq_len
    return torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


def prompt_text_for(checkpoint: str | Path | None) -> str:
    """The prompt half of the held-out text shipped beside a checkpoint (heldout.txt), else
    a short code sample."""
    if checkpoint is not None and (Path(checkpoint) / "heldout.txt").is_file():
        return split_heldout((Path(checkpoint) / "heldout.txt").read_text())[1]
    return "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n" * 40
