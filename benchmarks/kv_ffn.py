"""KV sharing and FFN skipping: memory, decode speed and quality at several budgets.

One process, one held-out split for every row: Hugging Face `generate` (eager), lmforge
without lossy passes, then `kv_share` (auto at 1/3/5 % perplexity, and explicit 2x sharing
with and without `heal`; `merge`, MiniCache) and `ffn_skip` (static and dynamic at 1/3/5 %). Each row reports
KV-cache bytes at 2,048 tokens (vs HF's), weight bytes, batch-1 greedy decode tokens/s (vs
HF and vs lmforge without the pass, the three timed alternately run by run so that machine
drift cancels out of the ratios), and held-out perplexity change, top-1 agreement and KL
against the original model. A budget no configuration meets is a row saying so, with the
cost of the cheapest step: the measured frontier.

    python benchmarks/kv_ffn.py [--checkpoint DIR] [--new-tokens 64] [--heal-steps 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmforge
from lmforge.benchmarking import heldout_prompts, hf_kv_cache_bytes, prompt_text_for, time_alternating
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import CalibrationConfig, CalibrationData
from lmforge.runtime.kv_cache import kv_cache_bytes

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
BASE_PASSES = "  - name: cleanup\n"
TAIL_PASSES = "  - name: fuse_projections\n"


def _recipe(checkpoint: Path, lossy: str, samples: int = 16) -> str:
    return (
        f"calibration: {{data: {checkpoint / 'heldout.txt'}, samples: {samples}, eval_samples: 16, seq_len: 256}}\n"
        f"passes:\n{BASE_PASSES}{lossy}{TAIL_PASSES}runtime: {{max_seq_len: 1024}}\n"
    )


def _configurations(heal_steps: int) -> list[tuple[str, str, int]]:
    """(label, pass YAML, calibration windows) for every measured row."""
    rows = [("lmforge, no lossy pass", "", 16)]
    for budget in (0.01, 0.03, 0.05):
        rows.append((f"kv_share auto ≤{budget:.0%}",
                     f"  - name: kv_share\n    mode: auto\n    quality_budget: {{max_ppl_increase: {budget}}}\n", 16))
    pairs = "[[0, 1], [2, 3], [4, 5], [6, 7]]"
    rows.append(("kv_share 2x (pairs), no heal", f"  - name: kv_share\n    mode: explicit\n    groups: {pairs}\n", 16))
    rows.append((f"kv_share 2x (pairs) + heal {heal_steps}",
                 f"  - name: kv_share\n    mode: explicit\n    groups: {pairs}\n"
                 f"    heal: {{steps: {heal_steps}, lr: 0.001}}\n", 384))
    middle = "[[1, 2], [3, 4], [5, 6]]"
    rows.append((f"kv_share 1.6x (middle pairs) + heal {heal_steps}",
                 f"  - name: kv_share\n    mode: explicit\n    groups: {middle}\n"
                 f"    heal: {{steps: {heal_steps}, lr: 0.001}}\n", 384))
    rows.append(("kv_share auto ≤10% (frontier)",
                 "  - name: kv_share\n    mode: auto\n    quality_budget: {max_ppl_increase: 0.1}\n", 16))
    rows.append(("kv_share merge [[5, 6]] (MiniCache)",
                 "  - name: kv_share\n    mode: merge\n    groups: [[5, 6]]\n", 16))
    rows.append(("kv_share merge auto ≤5%",
                 "  - name: kv_share\n    mode: merge\n    quality_budget: {max_ppl_increase: 0.05}\n", 16))
    for budget in (0.01, 0.03, 0.05):
        rows.append((f"ffn_skip static ≤{budget:.0%}",
                     f"  - name: ffn_skip\n    mode: static\n    quality_budget: {{max_ppl_increase: {budget}}}\n", 16))
    rows.append(("ffn_skip static ≤20% (frontier)",
                 "  - name: ffn_skip\n    mode: static\n    quality_budget: {max_ppl_increase: 0.2}\n", 16))
    for budget in (0.01, 0.03, 0.05, 0.1):
        rows.append((f"ffn_skip dynamic ≤{budget:.0%}",
                     f"  - name: ffn_skip\n    mode: dynamic\n    thresholds: [0.999, 0.998, 0.995, 0.993, 0.99, 0.985, 0.98]\n"
                     f"    quality_budget: {{max_ppl_increase: {budget}}}\n", 16))
    return rows


def _pass_summary(compiled) -> str:
    lossy = [entry for entry in compiled.program.history if entry["pass"] in ("kv_share", "ffn_skip")]
    if not lossy:
        return ""
    measurements = lossy[-1]["measurements"]
    if compiled.program.meta.get("kv_share", {}).get("mode") == "merge":
        return f"merged pairs {measurements['groups']}"
    if "groups" in measurements:
        shared = [group for group in measurements["groups"] if len(group) > 1]
        return f"groups {shared}" + (f", heal KL {measurements['heldout_quality_before_heal']['kl']:.3f}→"
                                     f"{measurements['heldout_quality']['kl']:.3f}" if "heal" in measurements else "")
    if "threshold" in measurements:
        return f"threshold {measurements['threshold']}, {measurements['heldout_skipped']:.1%} FFN calls skipped"
    return f"FFNs removed {measurements['layers']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heal-steps", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    text = prompt_text_for(args.checkpoint)
    prompt = torch.tensor([heldout_prompts(text, tokenizer, 1, args.prompt_len)[0]])
    heldout = CalibrationData.from_config(
        CalibrationConfig(data=str(args.checkpoint / "heldout.txt"), samples=16, eval_samples=16, seq_len=256), tokenizer, hf
    )
    hf_kv = hf_kv_cache_bytes(hf.config, 2048)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False)

    rows = []
    baseline = None
    configurations = _configurations(args.heal_steps)
    with Progress(console=Console(stderr=True), disable=args.json) as progress:
        task = progress.add_task("compiling", total=len(configurations))
        for label, lossy, samples in configurations:
            progress.update(task, description=label)
            start = time.perf_counter()
            try:
                compiled = lmforge.optimize(args.checkpoint, _recipe(args.checkpoint, lossy, samples))
            except LmforgeError as error:
                rows.append({"configuration": label, "error": str(error)})
                progress.advance(task)
                continue
            seconds = time.perf_counter() - start
            baseline = baseline or compiled
            engines = {"hf": hf_generate, "baseline": lambda: baseline.generate(prompt, max_new_tokens=args.new_tokens,
                                                                                 eos_token_id=[]),
                       "this": lambda: compiled.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[])}
            timing = time_alternating(engines, prompt.shape[1], args.repeats)
            if not rows:
                rows.append({"configuration": "HF generate (eager)", "kv_bytes_2048": hf_kv, "kv_ratio": 1.0,
                             "weight_bytes": sum(p.nbytes for p in hf.parameters()),
                             "tokens_per_second": timing["hf"].tokens_per_second, "speed_vs_hf": 1.0,
                             "speed_vs_lmforge": None, "quality": None, "detail": "", "compile_seconds": None})
            kv = kv_cache_bytes(compiled.program.meta["kv_cache"], 2048)
            rows.append({
                "configuration": label, "kv_bytes_2048": kv, "kv_ratio": hf_kv / kv,
                "weight_bytes": sum(t.nbytes for t in compiled.program.state_dict().values()),
                "tokens_per_second": timing["this"].tokens_per_second,
                "speed_vs_hf": timing["this"].tokens_per_second / timing["hf"].tokens_per_second,
                "speed_vs_lmforge": timing["this"].tokens_per_second / timing["baseline"].tokens_per_second,
                "quality": heldout.program_quality(compiled.program).as_dict(),
                "detail": _pass_summary(compiled), "compile_seconds": seconds,
            })
            progress.advance(task)
    if args.json:
        json.dump({"rows": rows}, sys.stdout, indent=2)
        return
    table = Table(title=f"kv_share / ffn_skip on {args.checkpoint.name}: batch 1, prompt {args.prompt_len}, "
                        f"{args.new_tokens} new tokens; quality on 16×256 held-out tokens")
    for column in ("configuration", "KV MiB @2048", "KV reduction", "weights MiB", "tok/s", "vs HF", "vs lmforge",
                   "ppl Δ", "top-1", "KL", "what was chosen", "compile s"):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row(row["configuration"], *["—"] * 10, f"not reachable: {row['error']}")
            continue
        quality = row["quality"]
        table.add_row(
            row["configuration"], f"{row['kv_bytes_2048'] / 2**20:.2f}", f"{row['kv_ratio']:.2f}x",
            f"{row['weight_bytes'] / 2**20:.1f}", f"{row['tokens_per_second']:.0f}", f"{row['speed_vs_hf']:.2f}",
            "—" if row["speed_vs_lmforge"] is None else f"{row['speed_vs_lmforge']:.2f}",
            "—" if quality is None else f"{quality['ppl_increase']:+.2%}",
            "—" if quality is None else f"{quality['top1']:.3f}",
            "—" if quality is None else f"{quality['kl']:.3f}",
            row["detail"], "—" if row["compile_seconds"] is None else f"{row['compile_seconds']:.0f}",
        )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
