"""Long context: streaming heads (DuoAttention) and sparse prefill (MInference) against dense.

One process. For each prompt length (1,024 and 2,048 tokens, and 4,096 — beyond the
reference model's 2,048-token training length, marked as such) and each configuration:
prefill time (HF `generate` with one new token, lmforge dense and the configuration, timed
alternately so that machine drift cancels out of the ratios), decode tokens/s after the long
prompt (timed by a streamer from the first new token to the last), KV-cache bytes, and quality on held-out windows
of that length against the original model: perplexity change, top-1 agreement, KL, and the
long-range copy task (accuracy of the configuration next to the dense model's). Programs
whose cache decides while decoding (kv_evict) are scored by teacher-forced decoding of the
second half of each window (and of the copy task's cue and answer after the document).

The head gates are trained once (the first streaming row); the other streaming rows reuse
its scores through the saved attention_patterns.json at another fraction.

    python benchmarks/long_context.py [--checkpoint DIR] [--lengths 1024 2048 4096] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmforge
from lmforge.benchmarking import hf_kv_cache_bytes, run_alternately
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import CalibrationConfig, CalibrationData, decoded_logits, makes_decode_time_decisions
from lmforge.passes.long_range import build_copy_task
from lmforge.runtime.kv_cache import kv_cache_bytes

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
TRAINED_LENGTH = 2048


def _recipe(checkpoint: Path, passes: str) -> str:
    return (f"calibration: {{data: {checkpoint / 'heldout.txt'}, samples: 4, eval_samples: 4, seq_len: 256}}\n"
            f"passes:\n  - name: cleanup\n{passes}  - name: fuse_projections\nruntime: {{max_seq_len: 4200}}\n")


def _configurations(patterns: Path, gate_steps: int) -> list[tuple[str, str]]:
    streaming = "  - name: streaming_heads\n    sink: 4\n    window: 256\n"
    reuse = f"{streaming}    patterns: {patterns}\n"
    sparse = "  - name: sparse_prefill\n    min_length: 1024\n    seq_len: 2048\n"
    return [
        ("lmforge dense", ""),
        ("streaming 50% (gates)", f"{streaming}    method: gates\n    gate_steps: {gate_steps}\n    streaming_fraction: 0.5\n"),
        ("streaming 75% (gates)", f"{reuse}    streaming_fraction: 0.75\n"),
        ("streaming 87.5% (gates)", f"{reuse}    streaming_fraction: 0.875\n"),
        ("streaming 100% (every head)", f"{reuse}    streaming_fraction: 1.0\n"),
        ("streaming, largest ≤5% ppl (gates)", f"{reuse}    quality_budget: {{max_ppl_increase: 0.05}}\n"),
        ("streaming 75% (attention mass)", f"{streaming}    method: attention_mass\n    streaming_fraction: 0.75\n"),
        ("sparse_prefill budget 8", f"{sparse}    budget: 8\n"),
        ("sparse_prefill budget 4", f"{sparse}    budget: 4\n"),
        ("streaming 75% + sparse_prefill 8", f"{reuse}    streaming_fraction: 0.75\n{sparse}    budget: 8\n"),
        ("kv_evict 512 tokens/head", "  - name: kv_evict\n    capacity: 512\n    recent: 64\n"),
        ("kv_evict 256 tokens/head", "  - name: kv_evict\n    capacity: 256\n    recent: 64\n"),
    ]


def _logits_fn(compiled, prompt_len: int):
    """Logits as generation computes them: a prefill of `prompt_len` tokens, then decoding
    for programs whose cache makes decisions (eviction); one forward otherwise."""
    if makes_decode_time_decisions(compiled.program):
        return lambda ids: decoded_logits(compiled.program, ids, prompt_len)
    return lambda ids: compiled(ids).logits


class _DecodeClock:
    """A generation streamer (HF's and lmforge's call `put` with the prompt, then with each
    new token) that times the tokens after the first: decode speed without the prefill."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_seconds(self) -> tuple[float, int]:
        """Seconds from the first new token to the last, and the tokens decoded in them."""
        return self.stamps[-1] - self.stamps[1], len(self.stamps) - 2


def _timings(hf, dense, compiled, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Median prefill seconds (one new token) and decode tokens/s (tokens after the first)."""
    def timed(generate, tokens):
        def run():
            clock = _DecodeClock()
            start = time.perf_counter()
            generate(tokens, clock)
            return time.perf_counter() - start, clock
        return run

    def hf_generate(tokens, clock):
        with torch.no_grad():
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                        do_sample=False, streamer=clock)

    def lmforge_generate(model):
        return lambda tokens, clock: model.generate(prompt, max_new_tokens=tokens, eos_token_id=[], streamer=clock)

    engines = {"hf": hf_generate, "dense": lmforge_generate(dense), "this": lmforge_generate(compiled)}
    prefill = run_alternately({name: timed(generate, 1) for name, generate in engines.items()}, repeats)
    decode = run_alternately({name: timed(generate, new_tokens) for name, generate in engines.items()}, repeats)
    return {
        "prefill": {name: statistics.median(seconds for seconds, _ in runs) for name, runs in prefill.items()},
        "decode": {name: statistics.median(count / seconds for seconds, count in (clock.decode_seconds()
                                                                                    for _, clock in runs))
                   for name, runs in decode.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--gate-steps", type=int, default=120)
    parser.add_argument("--only", nargs="+", default=None,
                        help="measure only the configurations whose label contains one of these strings (and dense)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    text_config = CalibrationConfig(data=str(args.checkpoint / "heldout.txt"), samples=1, eval_samples=1, seq_len=256)
    evaluation = {length: CalibrationData.from_config(text_config, tokenizer, hf).at_length(length, 1, args.eval_windows)
                  for length in args.lengths}
    copy_tasks = {length: build_copy_task(data.ids("heldout")) for length, data in evaluation.items()}
    dense_copy = {length: task.accuracy(lambda ids: hf(ids).logits) for length, task in copy_tasks.items()}
    control_copy = {length: task.control().accuracy(lambda ids: hf(ids).logits) for length, task in copy_tasks.items()}
    workdir = Path(tempfile.mkdtemp(prefix="lmforge-long-context-"))
    patterns = workdir / "gates-artifact"
    configurations = _configurations(patterns, args.gate_steps)
    if args.only:
        configurations = [(label, passes) for label, passes in configurations
                          if label == "lmforge dense" or any(part in label for part in args.only)]
    rows, dense = [], None
    with Progress(console=Console(stderr=True), disable=args.json) as progress:
        task = progress.add_task("compiling", total=len(configurations))
        for label, passes in configurations:
            progress.update(task, description=label)
            start = time.perf_counter()
            try:
                compiled = lmforge.optimize(args.checkpoint, _recipe(args.checkpoint, passes))
            except LmforgeError as error:
                rows.append({"configuration": label, "error": str(error)})
                progress.advance(task)
                continue
            compile_seconds = time.perf_counter() - start
            if "method: gates" in passes:
                compiled.save(patterns)
            dense = dense or compiled
            for length in args.lengths:
                prompt = evaluation[length].ids("heldout")[:1]
                timing = _timings(hf, dense, compiled, prompt, args.new_tokens, args.repeats)
                quality = evaluation[length].program_quality(compiled.program)  # decodes when the cache decides
                copy_task = copy_tasks[length]
                copy_prompt = length - copy_task.cue - copy_task.answer
                rows.append({
                    "configuration": label, "length": length, "beyond_training": length > TRAINED_LENGTH,
                    "prefill_ms": {name: 1000 * value for name, value in timing["prefill"].items()},
                    "decode_tokens_per_second": timing["decode"],
                    "kv_bytes": kv_cache_bytes(compiled.program.meta["kv_cache"], length),
                    "hf_kv_bytes": hf_kv_cache_bytes(hf.config, length),
                    "quality": quality.as_dict(),
                    "copy_accuracy": copy_task.accuracy(_logits_fn(compiled, copy_prompt)),
                    "dense_copy_accuracy": dense_copy[length],
                    "dense_copy_accuracy_without_source": control_copy[length],
                    "compile_seconds": compile_seconds,
                })
            progress.advance(task)
    if args.json:
        json.dump({"rows": rows}, sys.stdout, indent=2)
        return
    table = Table(title=f"long context on {args.checkpoint.name}: batch 1, {args.new_tokens} new tokens after the "
                        f"prompt; quality on {args.eval_windows} held-out windows per length (* beyond the "
                        f"{TRAINED_LENGTH}-token training length)")
    for column in ("configuration", "tokens", "prefill ms", "vs HF", "vs dense", "decode tok/s", "vs HF", "KV MiB",
                   "KV vs HF", "ppl Δ", "top-1", "KL", "copy acc (dense; dense without the source)"):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row(row["configuration"], *["—"] * 11, f"not reachable: {row['error']}")
            continue
        prefill, decode, quality = row["prefill_ms"], row["decode_tokens_per_second"], row["quality"]
        table.add_row(
            row["configuration"], f"{row['length']}{'*' if row['beyond_training'] else ''}", f"{prefill['this']:.0f}",
            f"{prefill['hf'] / prefill['this']:.2f}x", f"{prefill['dense'] / prefill['this']:.2f}x",
            f"{decode['this']:.0f}", f"{decode['this'] / decode['hf']:.2f}x", f"{row['kv_bytes'] / 2**20:.2f}",
            f"{row['hf_kv_bytes'] / row['kv_bytes']:.2f}x smaller", f"{quality['ppl_increase']:+.2%}",
            f"{quality['top1']:.3f}", f"{quality['kl']:.3f}",
            f"{row['copy_accuracy']:.3f} ({row['dense_copy_accuracy']:.3f}; "
            f"{row['dense_copy_accuracy_without_source']:.3f})",
        )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
