"""The `cpp` backend: the whole forward step compiled by Inductor to C++, one per shape bucket.

Why. A step of the `aten` backend runs ~370 ATen operators from Python; at this model size
that dispatch, not the weights, is most of a step. Here every operator of the step — the
KV-cache writes, the masks and the attention included — is inside one Inductor graph
compiled with the C++ wrapper, so a step returns to Python once.

How the step becomes compilable. lmforge's `attention` op reads its cache and masks from a
per-thread Python context, which Inductor cannot trace. `step_graph` rewrites a copy of the
program's graph so each `attention` node becomes plain aten on graph inputs: `index_copy_`
of the new keys/values into the static cache buffers (mutated inputs), a GQA matmul-softmax
over the first `len(key_slots)` cache slots, and a mask computed from tensors — the slots
written (`write_slots`), the key slots and the per-row left padding (`pad`) — instead of
Python objects. `tree_attention` (draft trees) is the same with the tree's
ancestor mask as one more input (a causal mask for chains and prefills). Ops whose state is
a Python object (streaming rings, merged and evicting slots), data-dependent branches
(dynamic `ffn_skip`) and block-sparse prefill are refused when the program is lowered, each
with the pass that put it there and why, from one table (`codegen/cpp/refused.py`). What other passes leave is plain graph: `kv_share` points layers at one cache
index (each writes the same keys), a static `ffn_skip` removes nodes, draft heads add
outputs (`_cut` trims every output), prompt lookup only changes what the engine feeds.
Keys and values are gathered with `index_select` over the key slots rather than sliced: a
slice of the cache is contiguous only when it is the whole cache, a guard that export
cannot prove for a dynamic key length.

Buckets. A compiled step is static in batch (padded up to a power of two, `batch_bucket`:
a batch of 3 runs in the batch-4 bucket, its padding row's output dropped; the engine sizes
its cache to the bucket) and the thread count (Inductor bakes `omp num_threads` into its
kernels). The key length and the cache length are dynamic, so a decode step compiles once,
not once per context length or `max_seq_len`. Decode (1 token) and each verify width of
speculation are static token counts — verify widths padded up to a power of two with dummy
tokens whose cache writes land beyond the verified slots (later steps overwrite them before
any query sees them). Prefills and cache-free forwards share one step of dynamic token
count that returns every position (the engine keeps the last): so a generate compiles two
buckets, where it compiled a prefill bucket per prompt length and last-only flag before.
Weights are frozen (`freezing`), so Inductor constant-folds them and packs the linear
weights: for oneDNN in a prefill bucket, for its own C++ GEMM template in a decode or verify
bucket (`STATIC_BUCKET_CONFIG`: ref-llama-py's decode step then calls no library at all).

Where first-compile time goes (ref-llama-py, one static decode bucket, 1 thread, a machine
loaded to ~5 on 2 cores; Inductor's own timers): export 7 s; AOTInductor 101 s, of which
AOT dispatch and freezing 18 s, lowering 6 s, code generation 19 s, the C++ build 45 s.
The `torch.compile` path this replaces spent the same kinds of time and could not keep any
of it but the C++ build across processes: Inductor's graph cache refuses graphs with frozen
weights ("mkldnn tensors unpickleable"), so every load re-ran everything before the build.
Through this backend, ref-llama-py at 1 thread, load ~1.7 on 2 cores: the any-length
bucket 78 s (export 5.5, lowering 2.7, code generation 18, C++ build 29), the decode bucket
43 s (export 3.3, lowering 0.8, code generation 6.5, C++ build 15): 122 s for a generate's
first call; at load ~13, 703 s and 375 s. The any-length bucket compiles in 1.8
(ref-llama-py) to 4.5 times (tiny llama: 94 s against 21 s) the 1-token bucket's time, paid
once instead of a static bucket per prompt length bucket (not measured against one).
Each bucket's compile seconds and phases are logged at INFO, kept in `compile_records`,
and read back for the buckets cached on this machine by `cached_compile_records` (`lmforge
info` lists them: `bucket_compile_times`); while a bucket compiles, its phases go to the
callback `bucket_progress` sets (`lmforge compile` and `lmforge run` draw a bar per bucket).

The in-loop slowdown of the `inductor` backend (3.6 ms/step alone, 7–9 ms inside the
speculative loop). Measured on ref-llama-py with prompt lookup (three 128-token generates,
Dynamo's counters and `TORCH_LOGS=recompiles`): the one `torch.compile(dynamic=True)` graph
is compiled three times — the prefill; a recompile at the first decode step because the
decode feed (a column of the engine's token buffer) fails the guard
`input_ids.stride()[0] == input_ids.size()[1]` and the new graph specialises the token count
to 1; another at the first verify forward (size mismatch 1 vs 4), now with a symbolic token
count. No recompiles or graph breaks after that (3 frames, 3 unique graphs in every round),
but the verify forwards run that symbolic-shape graph, whose kernels cost about twice the
static decode graph's per call (medians on a machine loaded to 6× its cores, so only the
ratio is meaningful), and the first generate pays two compiles inside its loop. Here inputs
are made contiguous before the call and each bucket is its own exported step, compiled
ahead of time with every shape but the key and cache lengths (and a prefill's token count)
static: after a bucket's first call the loop compiles nothing (the tests count compiles).

Trust and reload. Each bucket is exported (`torch.export`) and compiled by AOTInductor into
a package kept in this machine's cache (`codegen/cpp/package_cache.py`), keyed by a hash of
the graph (named-node-free, so a program and its saved-and-loaded artifact share packages),
the weights, the bucket, the torch version, the CPU's flags and the C++ compiler: a later
load, in any process, loads the packages and compiles nothing (ref-llama-py, a fresh
process at load ~1.7: its two packages loaded in 1.7 s and 0.1 s, the first generate took
2.5 s instead of 122 s; at load ~13, 11.6 s and 0.7 s). Nothing compiled is read from an artifact: the
runtime rebuilds the step graph from the program, and packages are only made on this machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx
from torch._inductor.exc import InductorError

from lmforge.codegen.cpp.package_cache import (
    PHASE_COUNT,
    PackageCache,
    compile_cache_dir,
    compile_seconds_on_this_machine,
    program_digest,
)
from lmforge.codegen.cpp.quantized import with_quantized_kernels
from lmforge.codegen.cpp.refused import refusal, refuse_on_cpp
from lmforge.codegen.cpp.step_graph import LOWERED_ATTENTION, cache_indices, has_tree, step_graph
from lmforge.compiler.kv_layout import allocate_kv_buffers
from lmforge.compiler.ops import current_context
from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

# Frozen weights: Inductor constant-folds them and packs the linear weights for oneDNN.
INDUCTOR_CONFIG = {"freezing": True}
# A bucket of a few static query tokens (decode, verify) multiplies its weights with
# Inductor's own C++ GEMM template instead: one generated loop per product, its weights packed
# at freezing, the norm before it and the activation after it fused in, no call into oneDNN.
# On ref-llama-py's decode step at 1 thread that took 0.57x the CPU time of the oneDNN step
# (A/B in one process, a machine at load ~13 on 2 cores): oneDNN's per-call cost (primitive
# lookup, descriptors, scratchpad allocation) outweighed its products at 1 row. The only
# choice offered, so nothing is benchmarked while compiling; a product the template cannot
# take (`NoValidChoicesError`) compiles the bucket again with `INDUCTOR_CONFIG`.
STATIC_BUCKET_CONFIG = {**INDUCTOR_CONFIG, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
# Who hears about buckets compiling in this context (`bucket_progress`): a first compile takes
# minutes, and the runner is made deep inside `optimize`/`load`, out of the caller's reach.
_BUCKET_PROGRESS: ContextVar[Callable[[str, int, int], None] | None] = ContextVar("cpp_bucket_progress",
                                                                                    default=None)


@contextlib.contextmanager
def bucket_progress(progress: Callable[[str, int, int], None]) -> Iterator[None]:
    """While the block runs, report every bucket a `CppRunner` compiles or loads to
    `progress(description, done, total)`: one call per phase, the description starting with
    `cpp bucket <bucket>:` (the CLI draws a bar per bucket), the last one its compile time."""
    token = _BUCKET_PROGRESS.set(progress)
    try:
        yield
    finally:
        _BUCKET_PROGRESS.reset(token)


@contextlib.contextmanager
def lmforge_inductor_cache() -> Iterator[Path]:
    """Point Inductor's scratch files (read from the environment at every lookup) at lmforge's
    own directory while a step compiles, and give the process its own setting back after."""
    directory = compile_cache_dir().parent / "inductor"
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@dataclass(frozen=True)
class Bucket:
    """What a compiled step is specialised to."""

    batch: int
    tokens: int | None  # None: any token count (prefills and cache-free forwards)
    threads: int

    def __str__(self) -> str:
        return f"batch={self.batch} tokens={self.tokens or 'any'} threads={self.threads}"

    @property
    def file_name(self) -> str:
        return f"b{self.batch}-t{self.tokens or 'any'}-th{self.threads}"

    @classmethod
    def from_file_name(cls, name: str) -> Bucket:
        """The bucket whose `file_name` is `name`."""
        batch, tokens, threads = name.split("-")
        return cls(int(batch[1:]), None if tokens == "tany" else int(tokens[1:]), int(threads[2:]))


def verify_width(tokens: int, room: int) -> int:
    """Token count of the bucket a cached forward of `tokens` (> 1) after the prefill runs in:
    the next power of two, or `tokens` when the cache has no room for the padding."""
    width = 1 << (tokens - 1).bit_length()
    return width if width <= room else tokens


def batch_bucket(batch: int) -> int:
    """Rows of the bucket a batch runs in: the next power of two (a batch of 3 runs as 4, its
    extra row padding whose output is dropped), so few batch shapes are ever compiled."""
    return 1 << (batch - 1).bit_length()


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows` (padding rows of a batch bucket)."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


class CppRunner:
    """The program's forward as compiled C++ steps, one per `Bucket`, compiled on first use
    (or loaded from this machine's cache, `codegen/cpp/package_cache.py`).

    Called like every runner (`(input_ids, position_ids)` inside an `AttentionContext`).
    The engine allocates its cache with `cache_rows(batch)` rows and hands the runner the
    whole cache, so a batch runs in its batch bucket without copying the cache.
    `compile_records` holds, per bucket, its first-compile seconds (export, then AOTInductor)
    and whether this process compiled it or loaded it from the cache."""

    def __init__(self, program: Program, products: str = "template") -> None:
        refuse_on_cpp(program.graph_module)
        self.products = products  # the recipe's codegen.cpp_products
        self.graph_module = with_quantized_kernels(program.graph_module)  # stored formats' kernels
        self.indices = cache_indices(program.graph_module)
        self.layout = program.meta["kv_cache"]
        self.dtype = getattr(torch, program.meta.get("dtype", "float32"))
        self.tree = has_tree(program.graph_module)
        self.windowed = any(node.args[5] > 0 for node in program.graph_module.graph.nodes
                            if node.target in LOWERED_ATTENTION)
        self.steps: dict[Bucket, Callable] = {}
        self.compile_records: dict[str, dict] = {}
        self._packages: PackageCache | None = None

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Each bucket's first-compile seconds on this machine (also for buckets loaded from the cache)."""
        return {bucket: record["compile_seconds"] for bucket, record in self.compile_records.items()}

    @property
    def packages(self) -> PackageCache:
        """This program's packages; made on first use, as its digest reads every weight."""
        if self._packages is None:
            self._packages = PackageCache(package_digest(self.graph_module, self.products))
        return self._packages

    @staticmethod
    def cache_rows(batch: int) -> int:
        """Rows the engine's KV cache needs for a batch of `batch`: its batch bucket."""
        return batch_bucket(batch)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        context = current_context()
        batch, tokens = input_ids.shape
        kv, start = context.kv, context.start
        if kv is None:  # a cache-free forward is a prefill into a scratch cache of its own length
            kv = allocate_kv_buffers(self.layout, batch_bucket(batch), tokens, self.dtype, input_ids.device)
        rows = kv[self.indices[0]][0].shape[0]
        if rows < batch:
            raise LmforgeError(f"the KV cache has {rows} rows for a batch of {batch}")
        width = tokens
        if start > 0 and tokens > 1:
            width = verify_width(tokens, kv[self.indices[0]][0].shape[2] - start)
        if width > tokens:
            extra = width - tokens
            input_ids = torch.cat([input_ids, input_ids[:, -1:].expand(batch, extra)], dim=1)
            steps = torch.arange(1, extra + 1, device=position_ids.device)
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1)
        device = input_ids.device
        write_slots = torch.arange(start, start + width, device=device)
        key_slots = torch.arange(start + width, device=device)
        pad = context.pad if context.pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        # contiguous: the engine feeds a decode step a column of its token buffer, whose row
        # stride changes with every call's length; rows padding the batch to its bucket are
        # token 0 at position 0, computed in their own cache rows and dropped
        input_ids, position_ids, pad = (_pad_rows(tensor.contiguous(), rows)
                                        for tensor in (input_ids, position_ids, pad))
        caches = [tensor for index in self.indices for tensor in kv[index]]
        tree = (self._tree_mask(context.tree, tokens, width, device),) if self.tree else ()
        inputs = (input_ids, position_ids, write_slots, key_slots, pad, *tree, *caches)
        bucket = Bucket(rows, None if start == 0 and width > 1 else width, torch.get_num_threads())
        output = self._step(bucket, inputs)(*inputs)
        return _cut(output, batch, tokens)

    def _tree_mask(self, tree: torch.Tensor | None, tokens: int, width: int, device: torch.device) -> torch.Tensor:
        """The (width, width) ancestor mask the step takes: the draft tree's (causal for a
        chain), its padding tokens seeing only themselves."""
        if tree is not None and self.windowed:
            raise LmforgeError("tree verification with sliding-window attention is not supported; "
                               "draft a chain instead")
        mask = torch.eye(width, dtype=torch.bool, device=device)
        mask[:tokens, :tokens] = tree if tree is not None else torch.ones(tokens, tokens, dtype=torch.bool,
                                                                           device=device).tril()
        return mask

    def _step(self, bucket: Bucket, inputs: tuple) -> Callable:
        """The bucket's compiled step: compiled (or loaded from the cache) on first use."""
        if bucket not in self.steps:
            progress = _BUCKET_PROGRESS.get() or (lambda description, done, total: None)
            templated = bucket.tokens and self.products == "template"
            configs = [STATIC_BUCKET_CONFIG, INDUCTOR_CONFIG] if templated else [INDUCTOR_CONFIG]
            with lmforge_inductor_cache():
                for config in configs:
                    try:
                        step, record = self.packages.load_or_compile(
                            bucket.file_name, lambda: self._export(bucket, inputs), config,
                            lambda phase, done: progress(f"cpp bucket {bucket}: {phase}", done, PHASE_COUNT))
                        break
                    except InductorError as error:
                        if config is configs[-1] or "NoValidChoicesError" not in str(error):
                            raise
                        log.info("[codegen=cpp] bucket %s: a product the C++ GEMM template cannot take (%s); "
                                 "compiling with oneDNN products", bucket, str(error).splitlines()[0])
            self.steps[bucket], self.compile_records[str(bucket)] = step, record
            log.info("[codegen=cpp] bucket %s: %s", bucket, describe_record(record))
            progress(f"cpp bucket {bucket}: {describe_record(record)}", PHASE_COUNT, PHASE_COUNT)
        return self.steps[bucket]

    def _export(self, bucket: Bucket, inputs: tuple) -> torch.export.ExportedProgram:
        """The bucket's step graph exported with the key length and the cache length dynamic,
        so one package serves every context length and every cache size, and with the token
        count dynamic too for a bucket of any length."""
        graph = step_graph(self.graph_module)
        dynamic_size = torch.export.Dim.DYNAMIC  # a size export may bound by what the graph needs of it
        tokens = {} if bucket.tokens else {1: dynamic_size}
        dynamic = [tokens, tokens, {0: dynamic_size} if tokens else None, {0: dynamic_size}, None]
        if self.tree:
            dynamic.append({0: dynamic_size, 1: dynamic_size} if tokens else None)
        dynamic += [{2: dynamic_size}] * (len(inputs) - len(dynamic))
        if len(inputs[3]) == 1:  # a generate's first step from a 1-token prompt: export would specialise 1 key
            inputs = (*inputs[:3], torch.arange(2, device=inputs[3].device), *inputs[4:])
        with torch.no_grad():
            return torch.export.export(graph, inputs, dynamic_shapes=dynamic, strict=False)


def describe_record(record: dict) -> str:
    """One line: how long the bucket's first compile took and where this process got it."""
    first = f"first compile {record['compile_seconds']:.1f} s (export {record['export_seconds']:.1f} s"
    phases = "".join(f", {name} {seconds:.1f} s" for name, seconds in record.get("phases", {}).items())
    return f"{first}{phases}); {record['source']} in {record['load_seconds']:.2f} s"


def _cut(output, batch: int, tokens: int):
    """The first `batch` rows and `tokens` positions of every output (logits, and draft-head inputs)."""
    if isinstance(output, torch.Tensor):
        return output[:batch, :tokens]
    return type(output)(_cut(item, batch, tokens) for item in output)


def op_placement(graph_module: fx.GraphModule) -> dict[str, dict[str, int]]:
    """Where the `cpp` backend runs each op of a program's graph, by op name and node count:
    `compiled` (inside the step; lmforge's `attention` lowered to aten, `last_position`
    dropped) or `refused` (what `cpp/refused.py` rejects). No graph op runs in Python: the
    runner's own Python per step only builds the slot tensors and pads the batch."""
    placement: dict[str, dict[str, int]] = {"compiled": {}, "refused": {}}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        name = str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
        where = placement["refused" if refusal(node) is not None else "compiled"]
        where[name] = where.get(name, 0) + 1
    return placement


def package_digest(graph_module: fx.GraphModule, products: str) -> str:
    """The cache directory's name for a program's packages: its digest, and apart for oneDNN
    products (`codegen.cpp_products`), whose decode and verify packages differ."""
    digest = program_digest(graph_module)
    return digest if products == "template" else f"{digest}-{products}"


def cached_compile_records(graph_module: fx.GraphModule, products: str = "template") -> dict[str, dict]:
    """Per bucket compiled on this machine for this program: its first-compile seconds and
    phases (`lmforge info`)."""
    return compile_seconds_on_this_machine(package_digest(graph_module, products))


def bucket_compile_times(graph_module: fx.GraphModule, products: str = "template") -> list[dict]:
    """What `lmforge info` shows of a `cpp` program: each bucket compiled for it on this
    machine (`str(Bucket)`) with its first compile's seconds, its export's and Inductor's
    phases', in bucket order."""
    records = cached_compile_records(graph_module, products)
    buckets = sorted(((Bucket.from_file_name(name), record) for name, record in records.items()),
                     key=lambda item: (item[0].batch, item[0].threads, item[0].tokens is not None, item[0].tokens or 0))
    return [{"bucket": str(bucket), "compile_seconds": record["compile_seconds"],
             "export_seconds": record["export_seconds"], "phases": record.get("phases", {})}
            for bucket, record in buckets]
