"""Speculative decoding (prompt lookup, Medusa and Hydra heads, an EAGLE drafter) vs Hugging Face, one process,
same prompts.

Rows: HF `generate` (eager), HF `generate(prompt_lookup_num_tokens=10)`, lmforge plain,
lmforge with `prompt_lookup`, with `draft_heads` (top-1 chain, and a tree of each head's
top 3/2/1), heads with lookup, and Hydra heads (each head reads the token drafted before it;
drafted by the runtime at one position per step; chain and tree) with and without lookup: tokens/s (each engine timed alternately with the others, run
by run), ratio to HF eager and to HF prompt lookup, mean tokens per forward (1 = no draft
accepted), and whether the greedy tokens are identical to HF's plain greedy output.
Prompts are cut from held-out source code, or with `--text FILE` from that file, or with
`--text docs` from English documentation installed on this machine (`documentation_text`:
no download, and no drafter or heads ever trained on it); the last column says how
repetitive the generated text is (share of generated 4-grams seen before), since lookup
thrives on it.

With `--eagle DIR` (written by `lmforge train-heads --kind eagle`), the EAGLE drafter's chain
and its dynamic tree (EAGLE-2; node budget chosen at compile time), each with and without
lookup, join the rows. Heads come from `--heads DIR` / `--hydra-heads DIR` (written by `lmforge train-heads
[--kind hydra]`), or are trained here first
(`--train-steps`, self-distillation on the first half of heldout.txt, as `lmforge train-heads
--first-half`; the prompts come from the second half, as in `lmforge bench`).

    python benchmarks/speculative.py [--checkpoint DIR] [--heads DIR] [--text docs|FILE] [--prompts 4] [--new-tokens 128] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmforge
from lmforge.benchmarking import heldout_prompts, prompt_text_for, split_heldout, text_windows, time_alternating
from lmforge.draft_heads import agreement, save_heads, train_heads

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-llama-py"
LOOKUP = "{name: prompt_lookup, num_draft: 10, max_ngram: 3}"


def _recipe(*extra: str) -> str:
    passes = ", ".join(["{name: cleanup}", *extra, "{name: fuse_projections}"])
    return f"passes: [{passes}]\nruntime: {{max_seq_len: 1024}}\n"


def _heads(given: Path | None, kind: str, args, hf, tokenizer) -> Path:
    if given is not None:
        return given
    directory = Path(tempfile.mkdtemp(prefix=f"lmforge-{kind}-heads-"))
    windows = text_windows(split_heldout((args.checkpoint / "heldout.txt").read_text())[0], tokenizer, 128)
    train_ids, heldout_ids = windows[:-16], windows[-16:]  # as `lmforge train-heads --first-half` splits it
    heads, _ = train_heads(hf, train_ids, count=3, kind=kind, steps=args.train_steps, lr=2e-3)
    save_heads(directory, heads, hf, {"heldout_agreement": agreement(heads, hf, heldout_ids)})
    return directory


DEBIAN_DOCS = Path("/usr/share/doc")
CODE_LINE = re.compile(r"^(\s{4}|\t|>>>|\.\.\.|\$ |%|#!|\.\. )")


def _prose(text: str) -> list[str]:
    """The prose lines of a README: fenced blocks and lines that look like code, shell or
    markup directives dropped, as are lines with few letters (tables, rules, URLs)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        letters = sum(character.isalpha() or character == " " for character in line)
        if not fenced and not CODE_LINE.match(line) and (not line.strip() or letters >= 0.8 * len(line)):
            kept.append(line.rstrip())
    return kept


def documentation_text() -> str:
    """A non-code text built from what is installed, without a download: the long
    descriptions (READMEs) in the metadata of the installed Python distributions, then the
    READMEs of the Debian packages under /usr/share/doc, each reduced to its prose, in a fixed
    order. English prose that neither the reference checkpoint's held-out code nor any drafter's
    training text contains."""
    readmes = [(distribution.metadata["Name"] or "", distribution.metadata.get_payload() or "")
               for distribution in importlib.metadata.distributions()]
    for path in sorted(DEBIAN_DOCS.glob("*/README*")):
        if path.suffix in ("", ".md", ".txt", ".gz", ".markdown", ".rst") and path.is_file():
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            readmes.append((str(path), raw.decode("utf-8", errors="ignore")))
    paragraphs = ["\n".join(_prose(text)).strip() for _, text in sorted(readmes, key=lambda pair: pair[0].lower())]
    return re.sub(r"\n{3,}", "\n\n", "\n\n".join(paragraph for paragraph in paragraphs if paragraph))


def prompt_text(given: str | None, checkpoint: Path) -> tuple[str, str]:
    """The text prompts are cut from and its name: `--text docs`, `--text FILE`, or the prompt
    half of the checkpoint's held-out code."""
    if given == "docs":
        return documentation_text(), "installed documentation (prose)"
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"--text {given}: no such file (give a text file or `docs`)")
        return path.read_text(errors="ignore"), path.name
    return prompt_text_for(checkpoint), "held-out code"


def repeated_ngrams(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / max(1, len(grams))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", type=Path, default=None, help="trained Medusa heads (default: train them here)")
    parser.add_argument("--hydra-heads", type=Path, default=None, help="trained Hydra heads (default: train them here)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--eagle", type=Path, default=None,
                        help="an EAGLE drafter (`lmforge train-heads --kind eagle`): adds its chain and tree rows")
    parser.add_argument("--only", nargs="+", default=None,
                        help="measure only the lmforge rows whose name contains one of these strings (and plain)")
    parser.add_argument("--text", default=None,
                        help="cut the prompts from this text file, or `docs` for the installed documentation's prose "
                             "(default: the second half of the checkpoint's heldout.txt)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    text, text_name = prompt_text(args.text, args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()

    def wanted(name: str) -> bool:
        return name == "lmforge plain" or not args.only or any(part in name for part in args.only)

    heads_dirs = {"medusa": args.heads, "hydra": args.hydra_heads}

    def heads_pass(kind: str, tree: str = "") -> str:
        """The draft_heads entry for `kind`, training those heads the first time they are needed."""
        heads_dirs[kind] = _heads(heads_dirs[kind], kind, args, hf, tokenizer)
        return f"{{name: draft_heads, path: {heads_dirs[kind]}{tree}}}"

    tree = ", tree: [3, 2, 1]"
    recipes = {
        "lmforge plain": lambda: _recipe(),
        "lmforge + prompt_lookup": lambda: _recipe(LOOKUP),
        "lmforge + draft_heads": lambda: _recipe(heads_pass('medusa')),
        "lmforge + draft_heads + prompt_lookup": lambda: _recipe(heads_pass('medusa'), LOOKUP),
        "lmforge + draft_heads tree [3,2,1]": lambda: _recipe(heads_pass('medusa', tree)),
        "lmforge + draft_heads tree [3,2,1] + prompt_lookup": lambda: _recipe(heads_pass('medusa', tree), LOOKUP),
        "lmforge + Hydra heads": lambda: _recipe(heads_pass('hydra')),
        "lmforge + Hydra heads + prompt_lookup": lambda: _recipe(heads_pass('hydra'), LOOKUP),
        "lmforge + Hydra tree [3,2,1]": lambda: _recipe(heads_pass('hydra', tree)),
        "lmforge + Hydra tree [3,2,1] + prompt_lookup": lambda: _recipe(heads_pass('hydra', tree), LOOKUP),
    }
    if args.eagle is not None:  # the dynamic tree's node budget is chosen at compile time from measured verify latency
        eagle = f"{{name: draft_heads, path: {args.eagle}}}"
        dynamic = f"{{name: draft_heads, path: {args.eagle}, dynamic_tree: {{}}}}"
        recipes.update({
            "lmforge + EAGLE chain": lambda: _recipe(eagle),
            "lmforge + EAGLE chain + prompt_lookup": lambda: _recipe(eagle, LOOKUP),
            "lmforge + EAGLE dynamic tree": lambda: _recipe(dynamic),
            "lmforge + EAGLE dynamic tree + prompt_lookup": lambda: _recipe(dynamic, LOOKUP),
        })
    models = {name: lmforge.optimize(args.checkpoint, recipe()) for name, recipe in recipes.items() if wanted(name)}
    agreement_note = {name: models[name].program.history[1]["measurements"]["heldout_agreement"]
                      for name in ("lmforge + draft_heads", "lmforge + Hydra heads") if name in models}
    totals: dict[str, dict] = {}
    for prompt in heldout_prompts(text, tokenizer, args.prompts, args.prompt_len):
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        forwards = {}

        def lmforge_run(name):
            def run():
                out = models[name].generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
                forwards[name] = models[name].engine.speculation_stats["forwards"]
                return out
            return run

        def hf_generate(**extra):
            with torch.no_grad():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, **extra)

        engines = {
            "HF generate (eager)": hf_generate,
            "HF generate, prompt_lookup_num_tokens=10": lambda: hf_generate(prompt_lookup_num_tokens=10),
            **{name: lmforge_run(name) for name in models},
        }
        timings = time_alternating(engines, ids.shape[1], args.repeats)
        reference = timings["HF generate (eager)"].output
        for name, timing in timings.items():
            total = totals.setdefault(name, {"seconds": 0.0, "tokens": 0, "identical": True, "forwards": 0})
            total["seconds"] += timing.seconds
            total["tokens"] += timing.new_tokens
            total["identical"] &= bool(torch.equal(timing.output, reference))
            total["forwards"] += forwards.get(name, timing.new_tokens)
            total.setdefault("repetition", []).append(repeated_ngrams(timing.output[0, ids.shape[1]:].tolist()))
    eager = totals["HF generate (eager)"]["tokens"] / totals["HF generate (eager)"]["seconds"]
    hf_lookup_name = "HF generate, prompt_lookup_num_tokens=10"
    hf_lookup = totals[hf_lookup_name]["tokens"] / totals[hf_lookup_name]["seconds"]
    rows = [{"engine": name, "tokens_per_second": t["tokens"] / t["seconds"],
             "vs_hf_eager": t["tokens"] / t["seconds"] / eager, "vs_hf_lookup": t["tokens"] / t["seconds"] / hf_lookup,
             "tokens_per_forward": t["tokens"] / t["forwards"], "identical_to_hf_greedy": t["identical"],
             "repeated_4grams": sum(t["repetition"]) / len(t["repetition"])} for name, t in totals.items()]
    if args.json:
        json.dump({"text": text_name, "rows": rows, "head_agreement": agreement_note}, sys.stdout, indent=2)
        return
    table = Table(title=f"greedy decoding on {args.checkpoint.name}: {args.prompts} prompts ({text_name}) of "
                        f"{args.prompt_len} tokens, {args.new_tokens} new tokens, batch 1; head agreement {agreement_note}")
    for column in ("engine", "tokens/s", "vs HF eager", "vs HF lookup", "tokens per forward", "identical to HF greedy",
                   "repeated 4-grams in output"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["engine"], f"{row['tokens_per_second']:.0f}", f"{row['vs_hf_eager']:.2f}",
                      f"{row['vs_hf_lookup']:.2f}",
                      f"{row['tokens_per_forward']:.2f}" if row["engine"].startswith("lmforge") else "—",
                      "yes" if row["identical_to_hf_greedy"] else "NO", f"{row['repeated_4grams']:.0%}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
