"""The cache of compiled steps on this machine: AOTInductor packages keyed by what made them.

Why. `torch.compile` with frozen weights cannot use Inductor's own graph cache (it bypasses
it: "mkldnn tensors unpickleable", the packed weights), so every load re-ran Dynamo, AOT
autograd, freezing and code generation — only the C++ build was cached. Here each bucket's
step is exported once (`torch.export`) and compiled by AOTInductor into a package (a
shared object plus its frozen constants) that is kept under `compile_cache_dir()` and loaded
with `aoti_load_package` on every later load: no trace, no Inductor, no compiler.

Key. A package is reused only when everything that went into it is the same: the sha256 of
the step's generated graph source and of every weight (`program_digest`), the bucket, and
the machine (`machine_fingerprint`: torch version, the CPU's ISA level and flags, the C++
compiler's version). Entries sit in `<cache>/<program digest>/<bucket>.pt2`, each with a
`.json` record of how long its first compile took, which `lmforge info` reads.

Writes. A package and its record are written to a temporary file beside them, named after
the writing process (`<bucket>.<pid>.partial.pt2`), and renamed into place: a reader never
sees half a package, a failed compile removes its file, and a compile killed before it
could (Ctrl-C twice, the OOM killer) leaves one that no lookup reads and that the next
compile on this machine deletes once its process is gone.

Weights. Each package holds its own copy of the program's weights, frozen into it. Measured
on ref-llama-py (27.8 MB of float32 weights): 34.4 MB a bucket, so 69 MB for the two
buckets a generate at batch 1 compiles and 263 MB for the eight of batch 1 and 4 at 1 and
2 threads. One shared copy was tried (with `INDUCTOR_CONFIG`'s oneDNN products) and does
not work yet with torch 2.13:
- As compiled (`freezing`), each linear weight is packed for oneDNN by the bucket's row
  count, so the packed bytes differ from bucket to bucket (tiny llama, weights written to a
  separate blob: every packed weight differs between the 1-token and the any-length bucket;
  only the embedding and the norms are equal): no copy to share.
- AOTInductor can leave the weights out (`aot_inductor.package_constants_in_so=False`) and
  take the program's own tensors at load (`load_constants(..., user_managed=True)`), folding
  what derives from them when loaded (`use_runtime_constant_folding`). On ref-llama-py's
  1-token bucket that works: 2.4 MB instead of 34.4 MB, logits within 4e-6 of the packed
  step, the same CPU time a decode step (3.87 against 3.92 ms median, 30 interleaved rounds
  of 25 steps, 1 thread). But the any-length bucket (dynamic token count) still folds 33
  weights at compile time (oneDNN-packed, or transposed copies with `cpp.weight_prepack`
  off) into `_frozen_param*` constants no program tensor provides; `load_constants` only
  warns that they are missing, and the step then crashes (segfault, both ways).
So packages keep their weights until the any-length bucket can be compiled without
compile-time folding; `FORMAT` must change with that.

Trust. The cache lives in the user's own directory and is filled only by compiles run on
this machine from source lmforge generated; nothing in it comes from an artifact, and an
artifact never carries a package (DESIGN.md: nothing executable is taken from an artifact).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import fx

FORMAT = 3  # bump when what a package holds, how its key is made, or the Inductor options change
PARTIAL = "partial"  # the middle word of a file being written: `<bucket>.<pid>.partial.<suffix>`
LEGACY_TEMPORARY = "tmp*.pt2"  # what a killed compile of an earlier lmforge left (no pid in the name)
LEGACY_TEMPORARY_AGE = 3600.0  # seconds after which such a file is stale: no compile has taken an hour
PHASE_COUNT = 3  # what `load_or_compile` reports: export, compile, load (a cached package only loads)


def compile_cache_dir() -> Path:
    """Where lmforge keeps what it compiles: `LMFORGE_CACHE_DIR`/aoti, else ~/.cache/lmforge/aoti."""
    root = Path(os.environ.get("LMFORGE_CACHE_DIR") or Path.home() / ".cache" / "lmforge")
    return root / "aoti"


@functools.cache
def machine_fingerprint() -> str:
    """What a compiled package depends on besides its source: torch, the CPU, the compiler."""
    flags = ""
    if Path("/proc/cpuinfo").exists():
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    from torch._inductor import cpp_builder

    compiler = cpp_builder.get_cpp_compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    capability = str(torch.backends.cpu.get_cpu_capability())
    parts = [f"format {FORMAT}", torch.__version__, capability, flags, compiler, version]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _target_text(node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return node.op
    if node.op == "get_attr":
        return f"get_attr {node.target}"
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    return f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', str(node.target))}"


def graph_text(graph_module: fx.GraphModule) -> str:
    """The graph as text that names no node: each node by the order a depth-first walk from
    the output (then from every node with side effects but asserts) finishes it, inputs by
    their position.

    Why not the generated source: a program saved to an artifact and loaded back computes
    the same thing but lists its nodes in another order under other names (placeholders
    first, plus a dead metadata assert, measured on a tiny llama), so its source differs and it would
    compile every bucket again; this text is the same for both."""
    names = {node: f"%in{index}" for index, node in enumerate(n for n in graph_module.graph.nodes
                                                              if n.op == "placeholder")}
    lines: list[str] = []
    nodes = list(graph_module.graph.nodes)
    side_effects = [node for node in nodes if node.op == "call_function" and node.is_impure()
                    and not str(node.target).startswith("aten._assert")]  # asserts change no result
    roots = [node for node in nodes if node.op == "output"] + side_effects
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, inputs_done = stack.pop()
            if node in names:
                continue
            if inputs_done:
                names[node] = f"%{len(lines)}"
                lines.append(f"{_target_text(node)} {fx.node.map_arg((node.args, node.kwargs), names.get)!r}")
                continue
            stack.append((node, True))
            stack.extend((argument, False) for argument in reversed(node.all_input_nodes) if argument not in names)
    return "\n".join(lines)


def program_digest(graph_module: fx.GraphModule) -> str:
    """sha256 of the program's graph (`graph_text`), its weights (names, shapes, dtypes,
    bytes) and `machine_fingerprint`: the directory under which its buckets' packages are
    kept, shared by a program and the same program saved and loaded from its artifact."""
    digest = hashlib.sha256(graph_text(graph_module).encode())
    for name, tensor in sorted({**dict(graph_module.named_parameters()), **dict(graph_module.named_buffers())}.items()):
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(machine_fingerprint().encode())
    return digest.hexdigest()[:32]


def compile_seconds_on_this_machine(digest: str) -> dict[str, dict]:
    """The first-compile record of every bucket cached for the program with `digest`."""
    directory = compile_cache_dir() / digest
    if not directory.is_dir():
        return {}
    records = {}
    for path in sorted(directory.glob("*.json")):
        if _is_partial(path):
            continue
        record = json.loads(path.read_text())
        records[record["bucket"]] = record
    return records


class PackageCache:
    """Compiled steps of one program: `load_or_compile(bucket, export)` returns the step and
    says whether it came from the cache; `compiled` and `loaded` count both kinds."""

    def __init__(self, digest: str) -> None:
        self.directory = compile_cache_dir() / digest
        self.compiled = 0
        self.loaded = 0

    def load_or_compile(self, name: str, export: Callable[[], torch.export.ExportedProgram], inductor_config: dict,
                        on_phase: Callable[[str, int], None] | None = None) -> tuple[Callable, dict]:
        """The package for bucket `name` (a file-safe string without dots): loaded when cached,
        else built from `export()` and stored (`written_atomically`, after clearing what killed
        compiles left: `remove_stale_partials`). Returns it with its record.
        `on_phase(description, done)` hears each phase starting, `done` of `PHASE_COUNT`."""
        on_phase = on_phase or (lambda description, done: None)
        package = self.directory / f"{name}.pt2"
        record_path = package.with_suffix(".json")
        started = time.perf_counter()
        if package.exists() and record_path.exists():
            on_phase("loading from the cache", PHASE_COUNT - 1)
            step = torch._inductor.aoti_load_package(str(package))
            record = json.loads(record_path.read_text())
            record["load_seconds"], record["source"] = time.perf_counter() - started, "cache"
            self.loaded += 1
            return step, record
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_partials(compile_cache_dir())
        on_phase("exporting", 0)
        exported = export()
        exported_at = time.perf_counter()
        before = _inductor_seconds()
        on_phase("compiling (AOTInductor: lowering, code generation, C++ build)", 1)
        with written_atomically(package) as temporary:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(temporary),
                                                     inductor_configs=inductor_config)
        phases = {phase: round(seconds - before[phase], 2) for phase, seconds in _inductor_seconds().items()}
        record = {"bucket": name, "export_seconds": round(exported_at - started, 2),
                  "compile_seconds": round(time.perf_counter() - started, 2), "phases": phases}
        with written_atomically(record_path) as temporary:
            temporary.write_text(json.dumps(record))
        loading = time.perf_counter()
        on_phase("loading", 2)
        step = torch._inductor.aoti_load_package(str(package))
        record["load_seconds"], record["source"] = time.perf_counter() - loading, "compiled"
        self.compiled += 1
        return step, record


@contextlib.contextmanager
def written_atomically(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` (same directory, so the rename is atomic, and the same
    suffix, which AOTInductor checks) for the caller to write; renamed to `target` when the
    block ends without an error, removed when it raises."""
    temporary = target.with_name(f"{target.stem}.{os.getpid()}.{PARTIAL}{target.suffix}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _is_partial(path: Path) -> bool:
    parts = path.name.split(".")
    return len(parts) >= 4 and parts[-2] == PARTIAL and parts[-3].isdigit()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(root: Path) -> list[Path]:
    """Delete, under each program directory of `root`, the files left by writes that can no
    longer finish: `written_atomically` files whose process is gone, and an earlier lmforge's
    `tmp*.pt2` older than `LEGACY_TEMPORARY_AGE`. Files of running compiles are kept.
    Returns what was deleted."""
    removed = []
    for path in root.glob("*/*"):
        stale = False
        if _is_partial(path):
            stale = not _process_exists(int(path.name.split(".")[-3]))
        elif path.match(LEGACY_TEMPORARY):
            with contextlib.suppress(FileNotFoundError):  # another compile may clear it first
                stale = time.time() - path.stat().st_mtime > LEGACY_TEMPORARY_AGE
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# Inductor's own timers (`torch._dynamo.utils.compilation_time_metrics`) for the phases of a
# compile, under the names this module reports them by.
_PHASES = {
    "lowering": "GraphLowering.run",
    "codegen": "GraphLowering.codegen",
    "c++ build": "compile_file",
}


def _inductor_seconds() -> dict[str, float]:
    """Seconds Inductor has spent so far in this process in each phase of `_PHASES`."""
    from torch._dynamo.utils import compilation_time_metrics

    return {name: sum(compilation_time_metrics.get(key, ())) for name, key in _PHASES.items()}
