"""lmforge's custom ops (`attention` and its siblings `tree_attention`, `merged_attention`,
`streaming_attention`, `sparse_attention`, `evicting_attention`, `quantized_attention`; `ffn_skip_gate`,
`last_position`) and the forward context they read.

Attention is one opaque op in the captured graph so that passes can rewrite it by changing
its arguments (which cache slot, which window) instead of pattern-matching dozens of aten
nodes, and so that the KV cache stays outside the graph: the runtime owns the cache and
hands it to the op through `AttentionContext`, keyed by the op's integer `cache_index`.

This module declares the ops (schema and fake kernel); each backend implements them under
`codegen/`: the `aten` backend's kernels (`codegen/aten/`, imported at the end of this module)
are the ops' registered implementations, the `triton` backend's are in `codegen/triton/`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError

ATTENTION_SCHEMA = (
    "attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, "
    "float softcap) -> Tensor"
)

_lib = torch.library.Library("lmforge", "DEF")
_lib.define(ATTENTION_SCHEMA)


def slot_mask(
    write_slots: torch.Tensor,
    key_slots: torch.Tensor,
    pad: torch.Tensor,
    window: int,
    tree: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which cache slots each new token may attend to, from tensors only (so a CUDA graph or a
    compiled step computes it rather than freezing Python ints): causal by slot, the sliding
    window, a draft tree's ancestor mask among the new slots, left padding (`pad`, per row)
    hidden, and a padding query sees itself. (B, T, S) for `write_slots` (T,), `key_slots` (S,)."""
    queries, keys = write_slots[:, None], key_slots[None, :]
    allowed = keys <= queries
    if window > 0:
        allowed = allowed & (keys > queries - window)
    if tree is not None:
        tokens = write_slots.shape[0]
        relative = keys - write_slots[0]
        among_new = (relative >= 0) & (relative < tokens)
        allowed = torch.where(among_new, tree[:, relative.clamp(0, tokens - 1)[0]], allowed)
    allowed = allowed[None] & (keys[None] >= pad[:, None, None])
    return allowed | (keys == queries)[None]


@dataclass(frozen=True)
class PagedRows:
    """The layout of a ragged forward over a paged cache (`runtime.paged`): the query tokens
    of several requests laid out in one row, each request's keys and values in blocks of one
    pool per cache index, `(1, kv_heads, blocks * block_size, head_dim)`, passed as
    `AttentionContext.kv`. `write_slots` (T,) is the pool slot each query token's key and
    value go to; `key_slots` (S,) the pool slots read, every request's from its first
    position. `query_requests`/`query_positions` (T,) and `key_requests`/`key_positions`
    (S,) say whose each token is and where in its sequence: the mask is built from them.
    `logit_rows` (R,) are the query tokens whose logits the step needs (`last_position` keeps
    only them, so prompt chunks do not pay for the LM head); None keeps every token.
    Kernels that read the pool through block tables (the `triton` backend's) take
    `block_tables` (R, max blocks) int32, each request's blocks in position order (0 past its
    last), `block_size`, and `pieces`, per request on the host: the row of its first query
    token, its first position and its token count."""

    write_slots: torch.Tensor
    key_slots: torch.Tensor
    query_requests: torch.Tensor
    query_positions: torch.Tensor
    key_requests: torch.Tensor
    key_positions: torch.Tensor
    logit_rows: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    block_size: int = 0
    pieces: tuple[tuple[int, int, int], ...] = ()


@dataclass
class AttentionContext:
    """Everything the attention op needs that is not a graph value.

    `kv` holds one `(key, value)` pair of preallocated `(batch, kv_heads, max_len, head_dim)`
    buffers per cache index, or is None for a cache-free full-sequence forward. The new
    keys/values are written at slots `start .. start + q_len`. `pad` gives, per batch row,
    the number of left-padding slots that no query may attend to (None: no padding).
    Masks are built once per forward and per window size, not once per layer.
    `generated` counts the tokens decoded before this forward (0 for a prefill), which
    decode-time decisions such as dynamic FFN skipping use for their warm-up; when
    `skip_counts` is a dict, those decisions count the layers they skipped into it.
    `tree` (q_len, q_len), when set, says which of this forward's tokens each one may
    see (itself and its ancestors): a tree of draft candidates verified in one forward.
    `last_only` asks for the logits of the last position only (a prefill that verifies
    nothing), so the LM head is not applied to every prompt token. `device` is where the
    masks are built: the program's device (the engine's), else the cache's or the padding's.
    `slots` (q_len,), when set, holds the cache slots this forward writes as a tensor: a step
    captured in a CUDA graph (`runtime.cuda_graphs`) cannot take `start` as a Python int,
    which capture would freeze, so `attention` and `tree_attention` then write with
    `index_copy_` and attend over the whole cache under a mask computed from `slots`, `pad`
    and `tree` (static buffers the runtime refills before each replay).
    `paged`, when set, says the cache is a block pool read through `PagedRows` (serving's
    continuous batches); only `attention` and `tree_attention` (without a tree) accept it.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    start: int
    q_len: int
    pad: torch.Tensor | None = None
    generated: int = 0
    skip_counts: dict[int, int] | None = None
    tree: torch.Tensor | None = None
    last_only: bool = False
    device: torch.device | None = None
    slots: torch.Tensor | None = None
    paged: PagedRows | None = None
    _masks: dict[Hashable, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int) -> torch.Tensor | None:
        """Boolean mask `(batch, 1, q_len, start + q_len)`, or None where plain causal
        attention (or no mask at all, for one query) is exact; with `slots`, the mask over
        the whole cache `(batch, 1, q_len, max_len)`."""
        if self.slots is not None:
            return self.cached(("slots", window), lambda: self._build_slot_mask(window))
        return self.cached(window, lambda: self._build_mask(window))

    def _build_slot_mask(self, window: int) -> torch.Tensor:
        """`_build_mask` from tensors only (no Python int that a CUDA graph would freeze):
        causal by slot, the window, the draft tree among the new slots, and padding (`pad`
        is then a tensor, zeros for unpadded rows)."""
        if self.tree is not None and window > 0:
            raise LmforgeError("tree verification with sliding-window attention is not supported; draft a chain instead")
        max_len = self.kv[next(i for i, slot in enumerate(self.kv) if slot is not None)][0].shape[2]
        key_slots = torch.arange(max_len, device=self.slots.device)
        return slot_mask(self.slots, key_slots, self.pad, window, self.tree)[:, None]

    def cached(self, key: Hashable, build: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """A mask built once per forward under `key`, shared by every layer that asks."""
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def _build_mask(self, window: int) -> torch.Tensor | None:
        kv_len = self.start + self.q_len
        window_active = 0 < window < kv_len
        if self.tree is not None and window_active:
            raise LmforgeError("tree verification with sliding-window attention is not supported; draft a chain instead")
        if self.pad is None and self.tree is None and not window_active and (self.q_len == 1 or self.start == 0):
            return None
        device = self.device or (self.pad.device if self.pad is not None else None)
        query_slots = torch.arange(self.start, kv_len, device=device)[:, None]
        key_slots = torch.arange(kv_len, device=device)[None, :]
        allowed = key_slots <= query_slots
        if window_active:
            allowed = allowed & (key_slots > query_slots - window)
        if self.tree is not None:
            allowed[:, self.start :] = self.tree
        allowed = allowed[None, None]
        if self.pad is not None:
            allowed = allowed & (key_slots[None, None] >= self.pad[:, None, None, None])
            # A padding query would otherwise see no key at all and turn NaN, and the NaN
            # would reach real tokens through its cached value; let it see itself.
            allowed = allowed | (key_slots == query_slots)[None, None]
        return allowed


class _ContextStack(threading.local):
    """The forward contexts entered in this thread, innermost last. Per thread, so that
    engines running forwards in two threads at once each see their own cache and masks."""

    def __init__(self) -> None:
        self.contexts: list[AttentionContext] = []


_active = _ContextStack()


@contextlib.contextmanager
def attention_context(ctx: AttentionContext) -> Iterator[AttentionContext]:
    """Make `ctx` the context every `lmforge::attention` call in this forward (in this
    thread) reads."""
    _active.contexts.append(ctx)
    try:
        yield ctx
    finally:
        _active.contexts.pop()


def current_context() -> AttentionContext:
    if not _active.contexts:
        raise LmforgeError(
            "lmforge::attention was called outside a forward context; run the program through "
            "lmforge's runtime (Engine or CompiledModel) or wrap the call in "
            "`with lmforge.compiler.ops.attention_context(AttentionContext(kv=None, start=0, "
            "q_len=T)):`"
        )
    return _active.contexts[-1]


attention = torch.ops.lmforge.attention.default

TREE_ATTENTION_SCHEMA = (
    "tree_attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, float softcap) -> Tensor"
)
_lib.define(TREE_ATTENTION_SCHEMA)
# `attention` that also honours the context's ancestor mask, so one forward verifies a tree
# of drafts: `draft_heads` with a tree swaps every layer's attention for it.
tree_attention = torch.ops.lmforge.tree_attention.default

FFN_SKIP_GATE_SCHEMA = "ffn_skip_gate(Tensor before, Tensor after, float threshold, int warmup, int layer) -> Tensor"
_lib.define(FFN_SKIP_GATE_SCHEMA)


@torch.library.register_fake("lmforge::ffn_skip_gate")
def _ffn_skip_gate_fake(before, after, threshold, warmup, layer):
    return before.new_empty((), dtype=torch.bool)


ffn_skip_gate = torch.ops.lmforge.ffn_skip_gate.default

MERGED_ATTENTION_SCHEMA = (
    "merged_attention(Tensor q, Tensor k, Tensor v, int cache_index, int member, float t, float retain_threshold, "
    "float scale, int window, float softcap) -> Tensor"
)
_lib.define(MERGED_ATTENTION_SCHEMA)
merged_attention = torch.ops.lmforge.merged_attention.default

STREAMING_ATTENTION_SCHEMA = (
    "streaming_attention(Tensor q, Tensor k, Tensor v, int cache_index, int sink, int window, float scale, "
    "float softcap) -> Tensor"
)
_lib.define(STREAMING_ATTENTION_SCHEMA)
streaming_attention = torch.ops.lmforge.streaming_attention.default

SPARSE_ATTENTION_SCHEMA = (
    "sparse_attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, float softcap, "
    "int[] patterns, int budget, int block, int min_length) -> Tensor"
)
_lib.define(SPARSE_ATTENTION_SCHEMA)
sparse_attention = torch.ops.lmforge.sparse_attention.default

EVICTING_ATTENTION_SCHEMA = (
    "evicting_attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, float softcap) -> Tensor"
)
_lib.define(EVICTING_ATTENTION_SCHEMA)
evicting_attention = torch.ops.lmforge.evicting_attention.default

QUANTIZED_ATTENTION_SCHEMA = (
    "quantized_attention(Tensor q, Tensor k, Tensor v, int cache_index, float scale, int window, float softcap, "
    "str dtype, str granularity, int group, bool tree) -> Tensor"
)
_lib.define(QUANTIZED_ATTENTION_SCHEMA)
# `attention` (or, with `tree`, `tree_attention`) over a KIVI-quantized cache slot
# (`compiler/kv_quantized.py`): `quantize` with `kv_cache:` swaps it in.
quantized_attention = torch.ops.lmforge.quantized_attention.default

LAST_POSITION_SCHEMA = "last_position(Tensor hidden) -> Tensor"
_lib.define(LAST_POSITION_SCHEMA)


@torch.library.register_fake("lmforge::last_position")
def _last_position_fake(hidden):
    return hidden.new_empty(hidden.shape)


last_position = torch.ops.lmforge.last_position.default
ATTENTION_OPS = (attention, tree_attention, merged_attention, streaming_attention, sparse_attention, evicting_attention,
                 quantized_attention)

def _attention_output_fake(q: torch.Tensor, *arguments) -> torch.Tensor:
    """Every attention op returns (batch, q_len, heads, head_dim) for q (batch, heads, q_len, head_dim)."""
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, heads, head_dim)


for _op in ATTENTION_OPS:
    torch.library.register_fake(_op._name)(_attention_output_fake)

# The ops' implementations: the `aten` backend's kernels register themselves when imported.
import lmforge.codegen.aten  # noqa: E402,F401
