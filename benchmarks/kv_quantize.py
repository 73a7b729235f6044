"""Quantized KV cache (`quantize` with `kv_cache:`, KIVI) on ref-llama-py.

Per cache format (fp32; int8 kivi and token; fp8 kivi): KV-cache bytes at 2,048 and 4,096
tokens (batch 1, the allocated buffers: codes, fp16 scales and zero points, the exact ring),
held-out perplexity change / top-1 agreement / KL against the fp32 model on windows of
`--context` tokens (the pass's own measurement on the cache-free forward, which reads the
cache exactly as decoding does), and the time of one batch-1 decode step after a
`--decode-at`-token prompt, whole step and the attention op alone, formats alternating
round by round (`run_alternately`). On a shared machine absolute times drift; the ratios
measured in the same rounds are the result.

    python benchmarks/kv_quantize.py [--context 2048] [--windows 8] [--decode-at 4000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.benchmarking import run_alternately
from lmforge.codegen import lower
from lmforge.compiler.capture import capture
from lmforge.compiler.kv_layout import allocate_kv_buffers, kv_cache_bytes
from lmforge.compiler.ops import AttentionContext, attention, attention_context, quantized_attention
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import CodegenConfig
from lmforge.passes import PassContext
from lmforge.passes.calibrate import CalibrationConfig, CalibrationData
from lmforge.passes.quantize import Quantize, QuantizeConfig

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
FORMATS = {
    "fp32": None,
    "int8 kivi": {"dtype": "int8", "granularity": "kivi"},
    "int8 token": {"dtype": "int8", "granularity": "token"},
    "fp8 kivi": {"dtype": "fp8", "granularity": "kivi"},
}


def quantized_programs(checkpoint: Path, context: int, windows: int) -> tuple[dict[str, Program], dict[str, dict]]:
    """The fp32 program and one per KV format, with the held-out quality the pass measured."""
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = CalibrationConfig(data=str(checkpoint / "heldout.txt"), samples=1, eval_samples=windows, seq_len=context)
    data = CalibrationData.from_config(config, tokenizer, reference)
    data.batch = 1
    base = capture(reference)
    programs, quality = {"fp32": base}, {"fp32": {"ppl_increase": 0.0, "top1": 1.0, "kl": 0.0}}
    for name, options in FORMATS.items():
        if options is None:
            continue
        program = base.clone()
        result = Quantize(QuantizeConfig.model_validate({"kv_cache": options}))(program, PassContext(
            reference=reference, calibration=data))
        programs[name], quality[name] = program, result.measurements["heldout_quality"]
    return programs, quality


def decode_step_times(programs: dict[str, Program], prompt_len: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of a batch-1 decode step at `prompt_len` tokens of context, per program,
    alternating; and of its first layer's attention op alone (the cache read)."""
    ids = torch.randint(3, 4000, (1, prompt_len + 1), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(prompt_len + 1)[None]
    steps, attention_calls = {}, {}
    for name, program in programs.items():
        runner = lower(program, CodegenConfig())
        buffers = allocate_kv_buffers(program.meta["kv_cache"], 1, prompt_len + 1, torch.float32)
        with torch.no_grad(), attention_context(AttentionContext(kv=buffers, start=0, q_len=prompt_len,
                                                                 last_only=True)):
            runner(ids[:, :prompt_len], positions[:, :prompt_len])

        def step(runner=runner, buffers=buffers) -> float:
            begin = time.perf_counter()
            with torch.no_grad(), attention_context(AttentionContext(kv=buffers, start=prompt_len, q_len=1)):
                runner(ids[:, prompt_len:], positions[:, prompt_len:])
            return (time.perf_counter() - begin) * 1e3

        node = program.layers[0].attention
        heads, kv_heads = program.config.num_attention_heads, program.meta["kv_cache"][0]["kv_heads"]
        head_dim = program.meta["kv_cache"][0]["head_dim"]
        q = torch.randn(1, heads, 1, head_dim)
        k, v = torch.randn(1, kv_heads, 1, head_dim), torch.randn(1, kv_heads, 1, head_dim)
        op = quantized_attention if node.target is quantized_attention else attention
        arguments = node.args[3:]

        def attend(op=op, arguments=arguments, buffers=buffers) -> float:
            begin = time.perf_counter()
            with torch.no_grad(), attention_context(AttentionContext(kv=buffers, start=prompt_len, q_len=1)):
                op(q, k, v, *arguments)
            return (time.perf_counter() - begin) * 1e3

        steps[name], attention_calls[name] = step, attend
    step_runs = run_alternately(steps, repeats)
    attention_runs = run_alternately(attention_calls, repeats * 4)
    return {name: {"step_ms": statistics.median(step_runs[name]),
                   "attention_ms": statistics.median(attention_runs[name])} for name in programs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--context", type=int, default=2048, help="tokens per held-out window")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows")
    parser.add_argument("--decode-at", type=int, default=4000, help="context of the timed decode step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    programs, quality = quantized_programs(args.checkpoint, args.context, args.windows)
    times = decode_step_times(programs, args.decode_at, args.repeats)
    rows = []
    for name, program in programs.items():
        layout = program.meta["kv_cache"]
        rows.append({"format": name, "kv_bytes_2048": kv_cache_bytes(layout, 2048),
                     "kv_bytes_4096": kv_cache_bytes(layout, 4096), **quality[name], **times[name]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    fp32 = rows[0]
    table = Table(title=f"KV cache formats on {args.checkpoint.name}: quality on {args.windows} held-out windows of "
                        f"{args.context} tokens, decode step at {args.decode_at} tokens (batch 1)")
    for column in ("format", "KV bytes @2k", "× smaller", "KV bytes @4k", "× smaller", "perplexity", "top-1", "KL",
                   "step ms", "vs fp32", "attention ms", "vs fp32"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for row in rows:
        table.add_row(
            row["format"], f"{row['kv_bytes_2048']:,}", f"{fp32['kv_bytes_2048'] / row['kv_bytes_2048']:.2f}",
            f"{row['kv_bytes_4096']:,}", f"{fp32['kv_bytes_4096'] / row['kv_bytes_4096']:.2f}",
            f"{row['ppl_increase']:+.3%}", f"{row['top1']:.4f}", f"{row['kl']:.5f}",
            f"{row['step_ms']:.2f}", f"{row['step_ms'] / fp32['step_ms']:.2f}x",
            f"{row['attention_ms']:.3f}", f"{row['attention_ms'] / fp32['attention_ms']:.2f}x",
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
