"""Decode speed: Hugging Face `generate` vs lmforge, one process, same held-out prompts.

Prints tokens/s (HF and every lmforge variant timed alternately, run by run), the ratio to
HF, whether greedy tokens are identical, and each lmforge row's physical limit: the weight
bytes a decode step reads divided by the memory bandwidth measured here (a streaming read of
a buffer far larger than the caches, median of several runs). Beside it, every lmforge
engine's decode step at each batch split into matrix products, attention and the rest
(torch.profiler on a few steps after warm-up; `lmforge.benchmarking_breakdown`), and the
operators that take most of one step. Also measures each codegen
backend, the recipe with and without `fuse_projections` and without packed weights, so
every lever is measured; and the model's matrix products alone, one after another as a
forward runs them, with plain and with oneDNN-packed weights at 1, 4 and 11 rows (what a
decode step and a verify forward of drafted tokens multiply), with the weight bytes they
read per second.

    python benchmarks/decode.py [--checkpoint DIR] [--new-tokens 64] [--inductor] [--cpp] [--threads N]
                                [--bandwidth-mb 512] [--profile-steps 8] [--json]

`--cpp` adds the compiled backend (its buckets compile during warm-up, reported as first-call
seconds); `--threads` sets torch's intra-op threads for every engine, HF included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.columns import Columns
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmforge
from lmforge.benchmarking import heldout_prompts, prompt_text_for, run_alternately, time_alternating
from lmforge.benchmarking_breakdown import (
    breakdown_table,
    limit_tokens_per_second,
    outside_compiled_table,
    profile_decode_steps,
    read_bandwidth,
    step_weight_bytes,
)
from lmforge.codegen.cpu_kernels import packed_linear

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
RECIPE = """
passes:
{passes}
codegen: {{backend: {backend}, pack_weights: {pack}}}
runtime: {{max_seq_len: 1024}}
"""


def _recipe(backend: str, fuse: bool, pack: bool = True) -> str:
    names = ["cleanup", "fuse_projections", "verify"] if fuse else ["cleanup", "verify"]
    return RECIPE.format(passes="\n".join(f"  - name: {n}" for n in names), backend=backend, pack=str(pack).lower())


def _weight_products(model, rounds: int = 5) -> list[dict]:
    """Time the program's linear weights multiplied one after another (a forward's worth
    of matrix products), plain `F.linear` vs packed, for a few row counts: the median of
    `rounds` blocks of 10 chains, plain and packed blocks alternating."""
    weights = [node.args[1] for node in model.program.graph_module.graph.nodes
               if node.target is torch.ops.aten.linear.default and node.args[1].op == "get_attr"]
    weights = [getattr(model.program.graph_module, node.target) for node in weights]
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    kernels = {"plain": [lambda x, w=w: torch.nn.functional.linear(x, w) for w in weights],
               "packed": [packed_linear(w) for w in weights]}
    rows = []
    for count in (1, 4, 11):
        inputs = [torch.randn(count, w.shape[1]) for w in weights]

        def chain_ms(products, inputs=inputs) -> float:
            start = time.perf_counter()
            for _ in range(10):
                for product, x in zip(products, inputs):
                    product(x)
            return (time.perf_counter() - start) / 10 * 1e3

        blocks = run_alternately({name: lambda p=products: chain_ms(p) for name, products in kernels.items()}, rounds)
        for name, times in blocks.items():
            milliseconds = statistics.median(times)
            rows.append({"rows": count, "weights": name, "ms": milliseconds, "megabytes": megabytes,
                         "gigabytes_per_second": megabytes / milliseconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inductor", action="store_true", help="also measure codegen backend inductor (slow compile)")
    parser.add_argument("--cpp", action="store_true", help="also measure codegen backend cpp (compiles per bucket)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every engine")
    parser.add_argument("--bandwidth-mb", type=int, default=512, help="buffer streamed to measure memory bandwidth")
    parser.add_argument("--profile-steps", type=int, default=8, help="decode steps timed, then profiled, per row")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    text = prompt_text_for(args.checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    variants = [("lmforge aten + fused", "aten", True, True), ("lmforge aten + fused, plain weights", "aten", True, False),
                ("lmforge aten, no fusion", "aten", False, True), ("lmforge fx + fused", "fx", True, True)]
    if args.inductor:
        variants.append(("lmforge inductor + fused", "inductor", True, True))
    if args.cpp:
        variants.append(("lmforge cpp + fused", "cpp", True, True))
    models = {name: lmforge.optimize(args.checkpoint, _recipe(backend, fuse, pack)) for name, backend, fuse, pack in variants}
    probe = torch.tensor([heldout_prompts(text, tokenizer, 1, args.prompt_len)[0]])
    warmup_seconds = {}
    for name, model in models.items():  # first calls compile (inductor; cpp per batch) or initialise lazily
        start = time.perf_counter()
        for batch in (1, 4):
            model.generate(probe.expand(batch, -1), max_new_tokens=4, eos_token_id=[])
        warmup_seconds[name] = time.perf_counter() - start
    gigabytes_per_second = read_bandwidth(args.bandwidth_mb)
    rows, breakdowns = [], []
    for batch in (1, 4):
        prompts = heldout_prompts(text, tokenizer, batch, args.prompt_len)
        ids = torch.tensor([p[: args.prompt_len] for p in prompts])
        mask = torch.ones_like(ids)
        engines = {"hf": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                             min_new_tokens=args.new_tokens, do_sample=False)}
        for name, model in models.items():
            engines[name] = lambda model=model: model.generate(ids, mask, max_new_tokens=args.new_tokens, eos_token_id=[])
        with torch.no_grad():
            timings = time_alternating(engines, ids.shape[1], args.repeats)
        hf_timing = timings["hf"]
        rows.append({"batch": batch, "engine": "HF generate (eager PyTorch, sdpa)",
                     "tokens_per_second": hf_timing.tokens_per_second, "ratio": 1.0, "identical": None})
        for name, model in models.items():
            timing = timings[name]
            weight_bytes = step_weight_bytes(model.program)
            limit = limit_tokens_per_second(weight_bytes, gigabytes_per_second, batch)
            breakdown = profile_decode_steps(model.engine, batch, context=args.prompt_len, steps=args.profile_steps)
            breakdowns.append((name, breakdown))
            rows.append({"batch": batch, "engine": name, "tokens_per_second": timing.tokens_per_second,
                         "first_call_seconds": warmup_seconds[name],
                         "ratio": timing.tokens_per_second / hf_timing.tokens_per_second,
                         "identical": bool(torch.equal(timing.output, hf_timing.output)),
                         "step_weight_bytes": weight_bytes, "limit_tokens_per_second": limit,
                         "fraction_of_limit": timing.tokens_per_second / limit, "step_breakdown": breakdown.record()})
    top_ops = next(part for name, part in breakdowns if name == "lmforge aten + fused" and part.batch == 1).top_ops
    products = _weight_products(models["lmforge aten + fused"])
    if args.json:
        json.dump({"rows": rows, "read_bandwidth_gb_per_s": gigabytes_per_second, "top_ops_us": top_ops,
                   "weight_products": products}, sys.stdout, indent=2)
        return
    console = Console()
    table = Table(title=f"greedy decode on {args.checkpoint.name}: prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    for column in ("batch", "engine", "tokens/s", "ratio to HF", "identical to HF greedy", "first call s",
                   "limit tok/s", "of limit"):
        table.add_column(column)
    for row in rows:
        identical = "—" if row["identical"] is None else ("yes" if row["identical"] else "NO")
        first = f"{row['first_call_seconds']:.1f}" if "first_call_seconds" in row else "—"
        limit = f"{row['limit_tokens_per_second']:.0f}" if "limit_tokens_per_second" in row else "—"
        share = f"{row['fraction_of_limit']:.0%}" if "fraction_of_limit" in row else "—"
        table.add_row(str(row["batch"]), row["engine"], f"{row['tokens_per_second']:.1f}", f"{row['ratio']:.2f}",
                      identical, first, limit, share)
    table.caption = (f"limit tok/s: batch × {gigabytes_per_second:.1f} GB/s (read bandwidth measured here, "
                     f"{args.bandwidth_mb} MB streamed) ÷ the weight bytes a decode step reads")
    console.print(Columns([table, breakdown_table(breakdowns)]))
    for name, part in breakdowns:
        if part.outside_compiled:
            console.print(name, outside_compiled_table(part))
    steps = Table(title="one lmforge aten + fused decode step (batch 1), time per operator (products and attention "
                        "with what they call, the rest self time)")
    for column in ("operator", "µs per token", "calls per token"):
        steps.add_column(column)
    for op in top_ops:
        steps.add_row(op["op"], f"{op['us']:.0f}", f"{op['calls']:g}")
    console.print(steps)
    chain = Table(title=f"the program's {products[0]['megabytes']:.1f} MB of linear weights, multiplied one after another")
    for column in ("rows", "weights", "ms", "GB/s of weights"):
        chain.add_column(column)
    for row in products:
        chain.add_row(str(row["rows"]), row["weights"], f"{row['ms']:.2f}", f"{row['gigabytes_per_second']:.1f}")
    console.print(chain)


if __name__ == "__main__":
    main()
