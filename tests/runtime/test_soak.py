"""100 `generate` calls of varying prompt lengths on the reference model: resident memory
stops growing once every prompt-length bucket has been seen (`runtime.buckets`).

The bound is absolute, so it does not depend on what else the test process holds. Measured
on ref-llama-py (batch 1, prompts of 16–112 tokens, 1–2 new tokens, 50-call warm-up): with
length buckets the rise over the next 50 calls was 0–2.3 MiB in every run (8 runs, also at
batches of 1–3 and up to 24 new tokens); without them it was 65 MiB in a fresh process and
19 MiB in one whose primitive caches had already seen half of the lengths. 8 MiB is three
times the noise and well under the smallest leak. (Earlier tests in the same process fill
the process-wide caches too, which can only make a leak look smaller, never the fixed
runtime larger.)
"""

from lmforge.runtime.soak import run_soak, soak_requests

CALLS, EVERY, WARMUP = 100, 10, 50
BOUND = 8 * 2**20


def test_resident_memory_stays_flat_after_warmup(ref_compiled):
    requests = soak_requests(ref_compiled.program.config.vocab_size, seed=0, prompt_lengths=(16, 112), batches=(1, 1),
                             new_tokens=(1, 2))
    samples = run_soak(lambda ids, new: ref_compiled.generate(ids, max_new_tokens=new, eos_token_id=[]), requests,
                       CALLS, EVERY)
    base = next(sample.resident_bytes for sample in samples if sample.calls == WARMUP)
    rise = max(sample.resident_bytes for sample in samples if sample.calls > WARMUP) - base
    assert rise < BOUND, f"resident memory rose {rise / 2**20:.1f} MiB after the warm-up: {samples}"
