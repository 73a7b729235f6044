"""CUDA-graph capture of decode and verify steps, as gpt-fast and vLLM do.

Why. A decode step of a small batch is dozens of short kernels per layer; on a GPU the
host's launch overhead, not the kernels, then sets the speed. A CUDA graph records one
step's launches once and replays them with a single call. Replay re-runs the recorded
kernels on the same memory, so everything the step reads must sit at fixed addresses:
the token and position inputs, the cache slots it writes, the padding and the draft tree.
`GraphedStep` keeps those in static buffers per (batch bucket, token width), copies each
step's values into them, replays, and hands back the static output cut to the real batch.
The attention op reads its cache slots from a tensor (`AttentionContext.slots`) and builds
its masks from these buffers inside the step, so no Python int is frozen into a graph: on
the `aten` backend through a mask over the whole cache, on the `triton` backend through
kernels that read the start on the device and launch a split count fixed by the cache's
size (`codegen/triton/decode_attention.py`).

Batches are padded up to a bucket (1, 2, 4, 8, 16, 32, as vLLM does); the engine then
allocates its cache with the bucket's rows and runs eager forwards on views of the real
rows. Widths are the decode step (1) and every speculative verify width up to the
program's longest (1 + drafts). Graphs are captured lazily, the first time a (bucket,
width) is stepped, after a warm-up on a side stream, into one memory pool shared by all.

What runs eagerly instead, and is reported (`Engine.graph_report`): a device other than
CUDA, `runtime.cuda_graphs: off`, programs whose step is not graph-safe (dynamic
`ffn_skip`'s host-side branch, merged/ring/evicting caches updated by host logic, a
backend not known to be graph-safe), batches above the largest bucket and widths above
the longest verify width.

The capturer is injectable. On CUDA it is `CudaGraphCapturer` (torch.cuda.CUDAGraph);
this has never run on a GPU where it was written. On a CPU, tests use
`StaticReplayCapturer`, whose replay re-runs the captured callable on the same static
buffers and refuses a step that reads a tensor allocated after capture — which a real
graph would silently read at its old address.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.compiler.kv_layout import cache_slots
from lmforge.compiler.ops import (
    AttentionContext,
    attention,
    attention_context,
    ffn_skip_gate,
    last_position,
    sparse_attention,
    tree_attention,
)
from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
GRAPH_SAFE_BACKENDS = ("aten", "fx", "triton")
_GRAPH_SAFE_OPS = (attention, tree_attention, sparse_attention, last_position)
Step = Callable[[], Any]


class Captured(Protocol):
    """One recorded step: `output` is its static output, refreshed by each `replay()`."""

    output: Any

    def replay(self) -> None: ...


class Capturer(Protocol):
    """Records steps into graphs: `warm_up(fn)` before the first capture, then `capture(fn)`."""

    def warm_up(self, step: Step) -> None: ...

    def capture(self, step: Step) -> Captured: ...


@dataclass
class _CudaCaptured:
    graph: Any
    output: Any

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphCapturer:
    """torch.cuda.CUDAGraph capture as the torch.cuda.graphs documentation prescribes:
    warm-up iterations on a side stream, then capture into one memory pool shared by every
    graph of the engine (buckets are captured one after another, never replayed at once)."""

    def __init__(self, warm_up_steps: int = 3) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.warm_up_steps = warm_up_steps

    def warm_up(self, step: Step) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warm_up_steps):
                step()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, step: Step) -> Captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = step()
        return _CudaCaptured(graph, output)


def _storage(tensor: torch.Tensor) -> tuple[str, int]:
    """Where a tensor's data lives; opaque tensors (oneDNN-packed weights) have no storage
    to ask, so the object stands for it (they are made once, at lowering)."""
    try:
        return ("storage", tensor.untyped_storage().data_ptr())
    except NotImplementedError:
        return ("object", id(tensor))


class _TensorReads(TorchDispatchMode):
    """Records the tensors a step's ops read that the step did not produce itself."""

    def __init__(self) -> None:
        super().__init__()
        self.produced: set[tuple[str, int]] = set()
        self.external: dict[tuple[str, int], torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.numel() and _storage(leaf) not in self.produced:
                self.external.setdefault(_storage(leaf), leaf)
        output = func(*args, **kwargs)
        for leaf in pytree.tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.numel():
                self.produced.add(_storage(leaf))
        return output


class _StaticReplay:
    """A captured step whose replay re-runs the callable, as a graph re-runs its kernels on
    the memory it recorded: tensors read at capture are kept alive (so no later tensor can
    take their address) and a replay that reads any other outside tensor is refused."""

    def __init__(self, step: Step) -> None:
        self.step = step
        reads = _TensorReads()
        with reads:
            self.output = step()
        self.seen = reads.external

    def replay(self) -> None:
        reads = _TensorReads()
        with reads:
            fresh = self.step()
        for address, tensor in reads.external.items():
            if address not in self.seen:
                raise LmforgeError(
                    f"the captured step read a {str(tensor.dtype).removeprefix('torch.')} tensor of shape "
                    f"{tuple(tensor.shape)} allocated after capture; a CUDA graph would keep reading the memory it "
                    "saw at capture: write it into a static buffer instead"
                )
        for static, new in zip(pytree.tree_leaves(self.output), pytree.tree_leaves(fresh)):
            static.copy_(new)


class StaticReplayCapturer:
    """The CPU stand-in for `CudaGraphCapturer` (tests, debugging): same contract, replay
    re-runs the step on the static buffers. `captures` counts the graphs recorded."""

    def __init__(self) -> None:
        self.captures = 0

    def warm_up(self, step: Step) -> None:
        step()

    def capture(self, step: Step) -> Captured:
        self.captures += 1
        return _StaticReplay(step)


def batch_bucket(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int | None:
    """The smallest bucket holding `batch` rows, or None above the largest."""
    return next((bucket for bucket in buckets if bucket >= batch), None)


def max_verify_width(speculation: dict | None) -> int:
    """Tokens one forward feeds per row at most: 1, plus the longest draft the program asks for."""
    speculation = speculation or {}
    drafts = [speculation.get("prompt_lookup", {}).get("num_draft", 0),
              speculation.get("draft_heads", {}).get("count", 0)]
    return 1 + max(drafts)


def capture_blockers(meta: dict, backend: str) -> list[str]:
    """Why a program's step cannot be captured in a CUDA graph (empty: it can), from what
    its passes decided (`meta`, also in an artifact's manifest, so `lmforge info` says the
    same as the engine) and the codegen backend."""
    reasons = []
    if backend not in GRAPH_SAFE_BACKENDS:
        reasons.append(f"codegen backend {backend!r} is not known to be graph-safe (only "
                       f"{', '.join(GRAPH_SAFE_BACKENDS)} run attention that reads its slots from a tensor)")
    if meta.get("ffn_skip", {}).get("mode") == "dynamic":
        reasons.append("dynamic ffn_skip branches (torch.cond) on a host-side decision every step")
    kinds = sorted({slot["kind"] for slot in cache_slots(meta["kv_cache"]).values() if slot.get("kind")})
    if kinds:
        reasons.append(f"the KV cache has {', '.join(kinds)} slots, which attention updates with host-side logic")
    return reasons


def unsafe_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    """lmforge ops in the graph whose kernels have no graph-safe form (a guard beside
    `capture_blockers`, for programs whose meta does not say what rewrote their attention)."""
    targets = {node.target for node in graph_module.graph.nodes if node.op == "call_function"}
    lmforge_ops = {target for target in targets if getattr(target, "namespace", None) == "lmforge"}
    return sorted(str(op.name()) for op in lmforge_ops - {*_GRAPH_SAFE_OPS, ffn_skip_gate})


@dataclass
class _Graph:
    """One captured (bucket, width, tree) step and its static inputs."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor
    slots: torch.Tensor
    pad: torch.Tensor
    tree: torch.Tensor | None
    captured: Captured | None = None


class GraphedStep:
    """Decode and verify steps replayed from CUDA graphs, one per (batch bucket, width, tree),
    or the reason they run eagerly. `blockers` are the program's reasons (`capture_blockers`,
    a CPU device, the recipe's `off`); with any, nothing is captured."""

    def __init__(
        self,
        runner: Callable[[torch.Tensor, torch.Tensor], Any],
        capturer: Capturer | None,
        *,
        max_width: int,
        blockers: Sequence[str] = (),
        buckets: Sequence[int] = BATCH_BUCKETS,
    ) -> None:
        self.runner, self.capturer, self.max_width = runner, capturer, max_width
        self.blockers, self.buckets = list(blockers), tuple(buckets)
        if capturer is None and not self.blockers:
            raise LmforgeError("GraphedStep needs a capturer unless something blocks capture")
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}
        self.eager_steps: Counter[str] = Counter()
        self.replays = 0
        self._cache: list | None = None

    @property
    def enabled(self) -> bool:
        return not self.blockers

    def cache_rows(self, batch: int) -> int:
        """Rows the engine's cache needs for `batch`: its bucket while graphs are on."""
        bucket = batch_bucket(batch, self.buckets) if self.enabled else None
        return bucket or batch

    def eager_reason(self, batch: int, width: int, cache: list) -> str | None:
        """Why this step must run eagerly, or None when a graph can replay it. Reasons of
        single steps are counted for the report."""
        if not self.enabled:
            return self.blockers[0]
        reason = None
        if batch_bucket(batch, self.buckets) is None:
            reason = f"batch {batch} above the largest bucket {self.buckets[-1]}"
        elif width > self.max_width:
            reason = f"width {width} is not a captured verify width (1..{self.max_width})"
        elif any(slot is not None and not isinstance(slot, tuple) for slot in cache):
            reason = "the KV cache has slots other than plain (key, value) buffers"
        if reason is not None:
            self.eager_steps[reason] += 1
        return reason

    def run(self, cache: list, input_ids: torch.Tensor, positions: torch.Tensor, start: int,
            pad: torch.Tensor | None, tree: torch.Tensor | None) -> Any:
        """The step's output for the real rows, from the graph of its (bucket, width, tree),
        captured now if this is its first step (or the cache was reallocated). The output is
        a view of the graph's static output: valid until the next step, as in vLLM."""
        if cache is not self._cache:
            self.graphs.clear()  # graphs recorded the old cache's addresses
            self._cache = cache
        batch, width = input_ids.shape
        key = (batch_bucket(batch, self.buckets), width, tree is not None)
        graph = self.graphs.get(key) or self._static_inputs(*key, input_ids.device)
        graph.input_ids[:batch].copy_(input_ids)
        graph.positions[:batch].copy_(positions.expand(batch, width))
        torch.add(graph.offsets, start, out=graph.slots)
        if pad is None:
            graph.pad.zero_()
        else:
            graph.pad[:batch].copy_(pad)
        if tree is not None:
            graph.tree.copy_(tree)
        if graph.captured is None:
            step = self._step(graph, cache, start)
            self.capturer.warm_up(step)
            graph.captured = self.capturer.capture(step)
            self.graphs[key] = graph
        graph.captured.replay()
        self.replays += 1
        return pytree.tree_map(lambda tensor: tensor[:batch], graph.captured.output)

    def _static_inputs(self, bucket: int, width: int, has_tree: bool, device: torch.device) -> _Graph:
        with torch.device(device):
            return _Graph(
                input_ids=torch.zeros(bucket, width, dtype=torch.long),
                positions=torch.zeros(bucket, width, dtype=torch.long),
                offsets=torch.arange(width),
                slots=torch.zeros(width, dtype=torch.long),
                pad=torch.zeros(bucket, dtype=torch.long),
                tree=torch.zeros(width, width, dtype=torch.bool) if has_tree else None,
            )

    def _step(self, graph: _Graph, cache: list, start: int) -> Step:
        """The callable a graph records: the runner on the static buffers only. Its context
        is rebuilt on every call, so masks are recomputed from the buffers as a replay
        recomputes them; `start` is kept only for ops that branch on prefill vs decode."""

        def step() -> Any:
            context = AttentionContext(kv=cache, start=start, q_len=graph.input_ids.shape[1], pad=graph.pad,
                                       tree=graph.tree, device=graph.slots.device, slots=graph.slots)
            with attention_context(context):
                return self.runner(graph.input_ids, graph.positions)

        return step

    def report(self) -> str:
        """One line for the engine's report and `lmforge info`: on (what was captured) or
        off (why), and the steps that ran eagerly and why."""
        if not self.enabled:
            return f"cuda graphs: off ({'; '.join(self.blockers)})"
        captured = ", ".join(f"b{bucket}x{width}{' tree' if tree else ''}"
                             for bucket, width, tree in sorted(self.graphs))
        line = (f"cuda graphs: on (batch buckets {','.join(map(str, self.buckets))}; widths 1..{self.max_width}; "
                f"captured {captured or 'none yet'}; {self.replays} replays)")
        eager = "; ".join(f"{count} eager: {reason}" for reason, count in self.eager_steps.items())
        return f"{line}; {eager}" if eager else line


def graphs_for(program: Program, runner: Callable[[torch.Tensor, torch.Tensor], Any], backend: str, mode: str,
               device: torch.device, capturer: Capturer | None = None) -> GraphedStep:
    """The engine's `GraphedStep` for `program` lowered by `backend` to `runner`: recipe
    `runtime.cuda_graphs` `mode` ("auto" captures where it can, "off" never), on `device`
    (CUDA only, unless a `capturer` is given: tests inject `StaticReplayCapturer`)."""
    if mode == "off":
        blockers = ["runtime.cuda_graphs is off"]
    else:
        device_blocker = [] if capturer is not None or device.type == "cuda" else [
            f"device {device.type}: CUDA graphs need a CUDA device"]
        blockers = device_blocker + capture_blockers(program.meta, backend)
        unsafe = unsafe_ops(program.graph_module)
        if unsafe and len(blockers) == len(device_blocker):
            blockers.append(f"{', '.join(unsafe)} have no graph-safe kernel")
    if capturer is None and not blockers:
        capturer = CudaGraphCapturer()
    return GraphedStep(runner, capturer, max_width=max_verify_width(program.meta.get("speculation")),
                       blockers=blockers)


def graph_plan(meta: dict, backend: str, mode: str) -> str:
    """What the engine will do with CUDA graphs for an artifact (`lmforge info`): the same
    reasons `graphs_for` gives, without loading the program."""
    if mode == "off":
        return "cuda graphs: off (runtime.cuda_graphs is off)"
    blockers = capture_blockers(meta, backend)
    if blockers:
        return f"cuda graphs: off ({'; '.join(blockers)})"
    return (f"cuda graphs: on CUDA, decode and verify steps replay graphs per batch bucket "
            f"{','.join(map(str, BATCH_BUCKETS))} and width 1..{max_verify_width(meta.get('speculation'))} "
            "(eager on a CPU)")
