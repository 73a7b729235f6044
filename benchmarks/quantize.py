"""Low-precision weights: kernel candidates, then whole models per format.

`--kernels`: every candidate CPU kernel per format on every linear weight of ref-llama-py
and of a 104 M-parameter Llama-shaped model (hidden 1024, 6 layers, vocab 32,000) at 1, 4
and 11 rows (decode and speculative verify widths), candidates alternating run by run; ms
per forward over all weights and the ratio to fp32 oneDNN-packed (what fp32 programs use).
This is the table `codegen/cpu_quantized.py` chose its kernels from.

Default: per format (fp32, bf16, fp16, int8, int4 g32; round to nearest) on ref-llama-py
and, with `--big`, on a random-weight Llama-shaped model of 112 M parameters: weight bytes
(every weight, embeddings and LM head included), held-out perplexity change / top-1 / KL
against the fp32 model (the `quantize` pass's own measurement, calibrate.py) and batch-1
greedy decode tokens/s against fp32 lmforge and Hugging Face, the three alternating run
by run in one process (`run_alternately`). On a shared machine the absolute figures drift;
the ratios measured in the same rounds are the result.

`--speed`: decode tokens/s only, per format (fp32, bf16, int8, int4 g32; round to nearest)
and backend (`aten`; `cpp`, the step compiled ahead of time, whose quantized linears call
the same kernels on the stored formats) on ref-llama-py and, with `--big`, the random 112 M
model, at each of `--threads`: every (format, backend) generates `--new-tokens` after a
1-token prompt in a cache of exactly that many slots, all alternating run by run (medians).
So every forward is a 1-token step (the prompt is not padded to a length bucket, the `cpp`
backend compiles one package per format and thread count) and decode tokens/s is new tokens
over the generate's time; the context grows from 1 to `--new-tokens`. Ratios are to fp32 on
the same backend and to fp32 `aten`; greedy agreement is cpp's tokens against aten's of the
same format. First compiles of the `cpp` packages are warm-up, not timed.

`--methods`: quality only, per way of choosing codes on ref-llama-py: rtn, awq and gptq at
int8 and int4 groups of 128 and 32, gptq with act-order, 0.5 % outliers, and mixed precision
under a KL budget; weight bytes and held-out perplexity change / top-1 / KL against the
fp32 model (decided on `--calibration-samples` windows, measured on `--eval-samples` others).

    python benchmarks/quantize.py [--kernels | --methods | --speed] [--big] [--threads 1 2] [--new-tokens 64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lmforge
from lmforge.api import CompiledModel
from lmforge.benchmarking import heldout_prompts, prompt_text_for, run_alternately, time_alternating
from lmforge.compiler.quantized import quantize_int4, quantize_int8, unpack_int4

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
SPEED_FORMATS = ("fp32", "bf16", "int8", "int4")
BACKENDS = ("aten", "cpp")


def _linear_shapes(hidden: int, intermediate: int, kv: int, layers: int, vocab: int) -> list[tuple[int, int]]:
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return layer * layers + [(vocab, hidden)]


def _packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def _onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _int4_operands(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    quantized = quantize_int4(weight, group)
    scales = quantized.scales.float()
    zeros = quantized.zeros.float() + 8 * scales  # torch's convention: w = (q - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(quantized.qweight).to(torch.int32), 1)
    return packed, torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().bfloat16()


def kernel_candidates(weights: list[torch.Tensor], rows: int) -> dict[str, Callable[[], None]]:
    """One forward over all `weights` per candidate kernel, at `rows` activation rows."""
    xs = [torch.randn(rows, weight.shape[1]) for weight in weights]
    x16 = [x.bfloat16() for x in xs]
    fp32 = [_packed(weight) for weight in weights]
    bf16 = [weight.bfloat16() for weight in weights]
    bf16_packed = [_packed(weight) for weight in bf16]
    fp16 = [weight.half() for weight in weights]
    int8 = [quantize_int8(weight) for weight in weights]
    int8_scales = [quantized.scales.view(-1) for quantized in int8]
    int4 = [_int4_operands(weight, 32) for weight in weights]

    def over_all(kernel: Callable[[int], torch.Tensor]) -> Callable[[], None]:
        return lambda: [kernel(i) for i in range(len(weights))] and None

    candidates = {
        "fp32 aten.linear": over_all(lambda i: F.linear(xs[i], weights[i])),
        "fp32 oneDNN packed": over_all(lambda i: _onednn(xs[i], fp32[i])),
        "bf16 aten.linear": over_all(lambda i: F.linear(x16[i], bf16[i])),
        "bf16 oneDNN packed (casts incl.)": over_all(lambda i: _onednn(xs[i].bfloat16(), bf16_packed[i]).float()),
        "fp16 aten.linear (casts incl.)": over_all(lambda i: F.linear(xs[i].half(), fp16[i]).float()),
        "int8 _weight_int8pack_mm fp32 x": over_all(
            lambda i: torch._weight_int8pack_mm(xs[i], int8[i].qweight, int8_scales[i])),
        "int8 _weight_int8pack_mm bf16 x": over_all(
            lambda i: torch._weight_int8pack_mm(x16[i], int8[i].qweight, int8_scales[i].bfloat16())),
        "int4 _weight_int4pack_mm_for_cpu": over_all(
            lambda i: torch._weight_int4pack_mm_for_cpu(x16[i], int4[i][0], 32, int4[i][1])),
    }
    try:
        fp16_packed = [_packed(weight) for weight in fp16]
        candidates["fp16 oneDNN packed"] = over_all(lambda i: _onednn(xs[i].half(), fp16_packed[i]).float())
    except RuntimeError as error:  # oneDNN packs fp16 only with avx_ne_convert or avx512_fp16
        print(f"fp16 oneDNN packed: not available here ({str(error).splitlines()[0]})")
    return candidates


def measure_kernels(repeats: int) -> list[dict]:
    rows_out = []
    models = {"ref-llama-py shapes": _linear_shapes(256, 704, 128, 8, 4096),
              "104M Llama-shaped": _linear_shapes(1024, 2816, 512, 6, 32000)}
    for model, shapes in models.items():
        weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
        for rows in (1, 4, 11):
            def timed(run: Callable[[], None]) -> Callable[[], float]:
                def once() -> float:
                    start = time.perf_counter()
                    run()
                    return time.perf_counter() - start
                return once
            results = run_alternately({name: timed(run) for name, run in kernel_candidates(weights, rows).items()},
                                      repeats)
            base = statistics.median(results["fp32 oneDNN packed"])
            for name, seconds in results.items():
                median = statistics.median(seconds)
                rows_out.append({"model": model, "rows": rows, "kernel": name, "ms": round(median * 1e3, 3),
                                 "vs_fp32_packed": round(base / median, 2)})
    return rows_out


def random_llama(hidden: int = 1024, layers: int = 4, vocab: int = 32000) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _recipe(heldout: Path, fmt: str, samples: int, seq_len: int) -> str:
    quantize = "" if fmt == "fp32" else f"  - name: quantize\n    weights: {fmt}\n"
    return (f"calibration: {{data: {heldout}, samples: 2, eval_samples: {samples}, seq_len: {seq_len}}}\n"
            f"passes:\n  - name: cleanup\n{quantize}runtime: {{max_seq_len: 1024}}\n")


def measure_model(label: str, model, tokenizer, heldout: Path, prompt: torch.Tensor, args) -> list[dict]:
    """One row per format: bytes, quality, tokens/s vs fp32 lmforge and HF (alternating)."""
    fp32_bytes = sum(tensor.nbytes for tensor in model.state_dict().values())
    compiled = {fmt: lmforge.optimize(model, _recipe(heldout, fmt, args.eval_samples, args.seq_len), tokenizer=tokenizer)
                for fmt in FORMATS}

    def hf_generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False)

    rows = []
    for fmt in FORMATS:
        engines = {"hf": hf_generate,
                   "fp32": lambda: compiled["fp32"].generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[]),
                   "this": lambda: compiled[fmt].generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])}
        timing = time_alternating(engines, prompt.shape[1], args.repeats)
        program = compiled[fmt].program
        quality = program.meta.get("quantize", {}).get("heldout_quality", {})
        weight_bytes = sum(tensor.nbytes for tensor in program.state_dict().values())
        rows.append({
            "model": label, "format": fmt, "weight_bytes": weight_bytes,
            "smaller": round(fp32_bytes / weight_bytes, 2),
            "ppl_increase": quality.get("ppl_increase", 0.0), "top1": quality.get("top1", 1.0), "kl": quality.get("kl", 0.0),
            "tokens_per_s": round(timing["this"].tokens_per_second, 1),
            "vs_fp32_lmforge": round(timing["fp32"].seconds / timing["this"].seconds, 2),
            "vs_hf": round(timing["hf"].seconds / timing["this"].seconds, 2),
            "greedy_agreement_with_fp32": round((timing["this"].output == timing["fp32"].output).float().mean().item(), 3),
        })
    return rows


def measure_speed(label: str, model, tokenizer, heldout: Path, token: int, args) -> list[dict]:
    """One row per (threads, format, backend): decode tokens/s, every configuration
    alternating in one process."""
    prompt, slots = torch.tensor([[token]]), 1 + args.new_tokens
    compiled = {}
    for fmt in SPEED_FORMATS:
        aten = lmforge.optimize(model, _recipe(heldout, fmt, 2, 64), tokenizer=tokenizer)
        runtime = aten.recipe.runtime.model_copy(update={"max_seq_len": slots})
        for backend in BACKENDS:
            codegen = aten.recipe.codegen.model_copy(update={"backend": backend})
            recipe = aten.recipe.model_copy(update={"codegen": codegen, "runtime": runtime})
            compiled[fmt, backend] = CompiledModel(aten.program, recipe, aten.generation, tokenizer)

    def generate(engine: CompiledModel) -> Callable[[], torch.Tensor]:
        return lambda: engine.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        timing = time_alternating({key: generate(engine) for key, engine in compiled.items()}, 1, args.repeats)
        decode = {key: timing[key].tokens_per_second for key in compiled}
        for fmt, backend in compiled:
            rows.append({
                "model": label, "threads": threads, "format": fmt, "backend": backend,
                "decode_tokens_per_s": round(decode[fmt, backend], 1),
                "vs_fp32_same_backend": round(decode[fmt, backend] / decode["fp32", backend], 2),
                "vs_fp32_aten": round(decode[fmt, backend] / decode["fp32", "aten"], 2),
                "greedy_agreement_with_aten": round(
                    (timing[fmt, backend].output == timing[fmt, "aten"].output).float().mean().item(), 3),
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


METHOD_ROWS = (
    ("int8", {}), ("int8", {"method": "awq"}), ("int8", {"method": "gptq"}),
    ("int4 g128", {}), ("int4 g128", {"method": "awq"}), ("int4 g128", {"method": "gptq"}),
    ("int4 g32", {}), ("int4 g32", {"method": "awq"}), ("int4 g32", {"method": "awq", "awq_clip": False}),
    ("int4 g32", {"method": "gptq"}),
    ("int4 g32", {"method": "gptq", "act_order": True}), ("int4 g32", {"outliers": 0.5}),
    ("int4 g32", {"method": "gptq", "outliers": 0.5}),
    ("int4 g32", {"method": "gptq", "mixed_precision": True, "quality_budget": {"max_kl": 0.003}}),
)


def _method_recipe(heldout: Path, weights: str, options: dict, args) -> str:
    fmt, _, group = weights.partition(" g")
    quantize = {"name": "quantize", "weights": fmt, **({"group_size": int(group)} if group else {}), **options}
    return (f"calibration: {{data: {heldout}, samples: {args.calibration_samples}, "
            f"eval_samples: {args.eval_samples}, seq_len: {args.seq_len}}}\n"
            f"passes:\n  - name: cleanup\n  - {json.dumps(quantize)}\n")


def measure_methods(model, tokenizer, heldout: Path, args) -> list[dict]:
    """One row per (format, options): bytes and held-out quality against the fp32 model."""
    fp32_bytes = sum(tensor.nbytes for tensor in model.state_dict().values())
    rows = []
    for weights, options in METHOD_ROWS:
        if args.weights and weights not in args.weights:
            continue
        program = lmforge.optimize(model, _method_recipe(heldout, weights, options, args), tokenizer=tokenizer).program
        meta = program.meta["quantize"]
        quality = meta["heldout_quality"]
        weight_bytes = sum(tensor.nbytes for tensor in program.state_dict().values())
        extras = {key: value for key, value in options.items() if key != "method"}
        rows.append({
            "weights": weights, "method": options.get("method", "rtn"),
            "options": ", ".join(f"{key}={value}" for key, value in extras.items()) or "-",
            "weight_bytes": weight_bytes, "smaller": round(fp32_bytes / weight_bytes, 2),
            "ppl_increase": f"{quality['ppl_increase']:+.2%}", "top1": round(quality["top1"], 4),
            "kl": round(quality["kl"], 5),
            "layers": ", ".join(f"{unit}:{fmt}" for unit, fmt in meta["layers"].items()) if meta["layers"] else "-",
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _print(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{value:,}" if isinstance(value, int) else str(value) for value in row.values()))
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--kernels", action="store_true", help="measure kernel candidates instead of whole models")
    parser.add_argument("--methods", action="store_true", help="held-out quality of rtn / awq / gptq / outliers / "
                        "mixed precision on the checkpoint, no timing")
    parser.add_argument("--speed", action="store_true", help="decode tokens/s per format on the aten and cpp "
                        "backends, no quality")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="--speed: thread counts to measure at (each compiles its own cpp packages)")
    parser.add_argument("--weights", nargs="+", help="--methods: only these formats (e.g. 'int4 g32')")
    parser.add_argument("--calibration-samples", type=int, default=16, help="--methods: calibration windows")
    parser.add_argument("--big", action="store_true", help="also a random-weight ~100M-parameter Llama-shaped model")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load = f"load average {open('/proc/loadavg').read().split()[0]} on {torch.get_num_threads()} threads (shared machine)"
    if args.kernels:
        rows = measure_kernels(args.repeats)
        print(json.dumps(rows)) if args.json else _print(rows, f"kernel candidates, {load}")
        return
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompt = torch.tensor([heldout_prompts(prompt_text_for(args.checkpoint), tokenizer, 1, args.prompt_len)[0]])
    heldout = args.checkpoint / "heldout.txt"
    if args.methods:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
        rows = measure_methods(model, tokenizer, heldout, args)
        print(json.dumps(rows)) if args.json else _print(rows, f"ref-llama-py, ways to choose codes, {load}")
        return
    models = {"ref-llama-py": lambda: AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()}
    if args.big:
        models["random Llama ~112M"] = random_llama
    for label, make in models.items():  # each table as soon as it is measured
        if args.speed:
            rows = measure_speed(label, make(), tokenizer, heldout, int(prompt[0, -1]), args)
            print(json.dumps(rows), flush=True) if args.json else _print(rows, f"{label}, decode speed, {load}")
            continue
        rows = measure_model(label, make(), tokenizer, heldout, prompt, args)
        print(json.dumps(rows), flush=True) if args.json else _print(rows, f"{label}, round to nearest, {load}")


if __name__ == "__main__":
    main()
