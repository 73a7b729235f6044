"""The `lmforge` command: compile, run, bench, passes, info, debug, diff."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="lmforge: a compiler for LLM inference.")
console = Console()
errors = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors")) -> None:
    _state["debug"] = debug


def _one_line_errors(command):
    """Print any failure as one line on stderr and exit 1 (a traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:  # the CLI contract: never a traceback unless asked
            if _state["debug"]:
                traceback.print_exc()
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            from lmforge.errors import LmforgeError

            user_error = isinstance(exc, (LmforgeError, typer.BadParameter))
            prefix = "error" if user_error else f"error ({type(exc).__name__})"
            errors.print(f"[red]{prefix}:[/red] {message}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _compact(entry: dict) -> str:
    """A pass's notes, or else its scalar measurements (search trials and matrices are in --json)."""
    if entry["notes"]:
        return "\n".join(entry["notes"])
    scalars = {k: v for k, v in entry["measurements"].items() if isinstance(v, (int, float, str, bool))}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command("compile")
@_one_line_errors
def compile_(
    checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="recipe YAML (default: the built-in default)"),
    output: Path = typer.Option(..., "--output", "-o", help="artifact directory to write"),
    bisect_limit: Optional[int] = typer.Option(
        None, "--bisect", min=0, help="apply only the first N rewrites of the pipeline (see `lmforge debug bisect`)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Capture CHECKPOINT, run the recipe's passes, and write an artifact."""
    import lmforge
    from lmforge.compiler.recipe import load_recipe

    parsed = load_recipe(str(recipe) if recipe else None)
    start = time.perf_counter()
    progress, on_pass, within_pass = _compile_progress(len(parsed.passes), as_json)
    with progress, _cpp_bucket_bars(parsed.codegen.backend, progress):
        compiled = lmforge.optimize(checkpoint, parsed, on_pass=on_pass, progress=within_pass, rewrite_limit=bisect_limit)
        task = progress.add_task("save", total=1)
        compiled.save(output, progress=within_pass)  # the triton backend compiles its kernels here
        progress.advance(task)
    history = compiled.program.history
    if as_json:
        _print_json({"artifact": str(output), "seconds": time.perf_counter() - start, "history": history})
        return
    table = Table(title=f"compiled {checkpoint} → {output}")
    for column in ("pass", "seconds", "ops before", "ops after", "rewrites", "notes / measurements"):
        table.add_column(column)
    for entry in history:
        table.add_row(
            entry["pass"], f"{entry['seconds']:.3f}", str(entry["ops_before"]), str(entry["ops_after"]),
            str(entry["rewrites"]), _compact(entry),
        )
    console.print(table)


@app.command()
@_one_line_errors
def run(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", min=0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON record instead of streaming text"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the artifact's runtime.device, else cpu)"),
) -> None:
    """Generate a continuation of PROMPT with a compiled artifact."""
    import lmforge

    model = lmforge.load(artifact, device=device)
    if model.tokenizer is None:
        raise typer.BadParameter("the artifact has no tokenizer files")
    if model.recipe.codegen.backend == "inductor":
        errors.print("[dim]backend inductor: the first call compiles the graph (about 40 s on 2 cores)…[/dim]")
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids.to(model.engine.device)
    streamer = None if as_json else _TextStream(model.tokenizer)
    start = time.perf_counter()
    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=errors,
                    disable=as_json)
    with _cpp_bucket_bars(model.recipe.codegen.backend, bars, shown_while_compiling=True):
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
            top_k=top_k, top_p=top_p, seed=seed, streamer=streamer,
        )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    record = {
        "prompt": prompt, "completion": model.tokenizer.decode(new), "new_tokens": len(new),
        "seconds": seconds, "tokens_per_second": len(new) / seconds,
    }
    if as_json:
        _print_json(record)
    else:
        errors.print(f"\n[dim]{record['new_tokens']} tokens in {seconds:.2f} s "
                     f"({record['tokens_per_second']:.1f} tokens/s, including prefill)[/dim]")


class _TextStream:
    """Prints the completion as it is generated (HF streamer protocol: put/end)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.printed, self.prompt_seen = tokenizer, [], 0, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            sys.stdout.write(self.tokenizer.decode(value[0]))
            sys.stdout.flush()
            return
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed :])
            sys.stdout.flush()
            self.printed = len(text)

    def end(self) -> None:
        sys.stdout.write(self.tokenizer.decode(self.tokens)[self.printed :] + "\n")


@app.command()
@_one_line_errors
def serve(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="requests batched together at most"),
    max_tokens_per_step: int = typer.Option(4096, "--max-tokens-per-step", min=0,
                                            help="tokens one step may process (decode tokens + prompt chunks); "
                                                 "0: no limit, every prompt prefilled whole (no chunking)"),
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", min=1,
                                            help="16-token blocks of the paged KV cache (default: max-batch full contexts)"),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache",
                                         help="compute every prompt whole instead of reusing cached prefix blocks"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the artifact's runtime.device, else cpu)"),
) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    import uvicorn

    import lmforge
    from lmforge.serve.app import create_app

    model = lmforge.load(artifact, device=device)
    if model.tokenizer is None:
        raise typer.BadParameter("the artifact has no tokenizer files")
    name = artifact.resolve().name
    server = create_app(model, name, max_batch=max_batch, max_tokens_per_step=max_tokens_per_step, kv_blocks=kv_blocks,
                        prefix_caching=not no_prefix_cache)
    errors.print(f"serving '{name}' on http://{host}:{port}/v1: {server.state.scheduling}", highlight=False)
    uvicorn.run(server, host=host, port=port, log_level="warning")


@app.command()
@_one_line_errors
def bench(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="HF checkpoint to compare with (default: the one compiled)"),
    batch: int = typer.Option(1, "--batch", "-b", min=1),
    prompt_len: int = typer.Option(64, "--prompt-len", min=1),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    repeats: int = typer.Option(3, "--repeats", min=1),
    as_json: bool = typer.Option(False, "--json"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the artifact's runtime.device, else cpu)"),
) -> None:
    """Time greedy generation: Hugging Face generate vs the artifact, same prompts (from the second
    half of the checkpoint's heldout.txt), one process, the two timed alternately run by run."""
    import torch
    from transformers import AutoModelForCausalLM

    import lmforge
    from lmforge.benchmarking import heldout_prompts, prompt_text_for, time_alternating

    model = lmforge.load(artifact, device=device)
    checkpoint = checkpoint or model.program.meta.get("source")
    if checkpoint is None or not Path(checkpoint).is_dir():
        raise typer.BadParameter("no checkpoint to compare with; pass --checkpoint")
    # the path may come from the artifact's meta, so never with the checkpoint's own code
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=False).eval()
    hf.to(device=model.engine.device, dtype=getattr(torch, model.program.meta["dtype"]))  # compared like for like
    prompts = heldout_prompts(prompt_text_for(checkpoint), model.tokenizer, batch, prompt_len)
    shortest = min(len(p) for p in prompts)
    ids = torch.tensor([p[:shortest] for p in prompts], device=model.engine.device)
    mask = torch.ones_like(ids)
    hf_gen = lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False)
    ours_gen = lambda: model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=[])
    with torch.no_grad():
        timings = time_alternating({"hf": hf_gen, "lmforge": ours_gen}, ids.shape[1], repeats)
    theirs, ours = timings["hf"], timings["lmforge"]
    record = {
        "batch": batch, "prompt_len": ids.shape[1], "new_tokens": max_new_tokens,
        "hf_tokens_per_second": theirs.tokens_per_second, "lmforge_tokens_per_second": ours.tokens_per_second,
        "ratio": ours.tokens_per_second / theirs.tokens_per_second,
        "identical_tokens": bool(torch.equal(theirs.output, ours.output)),
        "cuda_graphs": model.engine.graph_report(),
    }
    if as_json:
        _print_json(record)
        return
    table = Table(title=f"greedy decode, batch {batch}, prompt {ids.shape[1]}, {max_new_tokens} new tokens")
    for column in ("engine", "tokens/s", "ratio to HF", "identical tokens"):
        table.add_column(column)
    table.add_row("HF generate (eager PyTorch)", f"{theirs.tokens_per_second:.1f}", "1.00", "—")
    table.add_row("lmforge", f"{ours.tokens_per_second:.1f}", f"{record['ratio']:.2f}", str(record["identical_tokens"]))
    console.print(table)
    console.print(record["cuda_graphs"], highlight=False)


@app.command()
@_one_line_errors
def passes(as_json: bool = typer.Option(False, "--json")) -> None:
    """List every registered pass with its options and defaults."""
    from lmforge.passes import PASSES

    records = []
    for name, cls in sorted(PASSES.items()):
        options = [
            {"name": field, "type": _type_name(info.annotation), "default": info.default, "description": info.description}
            for field, info in cls.Config.model_fields.items()
        ]
        records.append({"name": name, "description": cls.description, "lossless": cls.lossless, "options": options})
    if as_json:
        _print_json(records)
        return
    for record in records:
        table = Table(title=f"{record['name']} — {record['description']}", title_justify="left")
        for column in ("option", "type", "default", "description"):
            table.add_column(column)
        for option in record["options"]:
            table.add_row(option["name"], option["type"], repr(option["default"]), option["description"] or "")
        console.print(table)


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@app.command()
@_one_line_errors
def info(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    context: int = typer.Option(2048, "--context", min=1, help="tokens of context for kv_cache_bytes"),
    profile: bool = typer.Option(False, "--profile", help="also time and profile a few decode steps (seconds; a cpp "
                                 "artifact compiles its decode step first)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Summarise an artifact: versions, passes applied, weight and KV-cache bytes; with --profile,
    where a decode step's time goes and the limit memory bandwidth puts on it."""
    import torch

    from lmforge.compiler.artifact import read_manifest, read_recipe_text
    from lmforge.compiler.recipe import parse_recipe
    from lmforge.runtime.cuda_graphs import graph_plan
    from lmforge.runtime.kv_cache import kv_cache_bytes

    manifest = read_manifest(artifact)
    meta = manifest["meta"]
    recipe = parse_recipe(read_recipe_text(artifact), str(artifact / "recipe.yaml"))
    record = {
        "artifact": str(artifact),
        "architecture": manifest["architecture"],
        "versions": manifest["versions"],
        "num_layers": meta["num_layers"],
        "dtype": meta["dtype"],
        "weight_bytes": manifest["weight_bytes"],
        "context": context,
        "kv_cache_bytes": kv_cache_bytes(meta["kv_cache"], context, 1, getattr(torch, meta["dtype"])),
        "passes": [
            {k: h[k] for k in ("pass", "seconds", "ops_before", "ops_after", "rewrites", "measurements")}
            for h in manifest["history"]
        ],
        **_kernel_record(manifest),
        "cuda_graphs": graph_plan(meta, recipe.codegen.backend, recipe.runtime.cuda_graphs),
    }
    if recipe.codegen.backend == "cpp":
        record["cpp_buckets"] = _cpp_bucket_times(artifact, recipe.codegen.cpp_products)
    if profile:
        from lmforge.benchmarking_breakdown import profile_artifact

        record["profile"] = profile_artifact(artifact)
    if as_json:
        _print_json(record)
        return
    console.print(f"[bold]{artifact}[/bold]: {record['architecture']}, {record['num_layers']} layers, {record['dtype']}")
    console.print(f"versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}")
    console.print(f"weight_bytes: {record['weight_bytes']:,}")
    console.print(f"kv_cache_bytes at {context} tokens, batch 1: {record['kv_cache_bytes']:,}")
    console.print(record["cuda_graphs"], highlight=False)
    table = Table(title="pass history")
    for column in ("pass", "seconds", "ops before → after", "rewrites"):
        table.add_column(column)
    for entry in record["passes"]:
        table.add_row(entry["pass"], f"{entry['seconds']:.3f}", f"{entry['ops_before']} → {entry['ops_after']}", str(entry["rewrites"]))
    console.print(table)
    for entry in record["passes"]:
        if entry["pass"] == "verify" and "status" in entry["measurements"]:
            stages = sorted({check["stage"] for check in entry["measurements"]["checks"]})
            console.print(f"verify: {entry['measurements']['status']}, {len(entry['measurements']['checks'])} checks "
                          f"({'; '.join(stages)})", highlight=False)
            lowered = entry["measurements"].get("lowered")
            if isinstance(lowered, dict) and "not_run" in lowered:
                console.print(f"verify: {lowered['not_run']}", highlight=False)
    if "kernels" in record:
        _print_kernels(record)
    if "cpp_buckets" in record:
        _print_cpp_buckets(record["cpp_buckets"])
    from lmforge.benchmarking_breakdown import compiled_step_note, profile_renderables

    backend = recipe.codegen.backend
    printed = profile_renderables(record["profile"], backend) if profile else [compiled_step_note(backend)]
    for renderable in filter(None, printed):
        console.print(renderable, highlight=False)


def _cpp_bucket_times(artifact: Path, products: str) -> list[dict]:
    """The `cpp` buckets compiled on this machine for the artifact's program, with their first
    compile times (the cache is keyed by the program, so this reads its graph and weights)."""
    from lmforge.codegen.cpp_backend import bucket_compile_times
    from lmforge.compiler.artifact import load_artifact

    program, _ = load_artifact(artifact)
    return bucket_compile_times(program.graph_module, products)


def _print_cpp_buckets(buckets: list[dict]) -> None:
    if not buckets:
        console.print("cpp buckets: none compiled on this machine yet; each compiles on its first use "
                      "(a generate at batch 1 needs two: any length and 1 token)", highlight=False)
        return
    table = Table(title="cpp buckets compiled on this machine (first compile, seconds; later loads use the cache)")
    for column in ("bucket", "first compile", "export", "lowering", "codegen", "c++ build"):
        table.add_column(column, justify="left" if column == "bucket" else "right")
    for bucket in buckets:
        phases = [bucket["phases"].get(phase) for phase in ("lowering", "codegen", "c++ build")]
        table.add_row(bucket["bucket"], f"{bucket['compile_seconds']:.1f}", f"{bucket['export_seconds']:.1f}",
                      *("" if seconds is None else f"{seconds:.1f}" for seconds in phases))
    console.print(table)


def _kernel_record(manifest: dict) -> dict:
    """The triton backend's kernels (generated, then attention) with their per-target
    report, a decode step's launches and the roofline estimate; nothing for other backends."""
    report = manifest.get("kernel_report")
    if report is None:
        return {}
    kernels = [{**entry, "source": entry["file"]} for entry in manifest["kernels"]]
    kernels += [{**entry, "source": entry["module"]} for entry in manifest.get("library_kernels", [])]
    return {"kernels": [{key: entry[key] for key in ("name", "ops", "source", "config", "targets") if key in entry}
                        for entry in kernels],
            "targets": report["targets"], "decode_launches": report["decode_launches"],
            "decode_attention_roofline": report["decode_attention_roofline"]}


def _print_kernels(record: dict) -> None:
    targets = record["targets"]
    table = Table(title=f"triton kernels ({len(record['kernels'])}), compiled ahead of time for "
                        f"{', '.join(targets) or 'no target (codegen.targets is empty)'}")
    table.caption = "per target: registers / spilled bytes / shared memory / occupancy"
    table.add_column("kernel", no_wrap=True)
    table.add_column("ops", justify="right")
    for target in targets:
        table.add_column(target, no_wrap=True)
    for kernel in record["kernels"]:
        cells = [f"{t['registers']}/{t['spills'] + t['spill_loads']}/"
                 f"{(t['shared_bytes'] + t['static_shared_bytes']) / 1024:.1f}K/{t['occupancy_fraction']:.0%}"
                 for t in (kernel["targets"][target] for target in targets)]
        table.add_row(kernel["name"], str(len(kernel["ops"])), *cells)
    console.print(table)
    launches = record["decode_launches"]
    besides = ", ".join(f"{'outside layers' if layer == 'None' else 'layer ' + layer}: {count}"
                        for layer, count in launches["besides_matmuls"].items())
    console.print(f"decode step launches besides matmuls (batch {launches['batch']}, {launches['context']} tokens of "
                  f"context): at most {launches['most_in_a_layer_besides_matmuls']} per layer ({besides})",
                  highlight=False)
    roofline = record["decode_attention_roofline"]
    times = ", ".join(f"{gpu} {us:g} us" for gpu, us in roofline["microseconds_at_peak"].items())
    rule = f", {roofline['split_rule']}" if "split_rule" in roofline else ""  # older artifacts lack it
    console.print(f"decode attention roofline at {roofline['context']} tokens ({roofline['dtype']}, "
                  f"{roofline['splits']} splits{rule}): {roofline['useful_fraction']:.1%} of the bytes moved are "
                  f"keys and values; {roofline['total_bytes']:,} bytes a token, at peak bandwidth {times}",
                  highlight=False)


def _compile_progress(total_passes: int, as_json: bool):
    """A rich progress bar over the passes plus a line for long work inside a pass."""
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=errors, disable=as_json,
    )
    task = progress.add_task("load + capture", total=total_passes)
    inner: list = []

    def on_pass(index, pass_, result):
        if result is None:
            progress.update(task, description=f"pass {index + 1}/{total_passes}: {pass_.name}")
        else:
            progress.advance(task)

    def within_pass(description: str, done: int, total: int) -> None:
        if not inner:
            inner.append(progress.add_task(description, total=total))
        progress.update(inner[0], description=f"  {description}", completed=done, total=total)

    return progress, on_pass, within_pass


def _cpp_bucket_bars(backend: str, progress: Progress, shown_while_compiling: bool = False):
    """A context in which each bucket a `cpp` program compiles (minutes the first time, then
    loaded from the cache) gets its own bar on `progress`, ending with its compile time;
    with `shown_while_compiling`, `progress` is on screen only while a bucket is in work, so
    text streamed between buckets is not held behind it. Nothing for other backends."""
    if backend != "cpp":
        return contextlib.nullcontext()
    from lmforge.codegen.cpp_backend import bucket_progress

    tasks: dict[str, int] = {}

    def on_bucket(description: str, done: int, total: int) -> None:
        bucket = description.split(":")[0]
        if bucket not in tasks:
            tasks[bucket] = progress.add_task(description, total=total)
        if shown_while_compiling and not progress.live.is_started:
            progress.start()
        progress.update(tasks[bucket], description=description, completed=done, total=total, visible=True)
        if shown_while_compiling and done == total:
            progress.stop()  # its last line stays printed; hidden so the next bucket's bars do not repeat it
            progress.update(tasks[bucket], visible=False)

    return bucket_progress(on_bucket)


def _budget_from(text: str | None, **limits):
    """The bisect budget from `--budget max_kl=0.01,min_top1=0.9` and the single-limit flags."""
    from lmforge.debug.bisect import BisectBudget
    from lmforge.errors import LmforgeError

    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in limits:
            raise LmforgeError(f"--budget: unknown limit {key!r}; choose from {', '.join(limits)}")
        try:
            limits[key] = float(value)
        except ValueError:
            raise LmforgeError(f"--budget: {key} needs a number, got {value!r}") from None
    return BisectBudget(**limits)


@app.command()
@_one_line_errors
def debug(
    target: str = typer.Argument(..., help="CHECKPOINT, or the word `bisect` followed by CHECKPOINT"),
    checkpoint_for_bisect: Optional[Path] = typer.Argument(None, metavar="[CHECKPOINT]", help="with `bisect`"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="recipe YAML (default: the built-in default)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="directory for dumps, debug.json, report.html"),
    print_after: Optional[list[str]] = typer.Option(None, "--print-after", help="dump only after these passes (repeatable)"),
    stop_after: Optional[str] = typer.Option(None, "--stop-after", help="run the pipeline up to this pass"),
    bisect_limit: Optional[int] = typer.Option(None, "--bisect", min=0, help="apply only the first N rewrites"),
    max_logit_error: Optional[float] = typer.Option(None, help="bisect budget: largest logit error (default 1e-3)"),
    max_kl: Optional[float] = typer.Option(None, help="bisect budget: largest mean KL"),
    min_top1: Optional[float] = typer.Option(None, help="bisect budget: smallest top-1 agreement"),
    max_ppl_increase: Optional[float] = typer.Option(None, help="bisect budget: largest perplexity increase"),
    budget: Optional[str] = typer.Option(
        None, "--budget", help="bisect budget in one option, e.g. max_kl=0.01,min_top1=0.9 (default max_logit_error=1e-3)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print a JSON record"),
) -> None:
    """Pass-level debugging. `lmforge debug CKPT -o DIR` compiles with every instrument on
    (per-pass dumps, diffs, provenance, verify-each against the original model) and writes
    DIR/debug.json and DIR/report.html. `lmforge debug bisect CKPT` finds the first rewrite
    (pass and layer) after which the budget is broken."""
    from lmforge.compiler.recipe import load_recipe

    parsed = load_recipe(str(recipe) if recipe else None)
    if target == "bisect":
        if checkpoint_for_bisect is None:
            raise typer.BadParameter("usage: lmforge debug bisect CHECKPOINT [--recipe R] [budget options]")
        from lmforge.debug.bisect import bisect

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=errors,
                      disable=as_json) as progress:
            task = progress.add_task("bisecting", total=None)
            limits = _budget_from(budget, max_logit_error=max_logit_error, max_kl=max_kl, min_top1=min_top1,
                                  max_ppl_increase=max_ppl_increase)
            result = bisect(checkpoint_for_bisect, parsed, limits,
                            progress=lambda description, done, total: progress.update(task, description=description))
        if as_json:
            _print_json(result.as_dict())
        else:
            console.print(result.message)
        return
    if output is None:
        raise typer.BadParameter("--output / -o is required: the directory for dumps and the report")
    from lmforge.debug.session import debug_compile

    progress, on_pass, within_pass = _compile_progress(len(parsed.passes), as_json)
    with progress:
        run = debug_compile(Path(target), parsed, output, print_after=set(print_after) if print_after else None,
                            stop_after=stop_after, rewrite_limit=bisect_limit, on_pass=on_pass, progress=within_pass)
    if as_json:
        _print_json(run.as_dict())
        return
    table = Table(title=f"debug {target}: {len(run.compiled.rewrite_log)} rewrites")
    for column in ("pass", "s", "ops", "+/−/~ nodes", "max logit err", "top-1", "KL", "greedy", "first divergent layer"):
        table.add_column(column)
    for entry in run.compiled.program.history:
        check, diff = entry.get("verify_each", {}), entry.get("diff", {})
        divergent = check.get("first_divergent_layer")
        table.add_row(
            entry["pass"], f"{entry['seconds']:.2f}", f"{entry['ops_before']}→{entry['ops_after']}",
            f"+{diff.get('added', 0)} −{diff.get('removed', 0)} ~{diff.get('rewired', 0)}",
            f"{check.get('max_logit_error', 0):.3g}", f"{check.get('top1', 0):.4f}", f"{check.get('kl', 0):.3g}",
            check.get("status", "lossy"), "—" if divergent is None else f"layer {divergent['layer']}",
        )
    console.print(table)
    console.print(f"dumps, debug.json and report.html in {output}")


@app.command("train-heads")
@_one_line_errors
def train_heads_command(
    checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint directory (the base model, kept frozen)"),
    output: Path = typer.Option(..., "--output", "-o", help="directory for heads.safetensors and heads.json"),
    data: Path = typer.Option(..., "--data", help="text file or directory to train on (its end is held out)"),
    heads: int = typer.Option(3, "--heads", min=1, max=8, help="number of heads (head i predicts token t+2+i); "
                              "eagle: tokens its chain drafts per step"),
    kind: str = typer.Option("hydra", "--kind", help="hydra (each head also reads the token drafted before it; run by "
                             "the runtime; measured faster here), medusa (independent heads, fused into the program) or eagle (one decoder "
                             "layer over the model's hidden states, drafting autoregressively)"),
    steps: int = typer.Option(300, "--steps", min=1, help="Adam steps (8 windows of --seq-len tokens each)"),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seq_len: int = typer.Option(128, "--seq-len", min=16),
    first_half: bool = typer.Option(False, "--first-half", help="use only the first half of the --data file: "
                                    "`lmforge bench` and benchmarks/ prompt with the second half of heldout.txt"),
    minutes: float | None = typer.Option(None, "--minutes", min=0.0, help="eagle: stop training after this much "
                                         "wall-clock time (checkpointed; run again to continue towards --steps)"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON record"),
) -> None:
    """Train Hydra (default) or Medusa draft heads on CHECKPOINT by self-distillation; resumable (the training
    state is checkpointed in OUTPUT every 50 steps); prints each head's held-out agreement
    with the model's own greedy choice before and after training."""
    from lmforge.api import load_tokenizer
    from lmforge.benchmarking import split_heldout, text_windows
    from lmforge.compiler.capture import load_reference
    from lmforge.draft_heads import agreement, initial_heads, rank_hits, save_heads, train_heads
    from lmforge.errors import LmforgeError
    from lmforge.passes.calibrate import token_windows

    if kind not in ("medusa", "hydra", "eagle"):
        raise LmforgeError(f"--kind {kind!r}: choose medusa, hydra or eagle")
    if first_half and not data.is_file():
        raise LmforgeError(f"--first-half: --data {data} must be one text file")
    if minutes is not None and kind != "eagle":
        raise LmforgeError(f"--minutes: only --kind eagle trains against a wall-clock budget, not {kind}")
    model = load_reference(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    if first_half:
        windows = text_windows(split_heldout(data.read_text())[0], tokenizer, seq_len)
    else:
        windows = token_windows(data, tokenizer, seq_len)
    held_out = 16
    if windows.shape[0] < held_out + 8:
        raise LmforgeError(f"--data {data} gives {windows.shape[0]} windows of {seq_len} tokens; train-heads needs at "
                           f"least {held_out + 8} (the last {held_out} are held out)")
    train_ids, heldout_ids = windows[:-held_out], windows[-held_out:]
    if kind == "eagle":
        _train_eagle(model, train_ids, heldout_ids, output, as_json, depth=heads, steps=steps, lr=lr, minutes=minutes,
                     record={"heads": heads, "kind": kind, "steps": steps, "train_windows": train_ids.shape[0],
                             "data": str(data), "first_half": first_half})
        return
    before = agreement(initial_heads(model, heads, kind), model, heldout_ids)
    progress, _, within = _compile_progress(1, as_json)
    with progress:
        trained, run = train_heads(model, train_ids, count=heads, kind=kind, steps=steps, lr=lr,
                                   checkpoint=output / "training.safetensors", progress=within)
    ranks = rank_hits(trained, model, heldout_ids)
    after = [head[0] for head in ranks]
    record = {"heads": heads, "kind": kind, "steps": steps, "resumed_from": run.resumed_from, "train_windows": train_ids.shape[0],
              "data": str(data), "first_half": first_half,
              "heldout_agreement_untrained": before, "heldout_agreement": after, "heldout_rank_hits": ranks,
              "final_loss": run.losses[-1] if run.losses else None}
    save_heads(output, trained, model, record)
    if as_json:
        _print_json(record)
        return
    table = Table(title=f"{kind} draft heads for {checkpoint.name} → {output}")
    for column in ("head", "predicts", "held-out agreement, untrained", "after training"):
        table.add_column(column)
    for index, (start, end) in enumerate(zip(before, after)):
        table.add_row(str(index), f"token t+{index + 2}", f"{start:.1%}", f"{end:.1%}")
    console.print(table)


def _train_eagle(model, train_ids, heldout_ids, output: Path, as_json: bool, *, depth: int, steps: int, lr: float,
                 minutes: float | None, record: dict) -> None:
    """`train-heads --kind eagle`: train the drafter (4 windows a step, for at most `minutes`),
    then measure on the held-out windows' second halves, generated by the model itself, its
    greedy acceptance per depth and what dynamic trees need (`eagle.calibration`)."""
    from lmforge.draft_heads import save_heads
    from lmforge.eagle import acceptance_per_depth, greedy_continuations, initial_eagle, train_eagle
    from lmforge.eagle.calibration import tree_measurements

    prompt_len = heldout_ids.shape[1] // 2
    sequences = greedy_continuations(model, heldout_ids[:, :prompt_len], heldout_ids.shape[1] - prompt_len)
    before = acceptance_per_depth(initial_eagle(model, depth), model, sequences, prompt_len)
    progress, _, within = _compile_progress(1, as_json)
    with progress:
        drafter, run = train_eagle(model, train_ids, depth=depth, steps=steps, lr=lr,
                                   checkpoint=output / "training.safetensors", progress=within,
                                   seconds=minutes * 60 if minutes is not None else None)
    after = acceptance_per_depth(drafter, model, sequences, prompt_len)
    record.update(tree_measurements(drafter, model, sequences, prompt_len))
    record.update(resumed_from=run.resumed_from, steps_done=run.resumed_from + run.steps_run, heldout_untrained=before,
                  **after, heldout_agreement=after["acceptance_per_depth"],
                  final_loss=run.losses[-1] if run.losses else None)
    save_heads(output, drafter, model, record)
    if as_json:
        _print_json(record)
        return
    table = Table(title=f"eagle drafter → {output}: held-out greedy acceptance (depth d, given depths < d accepted)")
    for column in ("depth", "untrained", "after training"):
        table.add_column(column)
    for depth_index, (start, end) in enumerate(zip(before["acceptance_per_depth"], after["acceptance_per_depth"])):
        table.add_row(str(depth_index + 1), f"{start:.1%}", f"{end:.1%}")
    console.print(table)
    console.print(f"tokens per verify forward from the drafter alone: {after['tokens_per_forward']:.2f}; "
                  f"steps done {record['steps_done']} of {steps}")
    console.print(f"dynamic trees: accepted drafts per node budget {record['tree_accepted_per_budget']}, "
                  f"adaptive-depth threshold {record['tree_threshold']}")


@app.command()
@_one_line_errors
def diff(
    first: Path = typer.Argument(..., help="artifact directory A"),
    second: Path = typer.Argument(..., help="artifact directory B"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON record"),
) -> None:
    """What differs between two artifacts: recipes, pass decisions, weights, quality."""
    from lmforge.debug.diff import describe_artifact_diff, diff_artifacts

    record = diff_artifacts(first, second)
    if as_json:
        _print_json(record)
    else:
        console.print(describe_artifact_diff(record), highlight=False, markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
