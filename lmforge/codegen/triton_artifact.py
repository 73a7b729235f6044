"""The `triton` backend's share of an artifact: kernel sources, ahead-of-time binaries for
NVIDIA targets with their resource report, and the check at load time that the stored
sources are the ones lmforge generates from the program.

What is written (all under `kernels/`, every file hashed in the manifest like any other):
each generated kernel's source `<name>.py`, and for each kernel — generated ones and the
attention kernels of `codegen/triton/` the program runs — and each `codegen.targets` entry,
`<name>.<target>.ptx` and `.cubin`. The manifest's `kernels` (generated) and
`library_kernels` (attention) entries carry the report per target (`aot.py`: registers,
spills, shared memory, occupancy); `kernel_report` holds a decode step's launches per layer
(`triton_launches.py`) and the decode-attention roofline estimate at 4k tokens of context
(`roofline.py`) for this model's shape. A kernel that spills or overflows shared memory on
a target fails the compile, naming kernel, configuration and target.

A generated kernel is compiled at the largest tile its launcher picks (BLOCK_R = MAX_TILE //
BLOCK_C, a long prefill): the configuration that needs the most registers. Attention kernels
are compiled in every variant the program's attention ops can launch (`aot.launchable_attention_specs`:
decode and prefill, over a forward's own keys, a ring's positions, a draft tree, block-sparse lists,
merged and evicting caches) at this model's head size, grouping and dtype, padded, and soft-capped
when the model caps its logits; and, when every attention op the program calls has a paged path, the
paged kernel a serving step launches over a block pool (`aot.paged_attention_specs`).
The int8 and int4 linear layers' dequantizing matmul (`triton/quantized_linear.py`) is compiled,
GEMV and GEMM, for each group size and bias its layers use, among the `library_kernels`.

Triton fixes at its first import in a process whether it interprets (TRITON_INTERPRET=1) or
compiles. Compiling ahead of time needs the latter and counting launches on a CPU needs the
former, so whichever the saving process cannot do runs in a child process
(`python -m lmforge.codegen.triton_artifact aot|launches`) with the environment it needs;
neither step is ever skipped. The child compiles only sources generated in the parent, and
counts launches by loading the staged artifact with `load_artifact`, which checks it.

Nothing here is executed from an artifact: loading re-emits the kernels from the program
(codegen is deterministic) and refuses an artifact whose stored sources differ; the runtime
launches the kernels it generated itself, and lmforge never loads the stored PTX or cubin (on a
GPU, Triton compiles the regenerated source itself).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.codegen.aot import (
    compile_for_targets,
    launchable_attention_specs,
    paged_attention_specs,
    spec_from_emitted,
)
from lmforge.codegen.roofline import PEAK_BANDWIDTH, decode_attention_roofline, decode_splits
from lmforge.codegen.triton.quantized_linear import aot_kernel_specs, quantized_linear_formats
from lmforge.codegen.triton_backend import emit_kernels
from lmforge.codegen.triton_emit import MAX_BLOCK_C, MAX_TILE, load_source
from lmforge.compiler.ops import ATTENTION_OPS, ffn_skip_gate
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import CodegenConfig
from lmforge.errors import LmforgeError

ProgressFn = Callable[[str, int, int], None]

LAUNCH_CONTEXT = 16
"""Tokens prefilled before the decode step whose launches are counted (one split)."""
ROOFLINE_CONTEXT = 4096
ROOFLINE_GPUS = ("A100-80GB-SXM", "H100-SXM")
KERNELS_DIR = "kernels"
PAGED_OPS = frozenset({"lmforge::attention", "lmforge::tree_attention"})
"""The attention ops with a paged kernel. A program that calls no other attention op and
does not skip FFNs per forward can be served over a block pool
(`runtime.paged.paging_unsupported_reason` says the same at serving time)."""
UNPAGED_OPS = frozenset({op._schema.name for op in (*ATTENTION_OPS, ffn_skip_gate)}) - PAGED_OPS


def interpreting() -> bool:
    """Whether Triton interprets in this process: its own library functions (tl.sum, …)
    are compiled functions only when it was first imported without TRITON_INTERPRET."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.standard.sum, JITFunction)


@dataclass(frozen=True)
class _JobKernel:
    """A generated kernel as `aot.spec_from_emitted` reads it, rebuilt from its source."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, int | None]
    ops: list[str]


def aot_job(program: Program, codegen: CodegenConfig) -> dict:
    """What the ahead-of-time compile needs, as JSON: the generated kernels' sources and
    signatures, the attention shapes and the targets."""
    config = program.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {
        "targets": list(codegen.targets),
        "generated": [{"name": kernel.name, "source": kernel.source, "signature": kernel.signature,
                       "constexprs": kernel.constexprs, "ops": kernel.ops} for kernel in emit_kernels(program)],
        "attention": {"head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
                      "group": heads // kv_heads, "dtype": program.meta["dtype"],
                      "softcap": bool(getattr(config, "attn_logit_softcapping", None)),
                      **_attention_ops(program)},
        "quantized": quantized_linear_formats(program.graph_module),
    }


def _attention_ops(program: Program) -> dict:
    """The lmforge ops the program's graph calls (which attention kernel variants it can
    launch), the largest block-sparse block among its `sparse_attention` calls, and the
    tokens of its draft tree's verify forward (root and nodes; None without a fixed tree)."""
    ops, blocks = set(), []
    for node in program.graph_module.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.name.startswith("lmforge::"):
            continue
        ops.add(schema.name)
        if schema.name == "lmforge::sparse_attention":
            arguments = {**dict(zip((argument.name for argument in schema.arguments), node.args)), **node.kwargs}
            blocks.append(int(arguments["block"]))
    widths = program.meta.get("speculation", {}).get("draft_heads", {}).get("tree")
    verify = None
    if isinstance(widths, list):
        verify = 1 + sum(math.prod(widths[: depth + 1]) for depth in range(len(widths)))
    return {"ops": sorted(ops), "sparse_block": max(blocks, default=None), "verify_tokens": verify}


def _generated_spec(entry: dict):
    fn = load_source(entry["name"], entry["source"])[f"{entry['name']}_kernel"]
    kernel = _JobKernel(entry["name"], fn, entry["signature"], entry["constexprs"], entry["ops"])
    return spec_from_emitted(kernel, rows=MAX_TILE, columns=MAX_BLOCK_C)


def _attention_specs(attention: dict) -> list:
    """Every attention kernel the program can launch: in a batch that advances together and,
    when it can be served over a block pool, in a serving step (the paged kernel)."""
    dtype = getattr(torch, attention["dtype"])
    specs = launchable_attention_specs(attention["ops"], attention["head_dim"], attention["group"], dtype,
                                       attention["softcap"], attention["sparse_block"], attention["verify_tokens"])
    ops = set(attention["ops"])
    if ops & PAGED_OPS and not ops & UNPAGED_OPS:
        specs += paged_attention_specs(attention["head_dim"], attention["group"], dtype, attention["softcap"])
    return specs


def _entry(spec, reports: dict, extra: dict) -> dict:
    targets = {target: {**report.summary(), "ptx": f"{KERNELS_DIR}/{spec.name}.{target}.ptx",
                        "cubin": f"{KERNELS_DIR}/{spec.name}.{target}.cubin"} for target, report in reports.items()}
    return {"name": spec.name, "ops": list(spec.ops), **extra, "config": spec.config(), "targets": targets}


def run_aot_job(job: dict, artifact_dir: Path, progress: ProgressFn | None = None) -> dict:
    """Compile every kernel of `job` for its targets in this process (which must not be
    interpreting), writing PTX and cubin under `artifact_dir/kernels/`. Returns the report
    entries: {"generated": [...], "library": [...]}."""
    generated = [(_generated_spec(entry), {"file": f"{KERNELS_DIR}/{entry['name']}.py"}) for entry in job["generated"]]
    quantized = aot_kernel_specs(getattr(torch, job["attention"]["dtype"]), job.get("quantized", []))
    library = [(spec, {"module": spec.fn.fn.__module__}) for spec in [*_attention_specs(job["attention"]), *quantized]]
    everything = [*generated, *library]
    entries = []
    for done, (spec, extra) in enumerate(everything):
        if progress is not None:
            progress(f"compile {spec.name} for {', '.join(job['targets'])}", done, len(everything))
        entries.append(_entry(spec, compile_for_targets(spec, job["targets"], artifact_dir), extra))
    if progress is not None:
        progress("compile kernels ahead of time", len(everything), len(everything))
    return {"generated": entries[: len(generated)], "library": entries[len(generated):]}


def _child_environment(interpret: bool) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        environment["TRITON_INTERPRET"] = "1"
    package_root = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, environment.get("PYTHONPATH"))))
    return environment


def _run_child(command: str, argument: str, stdin: str, interpret: bool, progress: ProgressFn | None) -> Any:
    """Run this module as `command` in a child process; it prints JSON lines: progress
    updates, then the result or a one-line error, which is raised here."""
    child = subprocess.Popen([sys.executable, "-m", __name__, command, argument], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_child_environment(interpret))
    child.stdin.write(stdin)
    child.stdin.close()
    outcome = None
    for line in child.stdout:
        message = json.loads(line)
        if "progress" in message and progress is not None:
            progress(*message["progress"])
        outcome = message if "progress" not in message else outcome
    stderr = child.stderr.read()
    child.wait()
    if outcome is not None and "error" in outcome:
        raise LmforgeError(outcome["error"])
    if child.returncode != 0 or outcome is None:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {child.returncode}"
        raise LmforgeError(f"the {command} step of the triton backend failed in its child process: {last}")
    return outcome["result"]


def write_kernels(program: Program, codegen: CodegenConfig, artifact_dir: Path,
                  progress: ProgressFn | None = None) -> tuple[list[dict], list[dict]]:
    """Write the generated kernels' sources and, for each of `codegen.targets`, every
    kernel's PTX and cubin under `artifact_dir/kernels/`; return the manifest's `kernels`
    and `library_kernels` entries. Compiles in a child process when this one interprets."""
    job = aot_job(program, codegen)
    directory = artifact_dir / KERNELS_DIR
    directory.mkdir(exist_ok=True)
    for entry in job["generated"]:
        (directory / f"{entry['name']}.py").write_text(entry["source"])
    if not job["targets"]:
        return [{"name": entry["name"], "ops": entry["ops"], "file": f"{KERNELS_DIR}/{entry['name']}.py",
                 "targets": {}} for entry in job["generated"]], []
    if interpreting():
        report = _run_child("aot", str(artifact_dir), json.dumps(job), interpret=False, progress=progress)
    else:
        report = run_aot_job(job, artifact_dir, progress)
    return report["generated"], report["library"]


def decode_launches(program: Program) -> dict:
    """A decode step's launches after `LAUNCH_CONTEXT` tokens, batch 1, by layer and kind,
    and the most any layer makes besides its matrix products (this process must be able to
    run the kernels)."""
    from lmforge.codegen.triton_launches import decode_step_launches

    launches = decode_step_launches(program, context=LAUNCH_CONTEXT)
    besides = launches.besides_matmuls()
    in_layers = [count for layer, count in besides.items() if layer is not None]
    return {"context": LAUNCH_CONTEXT, "batch": 1, "total": len(launches.launches),
            "per_layer": {str(layer): counts for layer, counts in launches.by_layer().items()},
            "besides_matmuls": {str(layer): count for layer, count in besides.items()},
            "most_in_a_layer_besides_matmuls": max(in_layers, default=0)}


def decode_attention_estimate(program: Program, context: int = ROOFLINE_CONTEXT) -> dict:
    """The bytes-moved roofline of one decoded token's attention at `context` tokens, batch
    1, for this model's shape and dtype, as a step captured in a CUDA graph (how the engine
    runs decode on a GPU) over a full cache of `context` slots: the launcher's split count
    for that cache, and the rule that picked it (`roofline.decode_splits`)."""
    config = program.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype_bytes = torch.empty((), dtype=getattr(torch, program.meta["dtype"])).element_size()
    splits = decode_splits(kv_heads, context, cache_slots=context)
    estimates = {gpu: decode_attention_roofline(program.meta["num_layers"], heads, kv_heads, head_dim, dtype_bytes,
                                                context, splits, PEAK_BANDWIDTH[gpu]) for gpu in ROOFLINE_GPUS}
    first = next(iter(estimates.values()))
    return {"context": context, "batch": 1, "splits": splits.count, "split_rule": splits.rule,
            "dtype": program.meta["dtype"],
            "kv_bytes": first.kv_bytes, "total_bytes": first.total_bytes,
            "useful_fraction": round(first.useful_fraction, 4),
            "microseconds_at_peak": {gpu: round(estimate.microseconds_at_peak, 2) for gpu, estimate in estimates.items()}}


def kernel_report(program: Program, codegen: CodegenConfig, artifact_dir: Path) -> dict:
    """The manifest's `kernel_report` for the program as saved (on the CPU): targets, a
    decode step's launches, the roofline. Launches are counted in a child process under the
    interpreter, on the artifact written so far in `artifact_dir` (manifest included), when
    this process cannot run the kernels on the CPU."""
    from lmforge.codegen.triton_backend import triton_unavailable_reason

    if triton_unavailable_reason(program) is None:
        launches = decode_launches(program)
    else:
        launches = _run_child("launches", str(artifact_dir), "", interpret=True, progress=None)
    return {"targets": list(codegen.targets), "decode_launches": launches,
            "decode_attention_roofline": decode_attention_estimate(program)}


def check_stored_sources(program: Program, entries: Any, read_text: Callable[[str], str], where: Path) -> None:
    """Refuse an artifact whose `kernels` entries or stored sources are not exactly what
    lmforge generates from its program: the runtime runs only its own kernels, and a
    differing file means the artifact was altered (or written by another lmforge)."""
    generated = {kernel.name: kernel.source for kernel in emit_kernels(program)}
    if not isinstance(entries, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("file"), str)
            for entry in entries):
        raise LmforgeError(f"{where}: corrupted manifest (its kernels are not a list of entries with a name and a file)")
    names = [entry["name"] for entry in entries]
    if names != list(generated):
        raise LmforgeError(f"{where}: the manifest lists kernels {names[:6]}…, but the program generates "
                           f"{list(generated)[:6]}…; recompile the artifact")
    for entry in entries:
        expected = f"{KERNELS_DIR}/{entry['name']}.py"
        if entry["file"] != expected:
            raise LmforgeError(f"{where}: kernel {entry['name']} is stored as {entry['file'][:80]!r}, not {expected}")
        if read_text(expected) != generated[entry["name"]]:
            raise LmforgeError(f"{where}: {expected} differs from the kernel lmforge generates from the program "
                               "(the runtime runs only kernels it generates itself): the artifact was altered or "
                               "written by another lmforge version; recompile it")


def _main(command: str, argument: str) -> Any:
    if command == "aot":
        if interpreting():
            raise LmforgeError("the ahead-of-time compile step was started with TRITON_INTERPRET=1")
        job = json.loads(sys.stdin.read())

        def report(description: str, done: int, total: int) -> None:
            print(json.dumps({"progress": [description, done, total]}), flush=True)

        return run_aot_job(job, Path(argument), report)
    if command == "launches":
        from lmforge.compiler.artifact import load_artifact

        return decode_launches(load_artifact(argument)[0])
    raise LmforgeError(f"unknown command {command!r}; choose aot or launches")


if __name__ == "__main__":
    try:
        print(json.dumps({"result": _main(*sys.argv[1:3])}), flush=True)
    except LmforgeError as error:
        print(json.dumps({"error": str(error)}), flush=True)
        sys.exit(1)
