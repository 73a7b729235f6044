"""Timing helpers shared by `lmforge bench` and the scripts in benchmarks/.

Each measurement warms up first (so one-time allocation and lazy initialisation are not
counted) and reports the median of several timed runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Timing:
    seconds: float
    new_tokens: int
    output: torch.Tensor

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds


def time_generation(generate: Callable[[], torch.Tensor], prompt_len: int, repeats: int = 3) -> Timing:
    """Median wall time of `generate()` after one warm-up call; counts new tokens of all rows."""
    output = generate()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = generate()
        durations.append(time.perf_counter() - start)
    new_tokens = output.shape[0] * (output.shape[1] - prompt_len)
    return Timing(statistics.median(durations), new_tokens, output)


def time_alternating(generators: dict[str, Callable[[], torch.Tensor]], prompt_len: int, repeats: int = 5) -> dict[str, Timing]:
    """Like `time_generation` for several engines at once, alternating them run by run, so
    that drifts in machine speed hit all of them alike and their ratios stay meaningful."""
    outputs = {name: generate() for name, generate in generators.items()}
    durations: dict[str, list[float]] = {name: [] for name in generators}
    for _ in range(repeats):
        for name, generate in generators.items():
            start = time.perf_counter()
            outputs[name] = generate()
            durations[name].append(time.perf_counter() - start)
    return {
        name: Timing(statistics.median(durations[name]), outputs[name].shape[0] * (outputs[name].shape[1] - prompt_len),
                     outputs[name])
        for name in generators
    }


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


def prompt_text_for(checkpoint: str | Path | None) -> str:
    """Held-out text shipped beside a checkpoint (heldout.txt), else a short code sample."""
    if checkpoint is not None and (Path(checkpoint) / "heldout.txt").is_file():
        return (Path(checkpoint) / "heldout.txt").read_text()
    return "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n" * 40
