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
Python objects. Ops whose state is a Python object (rings, merged and evicting slots),
data-dependent branches (dynamic `ffn_skip`), draft trees and block-sparse prefill are
refused by `check_supported` with the pass that put them there.

Buckets. A compiled step is static in batch, token count, whether only the last position's
logits are wanted, and the thread count (Inductor bakes `omp num_threads` into its kernels);
the key length is the one dynamic dimension, so a decode step compiles once, not once per
context length. Prefill lengths are already bucketed by the runtime (`runtime.buckets`);
verify widths of speculation are padded up to a power of two with dummy tokens whose cache
writes land beyond the verified slots (later steps overwrite them before any query sees
them). Weights are frozen (`freezing`), so Inductor constant-folds them and packs the linear
weights for oneDNN.

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
are made contiguous before the call, and each bucket is its own `torch.compile` of its own
graph with static token count (`dynamic=False`; `fullgraph=True`, so a graph break is an
error, not a silent fallback to Python): after a bucket's first call the loop compiles
nothing (the tests check Dynamo's counters).

Trust. Nothing compiled is read from an artifact: the runtime rebuilds the step graph from
the program and Inductor compiles it on this machine into a lmforge-owned cache
(`compile_cache_dir`), where its C++ sources and shared objects are keyed by a hash of the
generated source, the compiler command line and the torch version.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from lmforge.compiler.ops import (
    ATTENTION_OPS,
    attention,
    current_context,
    ffn_skip_gate,
    last_position,
    slot_mask,
)
from lmforge.compiler.kv_layout import allocate_kv_buffers
from lmforge.compiler.pipeline import provenance
from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

# Set around the compile, not passed as `torch.compile(options=...)`: Dynamo decides whether
# to freeze before those options reach Inductor, and without freezing the weights stay graph
# inputs multiplied by plain `mm` instead of MKL-packed constants.
INDUCTOR_CONFIG = {"cpp_wrapper": True, "freezing": True}

_WHY_UNSUPPORTED = {
    "tree_attention": "the ancestor mask of a draft tree is not lowered to the compiled step yet",
    "merged_attention": "merged cache slots are Python objects the compiled step cannot hold",
    "streaming_attention": "ring cache slots are Python objects the compiled step cannot hold",
    "evicting_attention": "evicting cache slots are Python objects the compiled step cannot hold",
    "sparse_attention": "block-sparse prefill chooses its blocks in Python",
    "ffn_skip_gate": "skipping an FFN is a data-dependent branch taken in Python between operators",
    "cond": "a data-dependent branch runs in Python between operators",
}


def compile_cache_dir() -> Path:
    """Where Inductor keeps what it compiles for lmforge: `LMFORGE_CACHE_DIR`/inductor, else
    ~/.cache/lmforge/inductor."""
    root = Path(os.environ.get("LMFORGE_CACHE_DIR") or Path.home() / ".cache" / "lmforge")
    return root / "inductor"


@contextlib.contextmanager
def lmforge_inductor_cache() -> Iterator[Path]:
    """Point Inductor's cache (read from the environment at every lookup) at lmforge's own
    directory while a step compiles, and give the process its own setting back after."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    try:
        yield compile_cache_dir()
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def check_supported(graph_module: fx.GraphModule) -> None:
    """Refuse, in one line naming the op and the pass that put it there, a graph the compiled
    step cannot express."""
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target in (attention, last_position):
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.target in ATTENTION_OPS or node.target is ffn_skip_gate or node.target is torch.ops.higher_order.cond:
            raise LmforgeError(f"codegen backend cpp cannot compile lmforge::{name} from pass {provenance(node)}: "
                               f"{_WHY_UNSUPPORTED.get(name, 'no lowering')}; use backend aten for this recipe")
        namespace = getattr(node.target, "namespace", None)
        if namespace == "lmforge":
            raise LmforgeError(f"codegen backend cpp cannot compile lmforge::{name} from pass {provenance(node)}: "
                               "no lowering; use backend aten for this recipe")


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    write_slots: torch.Tensor,
    key_slots: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    """`lmforge::attention` with its cache and mask as tensors: writes k, v (B, Hkv, T, D) at
    `write_slots` (T,), attends q (B, Hq, T, D) to cache slots `key_slots` (S,) = 0..S-1 with
    the same mask as `AttentionContext.mask` (causal by slot, window, left padding hidden, a
    padding query sees itself). Returns (B, T, Hq, D)."""
    key_cache.index_copy_(2, write_slots, k)
    value_cache.index_copy_(2, write_slots, v)
    length = key_slots.shape[0]
    keys, values = key_cache[:, :, :length], value_cache[:, :, :length]
    batch, heads, tokens, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    allowed = slot_mask(write_slots, key_slots, pad, window)  # (B, T, S)
    scores = torch.matmul(q.reshape(batch, kv_heads, groups * tokens, head_dim), keys.transpose(2, 3)) * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, tokens, length).masked_fill(~allowed[:, None, None], -math.inf)
    probabilities = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probabilities.view(batch, kv_heads, groups * tokens, length), values)
    return out.view(batch, heads, tokens, head_dim).transpose(1, 2).contiguous()


def last_row(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, -1:]


def every_row(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def cache_indices(graph_module: fx.GraphModule) -> list[int]:
    """The cache slots the program's attention nodes use, in order."""
    return sorted({node.args[3] for node in graph_module.graph.nodes if node.target is attention})


def step_graph(graph_module: fx.GraphModule, last_only: bool) -> fx.GraphModule:
    """A copy of the program's graph with signature `(input_ids, position_ids, write_slots,
    key_slots, pad, key_0, value_0, key_1, …) -> output` for the cache slots of
    `cache_indices`, every `attention` node replaced by `cached_attention`."""
    graph = copy.deepcopy(graph_module.graph)
    indices = cache_indices(graph_module)
    anchor = [node for node in graph.nodes if node.op == "placeholder"][-1]
    inputs: dict[str, fx.Node] = {}
    names = ["write_slots", "key_slots", "pad"] + [f"{kind}_{i}" for i in indices for kind in ("key", "value")]
    for name in names:
        with graph.inserting_after(anchor):
            anchor = inputs[name] = graph.placeholder(name)
    for node in list(graph.nodes):
        if node.target is attention:
            q, k, v, index, scale, window, softcap = node.args
            arguments = (q, k, v, inputs[f"key_{index}"], inputs[f"value_{index}"], inputs["write_slots"],
                         inputs["key_slots"], inputs["pad"], scale, window, softcap)
            with graph.inserting_before(node):
                replacement = graph.call_function(cached_attention, arguments)
        elif node.target is last_position:
            with graph.inserting_before(node):
                replacement = graph.call_function(last_row if last_only else every_row, node.args)
        else:
            continue
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(graph_module, graph)


@dataclass(frozen=True)
class Bucket:
    """What a compiled step is specialised to."""

    batch: int
    tokens: int
    last_only: bool
    threads: int

    def __str__(self) -> str:
        return f"batch={self.batch} tokens={self.tokens} {'last' if self.last_only else 'all'} threads={self.threads}"


def verify_width(tokens: int, room: int) -> int:
    """Token count of the bucket a cached forward of `tokens` (> 1) after the prefill runs in:
    the next power of two, or `tokens` when the cache has no room for the padding."""
    width = 1 << (tokens - 1).bit_length()
    return width if width <= room else tokens


class CppRunner:
    """The program's forward as compiled C++ steps, one per `Bucket`, compiled on first use.

    Called like every runner (`(input_ids, position_ids)` inside an `AttentionContext`);
    `compile_seconds` holds each bucket's first-compile time."""

    def __init__(self, program: Program) -> None:
        check_supported(program.graph_module)
        self.graph_module = program.graph_module
        self.indices = cache_indices(program.graph_module)
        self.layout = program.meta["kv_cache"]
        self.dtype = getattr(torch, program.meta.get("dtype", "float32"))
        self.steps: dict[Bucket, Callable] = {}
        self.compile_seconds: dict[str, float] = {}

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        context = current_context()
        if context.tree is not None:
            raise LmforgeError("codegen backend cpp cannot verify draft trees yet; draft a chain or use backend aten")
        batch, tokens = input_ids.shape
        kv, start, last_only = context.kv, context.start, context.last_only
        if kv is None:  # a cache-free forward is a prefill into a scratch cache of its own length
            kv = allocate_kv_buffers(self.layout, batch, tokens, self.dtype, input_ids.device)
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
        # stride changes with every call's length, and Dynamo guards on strides (a recompile each)
        input_ids, position_ids, pad = input_ids.contiguous(), position_ids.contiguous(), pad.contiguous()
        caches = [tensor for index in self.indices for tensor in kv[index]]
        step = self._step(Bucket(batch, width, last_only and width == tokens, torch.get_num_threads()), key_slots)
        output = step(input_ids, position_ids, write_slots, key_slots, pad, *caches)
        return _cut(output, tokens) if width > tokens else output

    def _step(self, bucket: Bucket, key_slots: torch.Tensor) -> Callable:
        """The bucket's compiled step; a bucket seen for the first time is compiled by its
        first call, which is timed into `compile_seconds`."""
        torch._dynamo.maybe_mark_dynamic(key_slots, 0)
        if bucket in self.steps:
            return self.steps[bucket]
        graph = step_graph(self.graph_module, bucket.last_only)
        compiled = torch.compile(graph, dynamic=False, fullgraph=True)

        def first_call(*inputs):
            started = time.perf_counter()
            with lmforge_inductor_cache(), torch._inductor.config.patch(INDUCTOR_CONFIG):
                output = compiled(*inputs)
            self.compile_seconds[str(bucket)] = time.perf_counter() - started
            self.steps[bucket] = compiled
            log.info("[codegen=cpp] compiled bucket %s in %.1f s", bucket, self.compile_seconds[str(bucket)])
            return output

        return first_call


def _cut(output, tokens: int):
    """The first `tokens` positions of every output (logits, and draft-head inputs)."""
    if isinstance(output, torch.Tensor):
        return output[:, :tokens]
    return type(output)(_cut(item, tokens) for item in output)
