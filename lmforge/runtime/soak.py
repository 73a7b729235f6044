"""A soak workload: many `generate` calls of varying shapes on one model, with resident
memory sampled as they run. benchmarks/soak.py runs it long; tests/runtime/test_soak.py
short. Shapes vary because memory that grows with each new shape (see `runtime.buckets`)
is what a fixed-shape loop cannot show.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class SoakSample:
    calls: int
    resident_bytes: int
    seconds: float


def resident_bytes() -> int:
    """This process's resident set size (VmRSS), which is what the operating system charges
    it, native allocations included (tracemalloc sees only Python's)."""
    if not STATUS.exists():
        raise LmforgeError("resident memory is read from /proc/self/status, which this system does not have")
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LmforgeError("no VmRSS line in /proc/self/status")


def soak_requests(
    vocab_size: int,
    seed: int = 0,
    prompt_lengths: tuple[int, int] = (16, 115),
    batches: tuple[int, int] = (1, 3),
    new_tokens: tuple[int, int] = (8, 24),
) -> Iterator[tuple[torch.Tensor, int]]:
    """An endless, reproducible stream of (prompt ids, max_new_tokens), each drawn uniformly
    from the inclusive ranges."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    while True:
        shape = (rng.randint(*batches), rng.randint(*prompt_lengths))
        yield torch.randint(0, vocab_size, shape, generator=generator), rng.randint(*new_tokens)


def run_soak(
    generate: Callable[[torch.Tensor, int], torch.Tensor],
    requests: Iterator[tuple[torch.Tensor, int]],
    calls: int,
    every: int,
    on_sample: Callable[[SoakSample], None] | None = None,
) -> list[SoakSample]:
    """Call `generate(ids, max_new_tokens)` on `calls` of the `requests` (`soak_requests`),
    sampling resident memory before the first call and after every `every` calls."""
    start = time.perf_counter()
    samples = [SoakSample(0, resident_bytes(), 0.0)]
    for done, (ids, new) in enumerate(requests, start=1):
        if done > calls:
            break
        generate(ids, new)
        if done % every == 0:
            samples.append(SoakSample(done, resident_bytes(), time.perf_counter() - start))
            if on_sample is not None:
                on_sample(samples[-1])
    return samples


def growth_after_warmup(samples: list[SoakSample], warmup: int) -> float:
    """How much resident memory rose after the first `warmup` calls, as a fraction of what
    it was then: the highest later sample against the sample at `warmup` calls."""
    base = next((s for s in samples if s.calls >= warmup), None)
    later = [s.resident_bytes for s in samples if base is not None and s.calls > base.calls]
    if base is None or not later:
        raise LmforgeError(f"no samples after the {warmup}-call warm-up; run more calls or sample more often")
    return max(later) / base.resident_bytes - 1
