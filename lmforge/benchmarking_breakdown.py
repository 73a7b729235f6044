"""Where a decode step's time goes, and how fast a step could be.

`profile_decode_steps` times decode steps of an engine, then profiles a few more with
torch.profiler and splits each one into matrix products, attention and the rest. Each part
is read from the profiler's event tree under one labelled step, so nothing is counted twice:
an attention event (lmforge's attention ops, scaled-dot-product attention) counts whole,
with any product inside it; a product event (linear, addmm, mm, bmm, matmul and the packed
oneDNN/MKL linear ops) counts whole, with its reshapes; every other operator counts its
self time only. What the operators do not cover is Python and dispatch overhead. The
profiler slows a step down (it records every operator), so the table gives the step
without it too; the parts add up to the profiled step, within `TOLERANCE`.

The `aten` backend calls lmforge's attention kernels from Python, without the dispatcher,
so the profiler would only see their ATen pieces (cache writes, mask, sdpa) scattered
among the rest; while profiling, `profile_decode_steps` wraps them in a labelled event.
A `cpp` step is one compiled C++ call whose kernels the profiler does not see (nor, once
Inductor's cache serves it, the call itself): while profiling, each compiled bucket runs
inside a labelled event, and a step's parts are that call (Dynamo's guards included) and
what runs in Python around it (the runner's inputs, the engine's own work), listed per
operator in `outside_compiled`.

The physical limit of a decode step on a CPU is reading every weight once: the bytes a step
reads (`step_weight_bytes`: all weights but embedding tables, of which a step reads one row
per token) divided by the memory bandwidth `read_bandwidth` measures on this machine.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
from rich.table import Table

from lmforge.errors import LmforgeError

MATMUL_OPS = frozenset({
    "aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::mkldnn_linear",
    "mkldnn::_linear_pointwise", "mkl::_mkl_linear", "aten::_mkl_linear", "onednn::qlinear_pointwise",
})
STEP_LABEL = "lmforge decode step"
COMPILED_CALL = "lmforge compiled step"
# the parts are sums of many events' durations, each rounded by the profiler; they may exceed
# the profiled step by this fraction before the breakdown counts as inconsistent
TOLERANCE = 0.02


@dataclass
class StepBreakdown:
    """One decode step of `batch` rows after `context` tokens of cache, in microseconds."""

    batch: int
    context: int
    step_us: float
    profiled_step_us: float
    matmul_us: float
    attention_us: float
    other_ops_us: float
    compiled_us: float
    top_ops: list[dict] = field(default_factory=list)
    outside_compiled: list[dict] = field(default_factory=list)

    @property
    def rest_us(self) -> float:
        """Everything but products, attention and a compiled call: other operators, Python
        and dispatch."""
        return self.profiled_step_us - self.matmul_us - self.attention_us - self.compiled_us

    @property
    def python_us(self) -> float:
        """The profiled step minus every operator: Python and dispatch overhead."""
        return self.rest_us - self.other_ops_us

    @property
    def consistent(self) -> bool:
        """The measured parts fit in the profiled step (within `TOLERANCE`)."""
        return self.python_us >= -TOLERANCE * self.profiled_step_us

    def record(self) -> dict:
        return {**asdict(self), "rest_us": self.rest_us, "python_us": self.python_us, "consistent": self.consistent}


def _category(name: str) -> str | None:
    if "attention" in name:
        return "attention"
    if name in MATMUL_OPS:
        return "matmul"
    if name == COMPILED_CALL:
        return "compiled"
    return None


def _add(table: dict[str, list[float]], name: str, micros: float) -> None:
    entry = table.setdefault(name, [0.0, 0])
    entry[0] += micros
    entry[1] += 1


def _split(step: torch.autograd.profiler_util.FunctionEvent, totals: dict[str, float],
           ops: dict[str, list[float]], outside: dict[str, list[float]] | None) -> None:
    """Add a step event's subtree to `totals` by category and to `ops` by operator (products
    and attention whole, other operators their self time); to `outside`, when given, every
    operator that ran outside the compiled call."""
    for event in step.cpu_children:
        category = _category(event.name)
        if category == "compiled":
            totals[category] += event.cpu_time_total
            continue
        if category is not None:
            totals[category] += event.cpu_time_total
            _add(ops, event.name, event.cpu_time_total)
            continue
        totals["other"] += event.self_cpu_time_total
        _add(ops, event.name, event.self_cpu_time_total)
        if outside is not None:
            _add(outside, event.name, event.self_cpu_time_total)
        _split(event, totals, ops, outside)


def _per_step(table: dict[str, list[float]], steps: int, count: int = 12) -> list[dict]:
    rows = sorted(table.items(), key=lambda item: item[1][0], reverse=True)[:count]
    return [{"op": name, "us": micros / steps, "calls": calls / steps} for name, (micros, calls) in rows]


def _labelled(name: str, kernel):
    def run(*args):
        with torch.profiler.record_function(name):
            return kernel(*args)
    return run


@contextlib.contextmanager
def labelled_kernels(runner) -> Iterator[None]:
    """While profiling, a `cpp` runner's compiled steps run inside a `COMPILED_CALL` event,
    and an `aten` runner's attention kernels inside an event named after their op (so their
    cache writes and masks count as attention); the `fx` runner's attention ops go through
    the dispatcher, which names them already."""
    compiled = getattr(runner, "steps", None)
    if isinstance(compiled, dict):
        originals = dict(compiled)
        compiled.update({bucket: _labelled(COMPILED_CALL, step) for bucket, step in originals.items()})
        try:
            yield
        finally:
            compiled.update(originals)
        return
    from lmforge.codegen.aten import PYTHON_KERNELS
    from lmforge.compiler.ops import ATTENTION_OPS

    names = {id(PYTHON_KERNELS[op]): f"lmforge::{op._name.split('::')[-1]}"
             for op in ATTENTION_OPS if op in PYTHON_KERNELS}
    bound = getattr(runner, "__globals__", {})
    originals = {key: value for key, value in bound.items() if id(value) in names}
    for key, kernel in originals.items():
        bound[key] = _labelled(names[id(kernel)], kernel)
    try:
        yield
    finally:
        bound.update(originals)


def _quicker_half(steps: list) -> list:
    """The profiled steps no slower than their median: on a shared machine a step is now and
    then descheduled inside some operator, and a mean would charge the wait to that operator."""
    middle = statistics.median(step.cpu_time_total for step in steps)
    return [step for step in steps if step.cpu_time_total <= middle]


def profile_decode_steps(engine, batch: int = 1, context: int = 64, steps: int = 8) -> StepBreakdown:
    """Decode into cache slots 1 .. `context` - 1 (warm-up: a compiled backend compiles its
    decode bucket here), time `steps` more (median), then profile `steps` more (after one
    unlabelled) and split the quicker half of them, averaged (`StepBreakdown`). Each step
    feeds the greedy token of the one before. Slot 0 is left empty instead of prefilled: a
    prefill would compile another bucket, and a first step over one key would have a compiled
    backend specialise its dynamic key length to 1."""
    from torch.profiler import ProfilerActivity, profile

    if batch < 1 or context < 2 or steps < 1:
        raise LmforgeError(f"profiling needs batch >= 1, context >= 2 and steps >= 1, got {batch}, {context}, {steps}")
    engine._ensure_cache(batch, context + 2 * steps + 2)
    token = torch.ones(batch, 1, dtype=torch.long, device=engine.device)
    position = 1

    def step(label: str | None = None) -> float:
        """One engine step (inside an event named `label`, when given); its wall seconds."""
        nonlocal token, position
        positions = torch.full((batch, 1), position, device=engine.device)
        with torch.profiler.record_function(label) if label else contextlib.nullcontext():
            started = time.perf_counter()
            logits = engine.step(token, positions, position, None)
            seconds = time.perf_counter() - started
        token, position = logits.argmax(-1, keepdim=True), position + 1
        return seconds

    with torch.no_grad():
        for _ in range(context - 1):
            step()
        seconds = [step() for _ in range(steps)]
        with labelled_kernels(engine.runner), profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()  # the profiler's first step pays its own set-up
            for _ in range(steps):
                step(STEP_LABEL)
    labelled = _quicker_half([event for event in profiler.profiler.function_events if event.name == STEP_LABEL])
    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0, "compiled": 0.0}
    ops: dict[str, list[float]] = {}
    compiled = any(event.name == COMPILED_CALL for event in profiler.profiler.function_events)
    outside: dict[str, list[float]] | None = {} if compiled else None
    for event in labelled:
        _split(event, totals, ops, outside)
    count = len(labelled)
    return StepBreakdown(
        batch=batch, context=context, step_us=statistics.median(seconds) * 1e6,
        profiled_step_us=sum(event.cpu_time_total for event in labelled) / count,
        matmul_us=totals["matmul"] / count, attention_us=totals["attention"] / count,
        other_ops_us=totals["other"] / count, compiled_us=totals["compiled"] / count,
        top_ops=_per_step(ops, count), outside_compiled=_per_step(outside or {}, count, count=1000),
    )


def breakdown_table(rows: list[tuple[str, StepBreakdown]],
                    title: str = "where a decode step's time goes (µs)") -> Table:
    """One row per (engine, breakdown): the step with and without the profiler, and the
    profiled step's parts."""
    table = Table(title=title)
    for column in ("engine", "batch", "step", "profiled step", "matmuls", "attention", "compiled call",
                   "rest", "of which Python"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, part in rows:
        compiled = part.compiled_us > 0
        table.add_row(name, str(part.batch), f"{part.step_us:.0f}", f"{part.profiled_step_us:.0f}",
                      "inside" if compiled else f"{part.matmul_us:.0f}",
                      "inside" if compiled else f"{part.attention_us:.0f}",
                      f"{part.compiled_us:.0f}" if compiled else "—",
                      f"{part.rest_us:.0f}", f"{part.python_us:.0f}" + ("" if part.consistent else " (inconsistent)"))
    table.caption = ("profiled step = matmuls + attention + compiled call + rest; rest = other operators + Python "
                     "and dispatch; step: the same step without the profiler; inside: part of the compiled call")
    return table


def outside_compiled_table(part: StepBreakdown) -> Table:
    """What a compiled (`cpp`) step leaves in Python, per operator, per step."""
    table = Table(title=f"run outside the compiled step, per decode step (batch {part.batch})")
    for column in ("op", "µs", "calls"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for row in part.outside_compiled:
        table.add_row(row["op"], f"{row['us']:.1f}", f"{row['calls']:g}")
    table.caption = f"and {part.python_us:.0f} µs of Python and dispatch between them"
    return table


def read_bandwidth(megabytes: int = 512, runs: int = 7) -> float:
    """Memory read bandwidth in GB/s: the median over `runs` of summing a buffer of
    `megabytes` (≫ the caches, so it streams from memory) with torch's current threads, the
    way a decode step reads its weights."""
    if megabytes < 1 or runs < 1:
        raise LmforgeError(f"a bandwidth measurement needs megabytes and runs >= 1, got {megabytes}, {runs}")
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    buffer.sum()  # pages touched and the reduction's threads started before timing
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        buffer.sum()
        seconds.append(time.perf_counter() - started)
    return buffer.nbytes / statistics.median(seconds) / 1e9


def step_weight_bytes(program) -> int:
    """Bytes of weight a decode step reads: every weight of the program once, except tables
    that are only looked up by embedding (a step reads one row of them per token). A weight
    shared by an embedding and the LM head counts once."""
    graph_module = program.graph_module
    uses: dict[int, tuple[torch.Tensor, set]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = graph_module
        for part in node.target.split("."):
            tensor = getattr(tensor, part)
        if not isinstance(tensor, torch.Tensor):
            continue
        key = tensor.untyped_storage().data_ptr()
        entry = uses.setdefault(key, (tensor, set()))
        entry[1].update(user.target for user in node.users)
    lookups = {torch.ops.aten.embedding.default}
    return sum(tensor.nbytes for tensor, users in uses.values() if not users <= lookups)


def limit_tokens_per_second(weight_bytes: int, gigabytes_per_second: float, batch: int) -> float:
    """Tokens/s if a decode step only read its weights at the measured bandwidth: `batch`
    tokens per `weight_bytes` read."""
    if weight_bytes <= 0 or not math.isfinite(gigabytes_per_second) or gigabytes_per_second <= 0:
        raise LmforgeError(f"a decode limit needs positive weight bytes and bandwidth, got {weight_bytes}, "
                           f"{gigabytes_per_second}")
    return batch * gigabytes_per_second * 1e9 / weight_bytes


def profile_artifact(artifact, context: int = 64, steps: int = 8) -> dict:
    """`lmforge info --profile`: a decode step of the artifact at batch 1 after `context`
    tokens (fewer if its cache is shorter), split (`profile_decode_steps`), and its limit."""
    import lmforge

    model = lmforge.load(artifact)
    context = max(2, min(context, model.engine.max_seq_len - 2 * steps - 2))
    part = profile_decode_steps(model.engine, 1, context, steps)
    weight_bytes = step_weight_bytes(model.program)
    bandwidth = read_bandwidth()
    return {"step_breakdown": part.record(), "step_weight_bytes": weight_bytes, "read_bandwidth_gb_per_s": bandwidth,
            "limit_tokens_per_second": limit_tokens_per_second(weight_bytes, bandwidth, 1)}


def profile_renderables(record: dict, engine: str) -> list:
    """What `lmforge info --profile` prints of `profile_artifact`'s record."""
    names = {f.name for f in fields(StepBreakdown)}
    part = StepBreakdown(**{key: value for key, value in record["step_breakdown"].items() if key in names})
    printed = [breakdown_table([(engine, part)], title=f"a decode step after {part.context} tokens (µs)")]
    if part.compiled_us > 0:
        printed.append(outside_compiled_table(part))
    printed.append(f"limit: {record['limit_tokens_per_second']:.0f} tok/s at batch 1 ({record['step_weight_bytes']:,} "
                   f"weight bytes a step reads at {record['read_bandwidth_gb_per_s']:.1f} GB/s measured here); "
                   f"this step alone: {1e6 / part.step_us:.0f} tok/s")
    return printed


def compiled_step_note(backend: str) -> str | None:
    """For `lmforge info` without --profile: what a `cpp` artifact runs outside its compiled step."""
    if backend != "cpp":
        return None
    return ("cpp: every op of the graph runs inside the compiled step (the backend refuses a recipe otherwise); "
            "the runner's inputs and the engine's sampling run in Python around it: --profile lists them with "
            "their cost per step")
