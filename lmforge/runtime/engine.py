"""Engine: the decoding loop around a compiled program and a static KV cache.

The program is any callable `(input_ids, position_ids) -> logits` whose attention op reads
its cache from the forward context; the engine owns the cache, builds the masks once per
step, and keeps per-step Python work to a handful of tensor ops.

Threads: an engine has one cache, so `generate` holds the engine's lock for the whole call —
two threads generating on one model take turns and each gets the result it would get alone.
`forward` uses no engine state and runs concurrently; the forward context is per thread
(`compiler.ops.attention_context`), so engines in different threads run at the same time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmforge.compiler.ops import AttentionContext, PagedRows, attention_context
from lmforge.compiler.program import draft_head_count, split_output
from lmforge.errors import LmforgeError
from lmforge.runtime.buckets import pad_to_bucket
from lmforge.runtime.cuda_graphs import GraphedStep
from lmforge.runtime.eagle_tree import DynamicTree, grow_tree
from lmforge.runtime.inputs import (
    check_attention_mask,
    check_eos_token_ids,
    check_max_new_tokens,
    check_stop_strings,
    check_token_ids,
)
from lmforge.runtime.kv_cache import StaticKVCache, check_cache_fits
from lmforge.runtime.rejection import DrawnChain, accept_drawn, accept_tree_sampled
from lmforge.runtime.sampling import SamplingParams, filtered_logits, select_next
from lmforge.runtime.speculative import (
    ProfitabilityGate,
    PromptLookup,
    TokenTree,
    TypicalAcceptance,
    accept,
    accept_tree,
    build_tree,
    compact_cache,
    medusa_children,
)

Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def left_padding(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Per-row count of left-padding slots, or None when no row is padded."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise LmforgeError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    if (mask[:, 1:].int() < mask[:, :-1].int()).any():
        raise LmforgeError("only left padding is supported: pad tokens must come before the prompt")
    if not mask[:, -1].all():
        raise LmforgeError("every row needs at least one real token in its last position")
    pad = (~mask).sum(dim=1)
    return pad if bool(pad.any()) else None


def prompt_positions(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Position ids as Hugging Face `generate` computes them (cumsum of the mask)."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class _StopStrings:
    """Marks rows whose generated text contains a stop string."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: Any) -> None:
        if tokenizer is None:
            raise LmforgeError("stop_strings need a tokenizer; pass tokenizer= or load a model that has one")
        self.strings, self.tokenizer = list(stop_strings), tokenizer
        self.tail = max(len(s) for s in self.strings) + 1

    def hit(self, new_tokens: torch.Tensor) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(new_tokens[:, -self.tail :])
        return torch.tensor([any(s in text for s in self.strings) for text in texts], device=new_tokens.device)


class Engine:
    """Prefill + decode with a static cache; greedy or sampled; batch with left padding.

    Set `skip_counts` to a dict to have decode-time skipping (dynamic `ffn_skip`) count
    the FFNs it skipped per layer, which is how benchmarks report the skip rate.
    `vocab_size`, when known, lets bad token ids fail with a clear error. The engine runs on
    `device` (default: torch's default device at construction), the program's: its cache,
    masks, token buffers, sampling generator and drafts are created there, and only host
    decisions (stop, accepted length, prompt lookup) read values back. `graphs` replays
    decode and verify steps from CUDA graphs (`runtime.cuda_graphs`); it says when and why
    steps run eagerly (`graph_report`), and without it every step runs eagerly."""

    def __init__(
        self,
        runner: Runner,
        kv_layout: list[dict],
        *,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        tokenizer: Any = None,
        speculation: dict | None = None,
        drafter: Any = None,
        vocab_size: int | None = None,
        device: torch.device | str | None = None,
        graphs: GraphedStep | None = None,
    ) -> None:
        self.speculation = speculation or {}
        self.draft_heads = draft_head_count(self.speculation)
        self.drafter = drafter
        self.draft_inputs: torch.Tensor | None = None
        self.speculation_stats: dict[str, int] = {}
        self.runner, self.kv_layout, self.max_seq_len, self.dtype = runner, kv_layout, max_seq_len, dtype
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (self.eos_token_ids or [0])[0]
        self.tokenizer = tokenizer
        self.cache: StaticKVCache | None = None
        self.skip_counts: dict[int, int] | None = None
        self.vocab_size = vocab_size
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        check_cache_fits(kv_layout, 1, max_seq_len, dtype, self.device)  # refuse an impossible cache up front
        self.lock = threading.Lock()
        self._generating_in: int | None = None  # the thread inside `generate`, to refuse re-entry
        self.prompt_padding = 0  # cache slots the last `generate` padded before its prompt (length bucket)
        self.graphs = graphs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position, computed without a cache (for evaluation). The input
        is left-padded to its length bucket (`runtime.buckets`) and the padding cut off again."""
        input_ids = check_token_ids(input_ids, self.vocab_size, self.device)
        attention_mask = check_attention_mask(attention_mask, input_ids)
        input_ids, attention_mask, added = pad_to_bucket(input_ids, attention_mask, self.pad_token_id)
        context = AttentionContext(kv=None, start=0, q_len=input_ids.shape[1], pad=left_padding(attention_mask, input_ids),
                                   device=self.device)
        with torch.no_grad(), attention_context(context):
            logits = split_output(self.runner(input_ids, prompt_positions(attention_mask, input_ids)), self.speculation)[0]
        return logits[:, added:]

    def _check_length(self, length: int) -> None:
        if length > self.max_seq_len:
            raise LmforgeError(
                f"prompt + new tokens = {length} exceeds the KV cache length {self.max_seq_len}; "
                "raise runtime.max_seq_len in the recipe"
            )

    def _ensure_cache(self, batch: int, length: int) -> StaticKVCache:
        """The cache for `batch` rows; with CUDA graphs on, it has the rows of the batch's
        bucket, so every batch of one bucket replays the graphs recorded on it; so it has when
        the runner pads batches to buckets (a `cache_rows` method: the `cpp` backend)."""
        self._check_length(length)
        rows = self.graphs.cache_rows(batch) if self.graphs is not None else batch
        runner_rows = getattr(self.runner, "cache_rows", None)
        rows = max(rows, runner_rows(batch)) if runner_rows else rows
        if self.cache is None or not self.cache.fits(rows, length):
            self.cache = None  # release the old buffers before allocating the new ones
            with torch.device(self.device):
                self.cache = StaticKVCache(self.kv_layout, rows, self.max_seq_len, self.dtype, self.device)
        return self.cache

    def reserve_cache(self, batch: int, length: int) -> StaticKVCache:
        """The static cache for `batch` rows of `length` tokens, for a driver that runs `step`
        itself (the serving scheduler's one-batch path) rather than through `generate`."""
        return self._ensure_cache(batch, length)

    def step_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, pools: list,
                   rows: PagedRows) -> torch.Tensor:
        """The logits `(R, vocab)` of `rows.logit_rows` (every position's, `(T, vocab)`, without
        them) of a ragged forward over a block pool: the query tokens of several requests in one
        row `(1, T)`, each with its own position, their keys and values read and written through
        `rows` (`runtime.paged`). The serving scheduler's continuous batches run through it; the
        engine's own cache is not touched. What draft heads read at those rows is left in
        `draft_inputs` `(1, R, ...)`, as `step` leaves it."""
        context = AttentionContext(kv=pools, start=0, q_len=input_ids.shape[1], paged=rows, device=self.device)
        with attention_context(context):
            output = self.runner(input_ids, positions)
        logits, self.draft_inputs = split_output(output, self.speculation)
        return logits[0]

    def _cache_rows(self, batch: int) -> list:
        """The cache buffers of the first `batch` rows (views: a bucket-sized cache holds more)."""
        if self.cache.batch == batch:
            return self.cache.buffers
        return [None if slot is None else (slot[0][:batch], slot[1][:batch]) for slot in self.cache.buffers]

    def graph_report(self) -> str:
        """One line: whether decode steps replay CUDA graphs, and why not or which ran eagerly."""
        return self.graphs.report() if self.graphs is not None else "cuda graphs: off (no graph runner configured)"

    def step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        start: int,
        pad: torch.Tensor | None,
        generated: int = 0,
        every_position: bool = False,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `input_ids` (written to cache slots `start..`) and return the last position's
        logits, or every position's with `every_position` (to verify drafts); `generated` is
        how many decode steps came before (0 for the prefill); `tree` is the ancestor mask
        of a tree of drafts fed at once. Decode and verify steps replay a CUDA graph when
        `graphs` can (`GraphedStep.eager_reason`)."""
        batch, width = input_ids.shape
        # a runner that pads batches to buckets takes the whole cache, its padding rows included
        kv = self.cache.buffers if hasattr(self.runner, "cache_rows") else self._cache_rows(batch)
        if start > 0 and self.graphs is not None and self.graphs.eager_reason(batch, width, kv) is None:
            output = self.graphs.run(self.cache.buffers, input_ids, positions, start, pad, tree)
        else:
            context = AttentionContext(
                kv=kv, start=start, q_len=width, pad=pad, generated=generated, skip_counts=self.skip_counts,
                tree=tree, last_only=not every_position, device=self.device,
            )
            with attention_context(context):
                output = self.runner(input_ids, positions)
        logits, self.draft_inputs = split_output(output, self.speculation)
        return logits if every_position else logits[:, -1]

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        sampling: SamplingParams = SamplingParams(),
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        streamer: Any = None,
    ) -> torch.Tensor:
        """Prompt + generated tokens, shaped like Hugging Face `generate` output: rows that
        finish early are filled with the pad token until every row is done. With a draft
        source configured (`prompt_lookup`), each forward also verifies drafted tokens.
        Every input is checked before the cache is touched; one call at a time per engine."""
        input_ids = check_token_ids(input_ids, self.vocab_size, self.device)
        attention_mask = check_attention_mask(attention_mask, input_ids)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        eos_token_id = check_eos_token_ids(eos_token_id)
        stop_strings = check_stop_strings(stop_strings)
        if self._generating_in == threading.get_ident():
            raise LmforgeError("generate was called again from inside generate on the same model (from a streamer?); "
                               "its one KV cache is in use")
        with self.lock, torch.no_grad():
            self._generating_in = threading.get_ident()
            try:
                return self._generate(input_ids, attention_mask, max_new_tokens, sampling, eos_token_id, stop_strings,
                                      streamer)
            finally:
                self._generating_in = None

    def _generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        sampling: SamplingParams,
        eos_token_id: list[int] | None,
        stop_strings: list[str] | None,
        streamer: Any,
    ) -> torch.Tensor:
        """`generate` on checked inputs. The prompt is left-padded to its length bucket
        (`runtime.buckets`); those `added` columns are cut from the result and hidden from
        prompt lookup."""
        self._check_length(input_ids.shape[1] + max_new_tokens)
        stops = _StopStrings(stop_strings, self.tokenizer) if stop_strings else None
        if streamer is not None:
            streamer.put(input_ids.cpu())
        input_ids, attention_mask, added = pad_to_bucket(input_ids, attention_mask, self.pad_token_id,
                                                         limit=self.max_seq_len - max_new_tokens)
        self.prompt_padding = added
        batch, prompt_len = input_ids.shape
        total = prompt_len + max_new_tokens
        eos = self.eos_token_ids if eos_token_id is None else eos_token_id
        eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        generator = torch.Generator(self.device).manual_seed(sampling.seed) if sampling.seed is not None else None
        self._ensure_cache(batch, total)
        pad = left_padding(attention_mask, input_ids)
        tokens = torch.empty(batch, total, dtype=torch.long, device=self.device)
        tokens[:, :prompt_len] = input_ids
        positions = prompt_positions(attention_mask, input_ids)
        last_prompt_position = positions[:, -1:]
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        lookup = self.speculation.get("prompt_lookup")
        lookups = [PromptLookup(**lookup) for _ in range(batch)] if lookup else []
        tree_widths = self.speculation.get("draft_heads", {}).get("tree")
        if sampling.do_sample or not self._plain_cache():
            tree_widths = None  # trees: greedy, and plain cache slots that can be compacted
        typical_options = self.speculation.get("draft_heads", {}).get("typical_acceptance")
        typical = TypicalAcceptance(**typical_options) if typical_options else None
        gate = ProfitabilityGate()
        self.speculation_stats = {"forwards": 1, "drafted": 0, "accepted": 0}
        eagle = self._eagle_drafting()
        eagle_tree = self._eagle_tree() if eagle and self._plain_cache() else None
        if eagle:  # the drafter reads the hidden state at every prompt position
            self.drafter.start(batch, total + 1 + (eagle_tree.drafter_slots() if eagle_tree else 0), pad, self.device)
        logits = self.step(input_ids, positions, 0, pad, every_position=eagle)
        logits = logits[:, -1:] if eagle else logits[:, None]
        fed, fed_positions, fed_start = input_ids, positions, 0
        drafts, length = None, prompt_len
        rows = torch.arange(batch, device=self.device)
        while True:
            head_index = torch.full((batch,), -1, device=self.device)  # per row, the position whose token was accepted last
            path_nodes = None  # per row, the fed positions accepted (tree drafts)
            if drafts is None:
                new_tokens = select_next(logits[:, -1], sampling, generator)[:, None]
            else:
                if isinstance(drafts, TokenTree):
                    paths, own = accept_tree_sampled(logits, drafts, sampling, generator) if sampling.do_sample \
                        else accept_tree(logits, drafts)
                    compact_cache(self._cache_rows(batch), length - 1, paths)
                    nodes = path_nodes = torch.tensor(paths, device=self.device)
                    head_index, accepted, drafted = nodes[:, -1], nodes.shape[1] - 1, len(drafts.parents) - 1
                    new_tokens = torch.cat([drafts.tokens.gather(1, nodes[:, 1:]), own[:, None]], dim=1)
                else:
                    if isinstance(drafts, DrawnChain):
                        accepted, own = accept_drawn(logits, drafts, sampling, generator)
                        drafts = drafts.tokens
                    else:
                        accepted, own = accept(logits, drafts, sampling, generator, typical)
                    head_index, drafted = torch.full((batch,), accepted, device=self.device), drafts.shape[1]
                    new_tokens = torch.cat([drafts[:, :accepted], own[:, None]], dim=1)
                gate.record(accepted, drafted)
                self.speculation_stats["drafted"] += drafted
                self.speculation_stats["accepted"] += accepted
            for column in new_tokens.unbind(1):
                next_tokens = torch.where(unfinished, column, self.pad_token_id)
                tokens[:, length] = next_tokens
                length += 1
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if eos:
                    unfinished &= ~torch.isin(next_tokens, eos_ids)
                if stops is not None:
                    unfinished &= ~stops.hit(tokens[:, prompt_len:length])
                if length == total or not bool(unfinished.any()):
                    break
            if length == total or not bool(unfinished.any()):
                break
            if eagle:
                kept = fed.shape[1] - (0 if drafts is None else drafted - accepted)
                nodes = path_nodes if path_nodes is not None else torch.arange(kept, device=self.device).expand(batch, -1)
                heads = self._eagle_drafts(fed, fed_positions, fed_start, nodes, new_tokens[:, -1:], tokens[:, length - 1],
                                           eagle_tree, sampling, generator)
            else:
                heads = self._head_drafts(self.draft_inputs[rows, head_index], tokens[:, length - 1], tree_widths) \
                    if self.draft_heads else None
            drafts = self._drafts(lookups, heads, gate, tokens[:, added:length], room=total - length - 1,
                                  min_match=lookups[0].max_ngram if eagle and lookups else 1)
            if isinstance(drafts, TokenTree):
                feed, offsets, tree = drafts.tokens, drafts.depths, drafts.mask()
            else:
                chain = drafts.tokens if isinstance(drafts, DrawnChain) else drafts
                feed = tokens[:, length - 1 : length] if chain is None else torch.cat([tokens[:, length - 1 : length], chain], 1)
                offsets, tree = torch.arange(feed.shape[1], device=self.device), None
            fed, fed_positions, fed_start = feed, last_prompt_position + (length - prompt_len) + offsets, length - 1
            logits = self.step(fed, fed_positions, fed_start, pad, generated=length - 1 - prompt_len,
                               every_position=True, tree=tree)
            self.speculation_stats["forwards"] += 1
        if streamer is not None:
            streamer.end()
        return tokens[:, added:length]

    def _eagle_drafting(self) -> bool:
        """Whether an EAGLE drafter drafts: it needs the hidden states of every position fed."""
        return self.draft_heads > 0 and self.speculation.get("draft_heads", {}).get("kind") == "eagle"

    def _eagle_tree(self) -> DynamicTree | None:
        """The dynamic tree the `draft_heads` pass chose for the EAGLE drafter, or None (a chain)."""
        options = self.speculation.get("draft_heads", {}).get("eagle_tree")
        return DynamicTree(**options) if options else None

    def _eagle_drafts(self, fed: torch.Tensor, positions: torch.Tensor, start: int, nodes: torch.Tensor,
                      own: torch.Tensor, root: torch.Tensor, tree: DynamicTree | None, sampling: SamplingParams,
                      generator: torch.Generator | None) -> Callable[[int], torch.Tensor | TokenTree | DrawnChain]:
        """Commit the last forward's accepted positions `nodes` (B, kept), in order, to the
        EAGLE drafter's cache — each position's hidden state with the token after it: the next
        accepted fed token, and the model's own new token `own` (B, 1) after the last — and
        return its drafter: a dynamic tree below `root` (B,) with `tree` (greedy, or sampled and
        verified by recursive rejection sampling), else a chain drawn from its filtered
        distribution when sampling, else its greedy chain. Its drafts
        of the previous step are overwritten: the rollback."""
        hidden = self.draft_inputs.gather(1, nodes[..., None].expand(-1, -1, self.draft_inputs.shape[-1]))
        next_tokens = torch.cat([fed.gather(1, nodes)[:, 1:], own], dim=1)
        self.drafter.extend(hidden, next_tokens, positions.expand(fed.shape).gather(1, nodes), start)
        if tree is not None:
            return lambda room: grow_tree(self.drafter, root, tree, room)
        if sampling.do_sample:
            def distribution(logits: torch.Tensor) -> torch.Tensor:
                return filtered_logits(logits, sampling).softmax(-1)
            return lambda room: DrawnChain(*self.drafter.sample_chain(room, distribution, generator))
        return self.drafter.draft

    def _plain_cache(self) -> bool:
        """Trees move cache entries after verification, which only plain slots support."""
        return all(buffer is None or isinstance(buffer, tuple) for buffer in self.cache.buffers)

    def _head_drafts(self, inputs: torch.Tensor, last: torch.Tensor, widths: list[int] | None):
        """The draft heads' proposal for up to `room` tokens after `last` (B,), from what the
        program returned at the position of the last accepted token: Medusa heads' logits
        (their top-1 chain, or a tree of their top-`widths`), or the hidden state
        Hydra heads draft their chain (or tree) from."""
        if widths:
            children = self.drafter.children(inputs) if self.drafter is not None else medusa_children(inputs)
            return lambda room: build_tree(last, widths[: min(room, self.draft_heads)], children)
        if self.drafter is not None:
            return lambda room: self.drafter.draft(inputs, last, room)
        return lambda room: inputs.argmax(-1)[:, :room]

    def propose_chain(self, tokens: list[int], lookup: PromptLookup | None, gate: ProfitabilityGate,
                      head_inputs: torch.Tensor | None, room: int) -> list[int]:
        """One sequence's draft chain (at most `room` tokens, maybe none) for a driver that
        verifies every sequence on its own (the serving scheduler's continuous batch): prompt
        lookup's, else the draft heads' top-1 chain from `head_inputs`, what the program
        returned at the sequence's last accepted position. Never a tree, nor an EAGLE drafter's
        chain: both keep state shared by the rows of one `generate` batch."""
        heads = None
        if self.draft_heads and head_inputs is not None and not self._eagle_drafting():
            heads = self._head_drafts(head_inputs[None], torch.tensor([tokens[-1]], device=self.device), None)
        drafts = self._drafts([lookup] if lookup is not None else [], heads, gate,
                              torch.tensor([tokens], device=self.device), room)
        return [] if drafts is None else drafts[0].tolist()

    @staticmethod
    def _drafts(
        lookups: list[PromptLookup],
        heads: Callable[[int], torch.Tensor | TokenTree] | None,
        gate: ProfitabilityGate,
        tokens: torch.Tensor,
        room: int,
        min_match: int = 1,
    ) -> torch.Tensor | TokenTree | DrawnChain | None:
        """Prompt lookup's drafts when every row has a match of at least `min_match` tokens (one
        equal-length chain per row, cut to the shortest and to `room`); else the draft heads'
        (`heads(room)`); else None. With an EAGLE drafter, lookup takes over only on its longest
        n-grams: on ref-llama-py's held-out code a 1-token match is followed by no correct token
        70 % of the time, a 3-token match by ~4 on average (`PromptLookup`)."""
        if (not lookups and heads is None) or room < 1 or not gate.should_draft():
            return None
        proposals = [lookup.propose(row) for lookup, row in zip(lookups, tokens.tolist() if lookups else [])]
        length = min((len(proposal) for proposal in proposals), default=0)
        if length > 0 and all(lookup.matched >= min_match for lookup in lookups):
            return torch.tensor([proposal[: min(length, room)] for proposal in proposals], dtype=torch.long,
                                device=tokens.device)
        return heads(room) if heads is not None else None
