"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Written by hand rather than with `prometheus_client` to keep the dependency list short: the
server needs a few counters, two gauges and three histograms. The scheduler's worker thread
records and the HTTP handlers read, so every update and the rendering hold one lock.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return [*lines, f"{name}_sum {self.total}", f"{name}_count {self.count}"]


class ServeMetrics:
    """What `/metrics` reports: requests by outcome, prompt and generated tokens, the
    waiting queue, the running batch, the paged cache's blocks and preemptions, the prefix
    cache's hits, draft tokens verified and accepted, time to first token and inter-token
    latency."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.queue_length = 0
        self.batch_size = 0
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.kv_blocks_used, self.kv_blocks_total, self.preemptions = 0, 0, 0
        self.prefix_hit_tokens, self.prefix_query_tokens, self.prefix_cached_blocks = 0, 0, 0
        self.draft_tokens, self.accepted_draft_tokens = 0, 0
        self.time_to_first_token = Histogram(LATENCY_BUCKETS)
        self.inter_token_latency = Histogram(LATENCY_BUCKETS)

    def finished(self, outcome: str, prompt_tokens: int) -> None:
        """One request ended with `outcome` (stop, length, cancelled, error)."""
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1
            self.prompt_tokens += prompt_tokens

    def token(self, since_previous: float, first: bool) -> None:
        """One generated token, `since_previous` seconds after the request arrived (first
        token) or after its previous token."""
        with self.lock:
            self.generation_tokens += 1
            (self.time_to_first_token if first else self.inter_token_latency).observe(since_previous)

    def occupancy(self, queue_length: int, batch_size: int, new_batch: bool = False) -> None:
        with self.lock:
            self.queue_length, self.batch_size = queue_length, batch_size
            if new_batch:
                self.batch_sizes.observe(batch_size)

    def blocks(self, used: int, total: int, preemptions: int) -> None:
        """The paged KV cache's blocks in use and in all, and the preemptions so far."""
        with self.lock:
            self.kv_blocks_used, self.kv_blocks_total, self.preemptions = used, total, preemptions

    def prefix_cache(self, hit_tokens: int, query_tokens: int, cached_blocks: int) -> None:
        """Tokens admitted requests found in the prefix cache, their tokens in all (so that
        hits / queries is the hit rate), and the blocks the cache holds now."""
        with self.lock:
            self.prefix_hit_tokens, self.prefix_query_tokens = hit_tokens, query_tokens
            self.prefix_cached_blocks = cached_blocks

    def drafts(self, drafted: int, accepted: int) -> None:
        """One request's drafts verified in a step: `drafted` tokens fed, `accepted` of them kept."""
        with self.lock:
            self.draft_tokens += drafted
            self.accepted_draft_tokens += accepted

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP lmforge_requests_total Requests finished, by outcome.",
                "# TYPE lmforge_requests_total counter",
                *(f'lmforge_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())),
                "# HELP lmforge_prompt_tokens_total Prompt tokens of finished requests.",
                "# TYPE lmforge_prompt_tokens_total counter",
                f"lmforge_prompt_tokens_total {self.prompt_tokens}",
                "# HELP lmforge_generation_tokens_total Tokens generated.",
                "# TYPE lmforge_generation_tokens_total counter",
                f"lmforge_generation_tokens_total {self.generation_tokens}",
                "# HELP lmforge_queue_length Requests waiting for a batch.",
                "# TYPE lmforge_queue_length gauge",
                f"lmforge_queue_length {self.queue_length}",
                "# HELP lmforge_batch_size Requests in the running batch.",
                "# TYPE lmforge_batch_size gauge",
                f"lmforge_batch_size {self.batch_size}",
                "# HELP lmforge_batch_size_started Requests in the batch when requests joined it (or when a batch started).",
                "# TYPE lmforge_batch_size_started histogram",
                *self.batch_sizes.lines("lmforge_batch_size_started"),
                "# HELP lmforge_kv_blocks_used Blocks of the paged KV cache held by requests.",
                "# TYPE lmforge_kv_blocks_used gauge",
                f"lmforge_kv_blocks_used {self.kv_blocks_used}",
                "# HELP lmforge_kv_blocks_total Blocks of the paged KV cache (0: not paged).",
                "# TYPE lmforge_kv_blocks_total gauge",
                f"lmforge_kv_blocks_total {self.kv_blocks_total}",
                "# HELP lmforge_preemptions_total Requests preempted for blocks, to be recomputed.",
                "# TYPE lmforge_preemptions_total counter",
                f"lmforge_preemptions_total {self.preemptions}",
                "# HELP lmforge_prefix_cache_hit_tokens_total Tokens of admitted requests found in the prefix cache.",
                "# TYPE lmforge_prefix_cache_hit_tokens_total counter",
                f"lmforge_prefix_cache_hit_tokens_total {self.prefix_hit_tokens}",
                "# HELP lmforge_prefix_cache_query_tokens_total Tokens of admitted requests looked up in the cache.",
                "# TYPE lmforge_prefix_cache_query_tokens_total counter",
                f"lmforge_prefix_cache_query_tokens_total {self.prefix_query_tokens}",
                "# HELP lmforge_prefix_cache_blocks Blocks of the paged KV cache registered in the prefix cache.",
                "# TYPE lmforge_prefix_cache_blocks gauge",
                f"lmforge_prefix_cache_blocks {self.prefix_cached_blocks}",
                "# HELP lmforge_draft_tokens_total Draft tokens (prompt lookup, draft heads) verified.",
                "# TYPE lmforge_draft_tokens_total counter",
                f"lmforge_draft_tokens_total {self.draft_tokens}",
                "# HELP lmforge_accepted_draft_tokens_total Draft tokens the model agreed with (each saved a forward).",
                "# TYPE lmforge_accepted_draft_tokens_total counter",
                f"lmforge_accepted_draft_tokens_total {self.accepted_draft_tokens}",
                "# HELP lmforge_time_to_first_token_seconds From arrival to the first generated token.",
                "# TYPE lmforge_time_to_first_token_seconds histogram",
                *self.time_to_first_token.lines("lmforge_time_to_first_token_seconds"),
                "# HELP lmforge_inter_token_latency_seconds Between consecutive tokens of one request.",
                "# TYPE lmforge_inter_token_latency_seconds histogram",
                *self.inter_token_latency.lines("lmforge_inter_token_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"
