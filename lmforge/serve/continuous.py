"""Iteration-level continuous batching over a paged KV cache, with chunked prefill.

Each step the scheduler decides which tokens run (`plan`), runs them as one ragged forward
(`Engine.step_paged`: every request's tokens in one row, each with its own positions, keys
and values read and written through its block table), and samples a token for every
request whose tokens are all in the cache (`update`). A request is a token list and a count
of how many of them the cache holds (`Sequence`): a decode step feeds its one new token, a
prefill feeds a chunk of its prompt, and a request recomputed after preemption feeds its
prompt and the tokens it already generated — one rule for all three.

Per step, at most `max_tokens_per_step` tokens run and at most `max_batch` requests hold
blocks. Requests already running go first, oldest first, so their decode tokens are never
starved; the rest of the budget admits waiting requests first come, first served, and a
prompt longer than what is left is cut into chunks over the following steps (Sarathi-style
chunked prefill). When the pool runs out of blocks, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its tokens; nothing is dropped. A finished or cancelled request frees its
blocks before the next step.

With prefix caching (the default), every block a request fills is registered under the
hash of its tokens and everything before them (`runtime.paged`), and a request being
admitted — new, or recomputed after preemption — first takes the longest run of its
leading full blocks already cached (shared, reference counted) and computes only the rest.
Its last token is always computed, so there are logits to sample from; blocks it takes are
full and never written again, so requests sharing them cannot disturb each other.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.runtime.engine import Engine
from lmforge.runtime.paged import DEFAULT_BLOCK_SIZE, BlockTable, PagedKVCache, block_keys, paged_rows
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.scheduler import Request, SchedulerBase


@dataclass(eq=False)
class Sequence:
    """A running request: its tokens (prompt, then generated), how many of them have keys
    and values in the cache, the blocks holding them, the chained keys of its leading full
    blocks (as far as computed) and how many of those blocks are registered in the cache."""

    request: Request
    table: BlockTable = field(default_factory=BlockTable)
    computed: int = 0
    keys: list[int] = field(default_factory=list)
    registered: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.request.output_ids

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.request.output_ids)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: a prompt's rest, or the one token sampled last."""
        return self.length - self.computed


@dataclass(frozen=True)
class Piece:
    """What one request feeds in a step: `count` tokens from position `start`."""

    sequence: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether the piece feeds the request's last token, whose logits give the next one."""
        return self.start + self.count == self.sequence.length


class ContinuousScheduler(SchedulerBase):
    """Requests join and leave between steps; see the module docstring. `kv_blocks` blocks
    of `block_size` tokens make the pool (default: `max_batch` full-length requests);
    `prefix_caching` reuses the cached blocks of a common prompt prefix."""

    def __init__(self, engine: Engine, tokenizer: Any, *, max_batch: int = 8, max_tokens_per_step: int = 4096,
                 metrics: ServeMetrics | None = None, kv_blocks: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True) -> None:
        super().__init__(engine, tokenizer, max_batch=max_batch, max_tokens_per_step=max_tokens_per_step,
                         metrics=metrics)
        blocks = kv_blocks if kv_blocks is not None else math.ceil(max_batch * engine.max_seq_len / max(block_size, 1))
        self.cache = PagedKVCache(engine.kv_layout, blocks, block_size, engine.dtype, engine.device)
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_caching = prefix_caching
        self.prefix_hit_tokens = 0  # tokens admitted requests found cached instead of computing
        self.prefix_query_tokens = 0  # tokens of admitted requests, cached or not

    def check(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len < 1:
            raise LmforgeError("the prompt is empty: it needs at least one token")
        super().check(prompt_len, max_tokens)
        if prompt_len + max_tokens > self.cache.capacity:
            raise LmforgeError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                               f"exceeds the KV block pool of {self.cache.capacity} tokens; raise --kv-blocks")

    def describe(self) -> str:
        return (f"continuous batching over a paged KV cache ({self.cache.allocator.count} blocks of "
                f"{self.cache.block_size} tokens), chunked prefill of up to {self.max_tokens_per_step} tokens "
                f"per step, prefix caching {'on' if self.prefix_caching else 'off'}")

    def step(self) -> bool:
        """One iteration: release what ended, plan, forward, sample. False when nothing ran."""
        self._release_cancelled()
        pieces = self.plan()
        if not pieces:
            return False
        try:
            with self.engine.lock, torch.no_grad():
                logits = self.forward(pieces)
        except Exception as exc:  # the server outlives any one step
            failed = [piece.sequence for piece in pieces]
            for sequence in failed:
                self._leave(sequence)
            self._fail([sequence.request for sequence in failed], exc)
            with self.wakeup:
                self._report()
            return True
        self.update(pieces, logits)
        return True

    def plan(self) -> list[Piece]:
        """The tokens of this step: running requests first, then newly admitted ones, within
        the token budget, preempting the newest request when blocks run out."""
        budget, pieces, preempted = self.max_tokens_per_step, [], self.preemptions
        for sequence in list(self.running):
            if budget == 0:
                break
            if sequence not in self.running:  # preempted to make room for an older request
                continue
            count = min(sequence.pending, budget)
            if self._reserve(sequence, count):
                pieces.append(Piece(sequence, sequence.computed, count))
                budget -= count
        admitted = 0
        with self.wakeup:
            # no request joins in a step that had to preempt: it would take the blocks back
            while budget > 0 and self.waiting and len(self.running) < self.max_batch and preempted == self.preemptions:
                sequence = self._with_cached_prefix(self.waiting[0])
                count = min(sequence.pending, budget)
                if not self.cache.reserve(sequence.table, sequence.computed + count):
                    self.cache.release(sequence.table)
                    break
                self.waiting.popleft()
                self.running.append(sequence)
                pieces.append(Piece(sequence, sequence.computed, count))
                self.prefix_hit_tokens += sequence.computed
                self.prefix_query_tokens += sequence.length
                budget -= count
                admitted += 1
            self._report(new_batch=admitted > 0)
        return pieces

    def _with_cached_prefix(self, request: Request) -> Sequence:
        """A sequence for `request` holding the longest run of its leading full blocks found
        in the prefix cache, all but its last token at most (whose logits are needed)."""
        sequence = Sequence(request)
        if not self.prefix_caching:
            return sequence
        block_size = self.cache.block_size
        usable = (sequence.length - 1) // block_size
        sequence.keys = block_keys(sequence.tokens[: usable * block_size], block_size)
        sequence.table.blocks = self.cache.allocator.lookup(sequence.keys)
        sequence.registered = len(sequence.table.blocks)
        sequence.computed = sequence.registered * block_size
        return sequence

    def _register_full_blocks(self, sequence: Sequence) -> None:
        """Cache every block of `sequence` that is now full and written."""
        block_size, full = self.cache.block_size, sequence.computed // self.cache.block_size
        if full <= sequence.registered:
            return
        if len(sequence.keys) < full:
            tokens, done = sequence.tokens, len(sequence.keys)
            previous = sequence.keys[-1] if sequence.keys else None
            sequence.keys += block_keys(tokens[done * block_size : full * block_size], block_size, previous)
        for index in range(sequence.registered, full):
            self.cache.allocator.register(sequence.table.blocks[index], sequence.keys[index])
        sequence.registered = full

    def _reserve(self, sequence: Sequence, count: int) -> bool:
        """Blocks for `count` more tokens of `sequence`, preempting newer requests (or, last,
        `sequence` itself, then False) until they are free."""
        while not self.cache.reserve(sequence.table, sequence.computed + count):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is sequence:
                return False
        return True

    def _preempt(self, sequence: Sequence) -> None:
        """Free `sequence`'s blocks and queue it first, to be recomputed from its tokens."""
        self._leave(sequence)
        self.preemptions += 1
        with self.wakeup:
            self.waiting.appendleft(sequence.request)

    def _leave(self, sequence: Sequence) -> None:
        self.cache.release(sequence.table)
        self.running.remove(sequence)

    def forward(self, pieces: list[Piece]) -> torch.Tensor:
        """One ragged forward of every token the pieces feed; the logits (R, vocab) of the last
        token of each piece that completes its request (`Piece.samples`), in order."""
        device = self.engine.device
        ids, positions, sampled = [], [], []
        for piece in pieces:
            ids += piece.sequence.tokens[piece.start : piece.start + piece.count]
            positions += range(piece.start, piece.start + piece.count)
            if piece.samples:
                sampled.append(len(ids) - 1)
        rows = paged_rows([(p.sequence.table, p.start, p.count) for p in pieces], self.cache.block_size, device,
                          logit_rows=sampled)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        return self.engine.step_paged(input_ids, torch.tensor([positions], device=device), self.cache.pools, rows)

    def update(self, pieces: list[Piece], logits: torch.Tensor) -> None:
        """Advance each piece's request; those whose tokens are all in the cache get their
        next token from the logits of their last one (a row of `logits` each, in order).
        Finished requests leave."""
        now, row_index = time.monotonic(), 0
        for piece in pieces:
            sequence = piece.sequence
            sequence.computed += piece.count
            if self.prefix_caching:
                self._register_full_blocks(sequence)
            if not piece.samples:
                continue  # a prompt chunk: the rest comes in later steps
            request = sequence.request
            row = logits[row_index : row_index + 1]
            row_index += 1
            logprobs = row[0].float().log_softmax(-1) if request.params.logprobs is not None else None
            self._accept(request, row, logprobs, now)
            if request.finished:
                self._leave(sequence)
        with self.wakeup:
            self._report()

    def _report(self, new_batch: bool = False) -> None:
        """Queue, batch, block and prefix cache figures for /metrics (the caller holds `wakeup`)."""
        self.metrics.occupancy(len(self.waiting), len(self.running), new_batch=new_batch)
        allocator = self.cache.allocator
        self.metrics.blocks(allocator.count - allocator.free, allocator.count, self.preemptions)
        self.metrics.prefix_cache(self.prefix_hit_tokens, self.prefix_query_tokens, allocator.cached)

    def _release_cancelled(self) -> None:
        """Cancelled requests end and free their blocks; so do queued ones."""
        for sequence in [s for s in self.running if s.request.cancelled.is_set()]:
            self._leave(sequence)
            self._finish(sequence.request, "cancelled")
        with self.wakeup:
            for request in [r for r in self.waiting if r.cancelled.is_set()]:
                self.waiting.remove(request)
                self._finish(request, "cancelled")
            self._report()

    def _run(self) -> None:
        while True:
            with self.wakeup:
                while not self.stopping and not self.waiting and not self.running:
                    self.wakeup.wait()
                if self.stopping:
                    break
            if not self.step():
                with self.wakeup:
                    self.wakeup.wait(timeout=0.05)
        for sequence in list(self.running):
            self._leave(sequence)
            self._finish(sequence.request, "cancelled")
