"""GPU decode speed: Hugging Face eager (bf16, sdpa) vs Hugging Face with a static cache and
torch.compile vs lmforge's `triton` backend, on random-weight Llama-shaped models built from
their published configs (no download), at several batch sizes, in one process.

    python benchmarks/gpu.py [--models 1b,8b] [--batches 1,8,32] [--prompt-len 128]
                             [--new-tokens 128] [--repeats 3] [--peak-gbps GBPS] [--json]

Per engine, model and batch: tokens/s over a whole `generate` (prefill included), the decode
step time ((time for N new tokens - time for 1) / (N - 1): prefill excluded), and the
bandwidth a step achieves — weight bytes plus KV bytes one step reads, over the step time —
as a percentage of the GPU's datasheet peak (`lmforge/codegen/roofline.py`; `--peak-gbps` for
a GPU it does not list). Engines are timed alternately, run by run
(`lmforge.benchmarking.time_alternating`). Random weights make the tokens meaningless but
the work identical; end-of-sequence is disabled so every run decodes N tokens. Greedy
identity is checked on a tiny fp32 config (bf16 argmax ties would make a comparison of
kernels a comparison of rounding).

Needs a CUDA GPU with room for the model twice (the Hugging Face model and lmforge's program
may hold separate weights: ~32 GB at 8B in bf16) and a recipe that accepts
`runtime: {device: cuda, dtype: ...}`. Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

SHAPES = {
    # Llama-3.2-1B's config.json
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.1-8B's config.json
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=1024, tie_word_embeddings=False),
}
GPU_PEAKS = {"A100-SXM4-80GB": "A100-80GB-SXM", "A100-SXM4-40GB": "A100-40GB", "A100-PCIE-40GB": "A100-40GB",
             "H100 80GB HBM3": "H100-SXM"}
"""torch.cuda.get_device_name() suffixes mapped to `roofline.PEAK_BANDWIDTH` entries."""
RECIPE = """
passes:
  - name: cleanup
  - name: fuse_projections
codegen: {{backend: triton}}
runtime: {{device: cuda, dtype: {dtype}, max_seq_len: {max_seq_len}}}
"""


def lmforge_recipe(dtype: str, max_seq_len: int) -> str:
    """The recipe text, checked by lmforge's own parser: exits with its message if lmforge
    does not (yet) accept a CUDA device and dtype in `runtime`."""
    from lmforge.compiler.recipe import parse_recipe
    from lmforge.errors import LmforgeError

    text = RECIPE.format(dtype=dtype, max_seq_len=max_seq_len)
    try:
        parse_recipe(text)
    except LmforgeError as error:
        sys.exit(f"benchmarks/gpu.py: this lmforge cannot compile for CUDA from a recipe "
                 f"(needs runtime.device and runtime.dtype): {error}")
    return text


def build_model(shape: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight Llama with the published shapes on the GPU, never stopping early."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (shared ones once),
    except an untied input embedding, of which a step reads only its rows."""
    parameters = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in parameters.values())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


def kv_bytes_per_step(config, batch: int, context: int, dtype_bytes: int) -> int:
    """Keys and values one decode step reads at `context` cached tokens per row."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return batch * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * dtype_bytes * context


def generators(model, compiled, input_ids: torch.Tensor, new_tokens: int) -> dict:
    """One `generate` call per engine, synchronised so wall time covers the GPU work."""
    from transformers import CompileConfig

    def synced(run):
        def call() -> torch.Tensor:
            output = run()
            torch.cuda.synchronize()
            return output
        return call

    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {
        "hf eager": synced(lambda: model.generate(input_ids, **greedy, disable_compile=True)),
        "hf static+compile": synced(lambda: model.generate(input_ids, **greedy, cache_implementation="static",
                                                           compile_config=CompileConfig())),
        "lmforge triton": synced(lambda: compiled.generate(input_ids, max_new_tokens=new_tokens)),
    }


def peak_bandwidth(override_gbps: float | None):
    """The datasheet peak of this GPU, or None for one `GPU_PEAKS` does not list."""
    from lmforge.codegen.roofline import PEAK_BANDWIDTH, MemoryBandwidth

    if override_gbps:
        return MemoryBandwidth("--peak-gbps", override_gbps * 1e9, "given on the command line")
    name = torch.cuda.get_device_name()
    return next((PEAK_BANDWIDTH[key] for suffix, key in GPU_PEAKS.items() if name.endswith(suffix)), None)


def measure(shape: str, batches: list[int], args, peak) -> list[dict]:
    import lmforge
    from lmforge.benchmarking import time_alternating

    model = build_model(shape, torch.bfloat16)
    compiled = lmforge.optimize(model, lmforge_recipe("bfloat16", args.prompt_len + args.new_tokens))
    weights = weight_bytes_per_step(model)
    rows = []
    for batch in batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(batch)).cuda()
        full = time_alternating(generators(model, compiled, ids, args.new_tokens), args.prompt_len, args.repeats)
        first = time_alternating(generators(model, compiled, ids, 1), args.prompt_len, args.repeats)
        mean_context = args.prompt_len + args.new_tokens / 2
        step_bytes = weights + kv_bytes_per_step(model.config, batch, round(mean_context), 2)
        for engine, timing in full.items():
            step = (timing.seconds - first[engine].seconds) / (args.new_tokens - 1)
            achieved = step_bytes / step if step > 0 else float("nan")
            rows.append({
                "model": shape, "batch": batch, "engine": engine,
                "tokens_per_s": round(timing.tokens_per_second, 1),
                "step_ms": round(step * 1e3, 3),
                "step_gb": round(step_bytes / 1e9, 3),
                "achieved_gbps": round(achieved / 1e9, 1),
                "percent_of_peak": round(100 * achieved / peak.bytes_per_second, 1) if peak else None,
            })
    del model, compiled
    torch.cuda.empty_cache()
    return rows


def greedy_identity(args) -> dict:
    """HF eager vs HF static+compile vs lmforge greedy tokens on the tiny config in fp32."""
    import lmforge

    model = build_model("tiny", torch.float32)
    compiled = lmforge.optimize(model, lmforge_recipe("float32", args.prompt_len + 32))
    ids = torch.randint(0, model.config.vocab_size, (2, args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).cuda()
    outputs = {name: run().cpu() for name, run in generators(model, compiled, ids, 32).items()}
    reference = outputs.pop("hf eager")
    result = {}
    for name, output in outputs.items():
        if output.shape != reference.shape:
            result[name] = f"{tuple(output.shape)} tokens against {tuple(reference.shape)}"
            continue
        differ = (output != reference).any(dim=0).nonzero()
        first = int(differ[0]) - args.prompt_len if len(differ) else None
        result[name] = "identical" if first is None else f"first difference at new token {first}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth, for an unlisted GPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device (torch {torch.__version__}); nothing to measure")
        return
    if args.new_tokens < 2:
        sys.exit("benchmarks/gpu.py: --new-tokens must be at least 2 (a step time needs two decodes)")
    lmforge_recipe("bfloat16", args.prompt_len + args.new_tokens)
    peak = peak_bandwidth(args.peak_gbps)
    batches = [int(value) for value in args.batches.split(",")]
    rows = [row for shape in args.models.split(",") for row in measure(shape, batches, args, peak)]
    report = {"gpu": torch.cuda.get_device_name(), "peak": dataclasses.asdict(peak) if peak else None,
              "rows": rows, "greedy_identity_tiny_fp32": greedy_identity(args)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    peak_text = f"peak {peak.bytes_per_second / 1e9:.0f} GB/s ({peak.source})" if peak else "peak unknown"
    table = Table(title=f"decode on {report['gpu']}, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
                        f"{peak_text}")
    for column in ("model", "batch", "engine", "tokens/s", "step ms", "GB per step", "GB/s", "% of peak"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["model"], str(row["batch"]), row["engine"], f"{row['tokens_per_s']:.1f}",
                      f"{row['step_ms']:.3f}", f"{row['step_gb']:.3f}", f"{row['achieved_gbps']:.0f}",
                      "-" if row["percent_of_peak"] is None else f"{row['percent_of_peak']:.1f}")
    console = Console()
    console.print(table)
    for engine, verdict in report["greedy_identity_tiny_fp32"].items():
        console.print(f"greedy tokens, tiny fp32 config, {engine} vs hf eager: {verdict}")


if __name__ == "__main__":
    main()
