"""Decode speed: Hugging Face `generate` vs lmforge, one process, same held-out prompts.

Prints tokens/s, the ratio to HF, whether greedy tokens are identical, and a per-token
time breakdown of one lmforge decode step (torch.profiler). Also measures each codegen
backend and the recipe with and without `fuse_projections`, so every lever is measured.

    python benchmarks/decode.py [--checkpoint DIR] [--new-tokens 64] [--inductor] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmforge
from lmforge.benchmarking import heldout_prompts, time_generation

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
RECIPE = """
passes:
{passes}
codegen: {{backend: {backend}}}
runtime: {{max_seq_len: 1024}}
"""


def _recipe(backend: str, fuse: bool) -> str:
    names = ["cleanup", "fuse_projections", "verify"] if fuse else ["cleanup", "verify"]
    return RECIPE.format(passes="\n".join(f"  - name: {n}" for n in names), backend=backend)


def _profile_step(model, ids: torch.Tensor, steps: int = 30) -> list[tuple[str, float, int]]:
    """Self CPU time per operator for one decode step, averaged over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    engine = model.engine
    engine._ensure_cache(1, ids.shape[1] + steps + 1)
    engine.step(ids, torch.arange(ids.shape[1])[None], 0, None)
    token = ids[:, -1:]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            position = ids.shape[1] + i
            engine.step(token, torch.tensor([[position]]), position, None)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / steps, e.count // steps) for e in rows[:12]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inductor", action="store_true", help="also measure codegen backend inductor (slow compile)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    text = (args.checkpoint / "heldout.txt").read_text()
    hf = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    variants = [("lmforge aten + fused", "aten", True), ("lmforge aten, no fusion", "aten", False), ("lmforge fx + fused", "fx", True)]
    if args.inductor:
        variants.append(("lmforge inductor + fused", "inductor", True))
    models = {name: lmforge.optimize(args.checkpoint, _recipe(backend, fuse)) for name, backend, fuse in variants}
    probe = torch.tensor([heldout_prompts(text, tokenizer, 1, args.prompt_len)[0]])
    warmup_seconds = {}
    for name, model in models.items():  # first calls compile (inductor) or initialise lazily
        start = time.perf_counter()
        model.generate(probe, max_new_tokens=4, eos_token_id=[])
        warmup_seconds[name] = time.perf_counter() - start
    rows = []
    for batch in (1, 4):
        prompts = heldout_prompts(text, tokenizer, batch, args.prompt_len)
        ids = torch.tensor([p[: args.prompt_len] for p in prompts])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            hf_timing = time_generation(
                lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                    min_new_tokens=args.new_tokens, do_sample=False),
                ids.shape[1], args.repeats,
            )
        rows.append({"batch": batch, "engine": "HF generate (eager PyTorch, sdpa)",
                     "tokens_per_second": hf_timing.tokens_per_second, "ratio": 1.0, "identical": None})
        for name, model in models.items():
            timing = time_generation(
                lambda: model.generate(ids, mask, max_new_tokens=args.new_tokens, eos_token_id=[]),
                ids.shape[1], args.repeats,
            )
            rows.append({"batch": batch, "engine": name, "tokens_per_second": timing.tokens_per_second,
                         "first_call_seconds": warmup_seconds[name],
                         "ratio": timing.tokens_per_second / hf_timing.tokens_per_second,
                         "identical": bool(torch.equal(timing.output, hf_timing.output))})
    breakdown = _profile_step(models["lmforge aten + fused"], probe)
    if args.json:
        json.dump({"rows": rows, "step_breakdown_us": breakdown}, sys.stdout, indent=2)
        return
    console = Console()
    table = Table(title=f"greedy decode on {args.checkpoint.name}: prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    for column in ("batch", "engine", "tokens/s", "ratio to HF", "identical to HF greedy", "first call s"):
        table.add_column(column)
    for row in rows:
        identical = "—" if row["identical"] is None else ("yes" if row["identical"] else "NO")
        first = f"{row['first_call_seconds']:.1f}" if "first_call_seconds" in row else "—"
        table.add_row(str(row["batch"]), row["engine"], f"{row['tokens_per_second']:.1f}", f"{row['ratio']:.2f}", identical, first)
    console.print(table)
    steps = Table(title="one lmforge decode step (batch 1), self CPU time per operator")
    for column in ("operator", "µs per token", "calls per token"):
        steps.add_column(column)
    for key, micros, calls in breakdown:
        steps.add_row(key, f"{micros:.0f}", str(calls))
    console.print(steps)


if __name__ == "__main__":
    main()
