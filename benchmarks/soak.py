"""Soak: 1,000 `generate` calls on one model, prompts of 16–115 tokens, batches of 1–3 and
8–24 new tokens drawn at random, resident memory sampled every 50 calls. Prints the table
and the growth after the warm-up (the first 100 calls: one-time allocations such as the
KV cache and the kernels' primitives for each shape bucket); the target is under 5 %.

    python benchmarks/soak.py [--checkpoint DIR] [--calls 1000] [--every 50] [--warmup 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

import lmforge
from lmforge.runtime.soak import SoakSample, growth_after_warmup, run_soak, soak_requests

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
TARGET = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--recipe", default=None, help="recipe file (default: lmforge's default recipe)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    console = Console()
    model = lmforge.optimize(args.checkpoint, args.recipe)

    def progress(sample: SoakSample) -> None:
        console.print(f"{sample.calls} calls: {sample.resident_bytes / 2**20:.0f} MiB, {sample.seconds:.0f} s")

    samples = run_soak(lambda ids, new: model.generate(ids, max_new_tokens=new, eos_token_id=[]),
                       soak_requests(model.program.config.vocab_size, args.seed), args.calls, args.every, progress)
    base = next(s for s in samples if s.calls >= args.warmup)
    table = Table(title=f"resident memory over {args.calls} generate calls ({args.checkpoint.name})")
    for column in ("calls", "RSS MiB", "vs warm-up", "elapsed s"):
        table.add_column(column, justify="right")
    for sample in samples:
        change = sample.resident_bytes / base.resident_bytes - 1
        table.add_row(str(sample.calls), f"{sample.resident_bytes / 2**20:.0f}", f"{change:+.1%}",
                      f"{sample.seconds:.0f}")
    console.print(table)
    growth = growth_after_warmup(samples, args.warmup)
    verdict = "within" if growth < TARGET else "OVER"
    console.print(f"growth after the {args.warmup}-call warm-up: {growth:+.2%} ({verdict} the {TARGET:.0%} target)")


if __name__ == "__main__":
    main()
