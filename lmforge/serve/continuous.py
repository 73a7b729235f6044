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

Speculation, when the program drafts (prompt lookup, draft heads): a decoding request whose
only pending token is its last one also feeds the chain `Engine.propose_chain` drafts for it
(its own length, cut to its remaining `max_tokens` and to the step's budget; a request
without a draft feeds its one token), causal within its row of the ragged forward. Its
drafts are verified by `speculative.accept`, the rule `generate` uses: greedy requests keep
the longest prefix the model agrees with plus the model's own next token (exactly the greedy
tokens), sampled ones the speculative-sampling rejection rule (the sampled distribution is
unchanged). Only accepted tokens count as computed, so rejected drafts' slots lie past the
request's length and are written again before any query reads them; blocks holding nothing
but rejected slots are freed at once, and prefix-cache keys cover computed tokens only.
Accepted tokens are emitted one by one, so a stop string, an end-of-sequence token or
`max_tokens` inside an accepted chain ends the request there. Drafts take only blocks to
spare, never preempting anyone. An EAGLE drafter keeps a cache per `generate` batch, so its
programs draft here by prompt lookup only; draft heads draft their top-1 chain, never a tree
(trees move cache entries after verification); typical acceptance, lossy, is not applied.
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
from lmforge.runtime.sampling import select_next
from lmforge.runtime.speculative import ProfitabilityGate, PromptLookup, accept
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.scheduler import Request, SchedulerBase


@dataclass(eq=False)
class Sequence:
    """A running request: its tokens (prompt, then generated), how many of them have keys
    and values in the cache, the blocks holding them, the chained keys of its leading full
    blocks (as far as computed) and how many of those blocks are registered in the cache;
    with speculation, its prompt lookup index, its drafting gate and what the draft heads
    read at its last accepted position."""

    request: Request
    table: BlockTable = field(default_factory=BlockTable)
    computed: int = 0
    keys: list[int] = field(default_factory=list)
    registered: int = 0
    lookup: PromptLookup | None = None
    gate: ProfitabilityGate = field(default_factory=ProfitabilityGate)
    head_inputs: torch.Tensor | None = None

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
    """What one request feeds in a step: `count` of its tokens from position `start`, then
    the `drafts` to verify (a decode piece only)."""

    sequence: Sequence
    start: int
    count: int
    drafts: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """Query tokens the piece adds to the forward."""
        return self.count + len(self.drafts)

    @property
    def fed(self) -> list[int]:
        return self.sequence.tokens[self.start : self.start + self.count] + list(self.drafts)

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
        self.lookup_options = engine.speculation.get("prompt_lookup")
        self.drafting = bool(self.lookup_options) or engine.draft_heads > 0

    def check(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len < 1:
            raise LmforgeError("the prompt is empty: it needs at least one token")
        super().check(prompt_len, max_tokens)
        if prompt_len + max_tokens > self.cache.capacity:
            raise LmforgeError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                               f"exceeds the KV block pool of {self.cache.capacity} tokens; raise --kv-blocks")

    def describe(self) -> str:
        return (f"continuous batching over a paged KV cache ({self.cache.allocator.count} blocks of "
                f"{self.cache.block_size} tokens), {self._prefill_description()}, "
                f"prefix caching {'on' if self.prefix_caching else 'off'}"
                f"{', drafts verified per request' if self.drafting else ''}")

    def _prefill_description(self) -> str:
        if math.isinf(self.max_tokens_per_step):
            return "prompts prefilled whole (no chunking)"
        return f"chunked prefill of up to {self.max_tokens_per_step} tokens per step"

    def step(self) -> bool:
        """One iteration: release what ended, plan, forward, sample. False when nothing ran."""
        self._release_cancelled()
        pieces = self.plan()
        if not pieces:
            return False
        try:
            with self.engine.lock, torch.no_grad():
                outputs = self.forward(pieces)
        except Exception as exc:  # the server outlives any one step
            failed = [piece.sequence for piece in pieces]
            for sequence in failed:
                self._leave(sequence)
            self._fail([sequence.request for sequence in failed], exc)
            with self.wakeup:
                self._report()
            return True
        self.update(pieces, outputs)
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
            piece = self._speculative_piece(sequence, budget)
            if piece is None:
                count = min(sequence.pending, budget)
                piece = Piece(sequence, sequence.computed, count) if self._reserve(sequence, count) else None
            if piece is not None:
                pieces.append(piece)
                budget -= piece.width
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

    def _speculative_piece(self, sequence: Sequence, budget: int) -> Piece | None:
        """A decode piece with drafts when `sequence` has one token pending and a draft that
        fits the budget, its remaining tokens and the blocks spare after one more block for
        every running request (drafts never cause a preemption); else None."""
        request = sequence.request
        room = min(budget - 1, request.params.max_tokens - len(request.output_ids) - 1)
        if not self.drafting or sequence.pending != 1 or room < 1:
            return None
        drafts = self.engine.propose_chain(sequence.tokens, sequence.lookup, sequence.gate, sequence.head_inputs, room)
        length, block_size = sequence.length + len(drafts), self.cache.block_size
        missing = math.ceil(length / block_size) - len(sequence.table.blocks)
        if not drafts or self.cache.allocator.free - missing < len(self.running):
            return None
        self.cache.reserve(sequence.table, length)
        return Piece(sequence, sequence.computed, 1, tuple(drafts))

    def _with_cached_prefix(self, request: Request) -> Sequence:
        """A sequence for `request` holding the longest run of its leading full blocks found
        in the prefix cache, all but its last token at most (whose logits are needed)."""
        sequence = Sequence(request, lookup=PromptLookup(**self.lookup_options) if self.lookup_options else None)
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
        """Cache every block of `sequence` that is now full of computed tokens (with prefix
        caching)."""
        block_size, full = self.cache.block_size, sequence.computed // self.cache.block_size
        if not self.prefix_caching or full <= sequence.registered:
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

    def forward(self, pieces: list[Piece]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One ragged forward of every token the pieces feed. Returns the logits (R, vocab) of
        the last token and the drafts of each piece that completes its request
        (`Piece.samples`), in order, and what the draft heads read at those tokens (or None)."""
        device = self.engine.device
        ids, positions, sampled = [], [], []
        for piece in pieces:
            ids += piece.fed
            positions += range(piece.start, piece.start + piece.width)
            if piece.samples:
                sampled += range(len(ids) - 1 - len(piece.drafts), len(ids))
        rows = paged_rows([(p.sequence.table, p.start, p.width) for p in pieces], self.cache.block_size, device,
                          logit_rows=sampled)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        logits = self.engine.step_paged(input_ids, torch.tensor([positions], device=device), self.cache.pools, rows)
        head_inputs = self.engine.draft_inputs
        return logits, None if head_inputs is None else head_inputs[0]

    def update(self, pieces: list[Piece], outputs: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Advance each piece's request; those whose tokens are all in the cache get their
        next tokens from the logits of their last token and drafts (rows of `logits`, in
        order): the accepted drafts and the model's own token after them. Finished requests
        leave."""
        logits, head_inputs = outputs
        now, row_index = time.monotonic(), 0
        for piece in pieces:
            sequence = piece.sequence
            if not piece.samples:
                sequence.computed += piece.count
                self._register_full_blocks(sequence)
                continue  # a prompt chunk: the rest comes in later steps
            rows = logits[row_index : row_index + piece.width - piece.count + 1]
            accepted, tokens = self._verify(sequence, piece.drafts, rows)
            if head_inputs is not None:
                sequence.head_inputs = head_inputs[row_index + accepted].clone()  # not a view of the whole step
            row_index += len(rows)
            self._emit(sequence.request, tokens, rows, now)
            # the rejected drafts' slots lie past it, as do accepted ones after an end inside the chain
            sequence.computed = min(sequence.computed + piece.count + accepted, sequence.length)
            self._drop_blocks_past(sequence)
            self._register_full_blocks(sequence)
            if sequence.request.finished:
                self._leave(sequence)
        with self.wakeup:
            self._report()

    def _verify(self, sequence: Sequence, drafts: tuple[int, ...], logits: torch.Tensor) -> tuple[int, list[int]]:
        """How many of `drafts` the request keeps, by the rule `generate` uses, and its new
        tokens: those drafts and its own token after them (one sampled token without drafts)."""
        request = sequence.request
        if not drafts:
            return 0, [int(select_next(logits, request.params.sampling, request.generator)[0])]
        chain = torch.tensor([drafts], dtype=torch.long, device=logits.device)
        accepted, own = accept(logits[None], chain, request.params.sampling, request.generator)
        sequence.gate.record(accepted, len(drafts))
        self.metrics.drafts(len(drafts), accepted)
        return accepted, [*drafts[:accepted], int(own[0])]

    def _emit(self, request: Request, tokens: list[int], logits: torch.Tensor, now: float) -> None:
        """Emit `tokens` one by one (the i-th chosen from `logits[i]`), until one ends the request."""
        for token, row in zip(tokens, logits):
            logprobs = row.float().log_softmax(-1) if request.params.logprobs is not None else None
            self._record(request, token, logprobs, now)
            if request.finished:
                return

    def _drop_blocks_past(self, sequence: Sequence) -> None:
        """Free the blocks reserved for drafts that hold no computed token."""
        keep = math.ceil(sequence.computed / self.cache.block_size)
        if len(sequence.table.blocks) > keep:
            self.cache.allocator.release(sequence.table.blocks[keep:])
            del sequence.table.blocks[keep:]

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
