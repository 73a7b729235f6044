"""Serving benchmark: `lmforge serve` under concurrent streaming clients against the same
requests run one after another.

Compiles the checkpoint with a recipe into a temporary artifact, then sends the same
requests (held-out prompts of mixed lengths, Poisson arrivals, at most `--clients` streams
in flight, greedy, streamed over HTTP with httpx) to:

- `hf generate, sequential`: Hugging Face `generate` in this process, one request at a
  time in arrival order (a request that arrives while another runs waits for it);
- `serve, one at a time`: `lmforge serve --max-batch 1 --no-prefix-cache`;
- `serve, continuous`: continuous batching with prefix caching (the default) and, with a
  shared prefix, without it;
- with `--speculative-recipe FILE`, `serve, continuous, speculative`: the same continuous
  batching on an artifact compiled with that recipe (prompt lookup, draft heads), each
  request verifying its own drafts; the row reports the draft tokens accepted (`/metrics`).
  `--continuous-only` keeps just the continuous rows (prefix cache on) and skips the
  prefix-reuse measurement.

Each workload runs twice: with distinct prompts, and with every prompt behind one shared
system prompt of `--prefix-tokens` tokens. A server runs in a subprocess per row, warmed up
by one request before its row is timed. Rows report requests/s and output tokens/s over the
row's wall time, time to first token (from arrival) and inter-token latency percentiles,
the prefix cache hit rate (`/metrics`: hit tokens / tokens of admitted requests) and the
requests lost (errors or missing responses; the target is none). Last, on an idle server, the
time to first token of a request behind a `--reuse-prefix-tokens` prefix sent for the first
time and of a second request behind the same prefix.

`--long-prompt-during-decode` adds the workload "a long prompt arriving while streams
decode": `--decoding-streams` greedy streams (64-token prompts, `--stream-output-tokens`
each) start together; once every one has received a few tokens, one `--long-prompt-tokens`
held-out prompt is sent. Two rows, each on its own server: chunked prefill
(`--max-tokens-per-step`) and no chunking (`lmforge serve --max-tokens-per-step 0`, the
prompt in one step). Besides the common columns, a second table gives the long request's time
to first token and the streams' inter-token latency (p50/p90/p99/max) over the gaps that
overlap the time from sending it to its first token, and over their whole run, with each p99
over the whole run's median (the target: at most 2x with chunking). When the recipe's cache
is too short for the long prompt, the checkpoint is compiled again with `runtime.max_seq_len`
raised to fit it; the server's block pool is sized to hold the whole scenario.

    python benchmarks/serve.py [--checkpoint DIR] [--recipe FILE] [--requests 32] [--clients 16]
                               [--rate 8] [--prompt-tokens 64 512] [--output-tokens 32 128]
                               [--prefix-tokens 256] [--reuse-prefix-tokens 1024] [--max-batch 16]
                               [--max-tokens-per-step 512] [--speculative-recipe FILE]
                               [--continuous-only] [--skip-hf] [--long-prompt-during-decode]
                               [--long-prompt-tokens 2048] [--decoding-streams 8]
                               [--stream-output-tokens 256] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

import lmforge
from lmforge.benchmarking import prompt_text_for
from lmforge.compiler.recipe import load_recipe
from lmforge.runtime.paged import DEFAULT_BLOCK_SIZE

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT.parent / "shared" / "models" / "ref-llama-py"
DEFAULT_RECIPE = ROOT / "examples" / "recipes" / "default.yaml"
STARTUP_SECONDS = 300
MODEL_NAME = "bench"
STREAM_PROMPT_TOKENS = 64  # the long-prompt scenario's decoding streams' prompts
DECODING_TOKENS = 4  # tokens every stream has received before the long prompt is sent
LONG_OUTPUT_TOKENS = 8  # asked of the long prompt: its time to first token is what counts


@dataclass(frozen=True)
class Job:
    """One request: its prompt, its token limit and when it arrives (seconds from the start)."""

    prompt_ids: list[int]
    max_tokens: int
    arrival: float


@dataclass
class Timing:
    """What a client saw of one request, in seconds from the start of its row."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    ok: bool = False


def make_jobs(ids: list[int], bos: int | None, args: argparse.Namespace, shared_prefix: bool) -> list[Job]:
    """The row's requests, the same bodies, limits and arrivals for every row (one seed);
    with `shared_prefix` each prompt starts with the first `--prefix-tokens` tokens."""
    rng = random.Random(args.seed)
    prefix = ([bos] if bos is not None else []) + (ids[: args.prefix_tokens] if shared_prefix else [])
    body_ids = ids[args.prefix_tokens :]
    jobs, arrival = [], 0.0
    for _ in range(args.requests):
        length = rng.randint(*args.prompt_tokens)
        start = rng.randrange(0, len(body_ids) - length)
        jobs.append(Job(prefix + body_ids[start : start + length], rng.randint(*args.output_tokens), arrival))
        arrival += rng.expovariate(args.rate) if args.rate > 0 else 0.0
    return jobs


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile, None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(name: str, workload: str, timings: list[Timing], wall: float, hit_rate: float | None) -> dict:
    done = [t for t in timings if t.ok and t.token_times]
    first = [t.token_times[0] - t.arrival for t in done]
    gaps = [b - a for t in done for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(len(t.token_times) for t in done)
    return {"row": name, "workload": workload, "requests": len(timings), "lost": len(timings) - len(done),
            "wall_s": wall, "requests_per_s": len(done) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(first, 50), "ttft_p95_s": percentile(first, 95),
            "itl_p50_s": percentile(gaps, 50), "itl_p95_s": percentile(gaps, 95), "prefix_cache_hit_rate": hit_rate}


async def _stream_one(client: httpx.AsyncClient, job: Job, start: float, slots: asyncio.Semaphore) -> Timing:
    """Send `job` at its arrival time (waiting for a free client), recording each token's time."""
    await asyncio.sleep(max(0.0, start + job.arrival - time.monotonic()))
    timing = Timing(job.arrival)
    async with slots:
        await _stream_into(client, job, start, timing)
    return timing


async def _stream_into(client: httpx.AsyncClient, job: Job, start: float, timing: Timing) -> None:
    """Send `job` now, appending each token's time (from `start`) to `timing` as it arrives."""
    body = {"model": MODEL_NAME, "prompt": job.prompt_ids, "max_tokens": job.max_tokens, "temperature": 0,
            "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason") is None:
                    timing.token_times.append(time.monotonic() - start)
                elif choices:
                    timing.ok = response.status_code == 200
    except httpx.HTTPError:
        timing.ok = False


async def drive(base: str, jobs: list[Job], clients: int) -> tuple[list[Timing], float]:
    """Every job through the server, at most `clients` in flight; the timings and wall time."""
    slots = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0)) as client:
        start = time.monotonic()
        timings = await asyncio.gather(*(_stream_one(client, job, start, slots) for job in jobs))
    return list(timings), time.monotonic() - start


def server_counters(base: str) -> dict[str, int]:
    """The server's unlabelled /metrics counters by name."""
    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith("_total") and value:
            values[name] = int(float(value))
    return values


class Server:
    """`lmforge serve ARTIFACT` in a subprocess on a free port, until the `with` ends."""

    def __init__(self, artifact: Path, options: list[str], log_dir: Path) -> None:
        self.command = [sys.executable, "-m", "lmforge.cli", "serve", str(artifact), "--port", str(_free_port()),
                        *options]
        self.base = f"http://127.0.0.1:{self.command[self.command.index('--port') + 1]}"
        self.log_path = log_dir / f"server-{len(list(log_dir.iterdir()))}.log"

    def __enter__(self) -> Server:
        self.log = self.log_path.open("w+")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"lmforge serve did not start; its log: {self.log_path}")
            time.sleep(0.2)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def __exit__(self, *_) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_row(name: str, workload: str, artifact: Path, options: list[str], jobs: list[Job], warmup: Job,
              args: argparse.Namespace, log_dir: Path) -> dict:
    with Server(artifact, options, log_dir) as server:
        asyncio.run(drive(server.base, [warmup], 1))
        before = server_counters(server.base)
        timings, wall = asyncio.run(drive(server.base, jobs, args.clients))
        after = server_counters(server.base)
    row = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    hits = row.get("lmforge_prefix_cache_hit_tokens_total", 0)
    queries = row.get("lmforge_prefix_cache_query_tokens_total", 0)
    rate = hits / queries if "--no-prefix-cache" not in options and queries else None
    return {**summarize(name, workload, timings, wall, rate), "draft_tokens": row.get("lmforge_draft_tokens_total", 0),
            "accepted_draft_tokens": row.get("lmforge_accepted_draft_tokens_total", 0)}


def prefix_reuse(artifact: Path, options: list[str], ids: list[int], bos: int | None, args: argparse.Namespace,
                 log_dir: Path, repeats: int = 3) -> dict:
    """Time to first token of a request behind a `--reuse-prefix-tokens` prefix nobody sent
    before (cold) and of a second request behind the same prefix (warm), one request at a
    time on an idle server, medians over `repeats` prefixes from the end of the text (away
    from the workloads' shared prefix)."""
    length, cold, warm = args.reuse_prefix_tokens, [], []
    if (repeats + 1) * (length + 64) > len(ids):
        raise SystemExit(f"--reuse-prefix-tokens {length}: the held-out text has too few tokens ({len(ids)})")
    start_token = [bos] if bos is not None else []
    with Server(artifact, options, log_dir) as server:
        for repeat in range(repeats + 1):  # the first pair warms the server up
            end = len(ids) - repeat * (length + 64)
            prefix = start_token + ids[end - length - 64 : end - 64]
            pair = [Job(prefix + ids[end - 64 + 32 * i : end - 32 + 32 * i], 1, 0.0) for i in range(2)]
            times = [asyncio.run(drive(server.base, [job], 1))[0][0] for job in pair]
            if repeat and all(t.ok for t in times):
                cold.append(times[0].token_times[0] - times[0].arrival)
                warm.append(times[1].token_times[0] - times[1].arrival)
    cold_s, warm_s = percentile(cold, 50), percentile(warm, 50)
    return {"prefix_tokens": length, "ttft_cold_s": cold_s, "ttft_warm_s": warm_s,
            "cold_over_warm": cold_s / warm_s if cold_s and warm_s else None}


def long_prompt_jobs(ids: list[int], bos: int | None, args: argparse.Namespace) -> tuple[list[Job], Job, Job]:
    """The decoding streams (`--decoding-streams` prompts of 64 held-out tokens, each asking
    for `--stream-output-tokens`), the long request (`--long-prompt-tokens` tokens, asking for
    a few) and a warm-up request as long, each from its own stretch of the held-out text."""
    start_token = [bos] if bos is not None else []
    body = args.long_prompt_tokens - len(start_token)
    first_long = args.decoding_streams * STREAM_PROMPT_TOKENS
    if first_long + 2 * body > len(ids):
        raise SystemExit(f"--long-prompt-tokens {args.long_prompt_tokens}: the held-out text has too few tokens "
                         f"({len(ids)})")
    streams = [Job(start_token + ids[i * STREAM_PROMPT_TOKENS : (i + 1) * STREAM_PROMPT_TOKENS],
                   args.stream_output_tokens, 0.0) for i in range(args.decoding_streams)]
    long = Job(start_token + ids[first_long : first_long + body], LONG_OUTPUT_TOKENS, 0.0)
    warmup = Job(start_token + ids[first_long + body : first_long + 2 * body], LONG_OUTPUT_TOKENS, 0.0)
    return streams, long, warmup


async def _long_prompt_during_decode(base: str, streams: list[Job], long: Job) -> tuple[list[Timing], Timing, float]:
    """Start every stream; once each has received `DECODING_TOKENS` tokens (or ended), send
    `long`. The streams' timings, the long request's (its arrival: when it was sent) and the
    wall time."""
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0)) as client:
        start = time.monotonic()
        timings = [Timing(0.0) for _ in streams]
        tasks = [asyncio.create_task(_stream_into(client, job, start, timing)) for job, timing in zip(streams, timings)]
        while not all(len(t.token_times) >= DECODING_TOKENS or task.done() for t, task in zip(timings, tasks)):
            await asyncio.sleep(0.005)
        long_timing = Timing(time.monotonic() - start)
        await _stream_into(client, long, start, long_timing)
        await asyncio.gather(*tasks)
    return timings, long_timing, time.monotonic() - start


def _gap_figures(gaps: list[float], prefix: str) -> dict:
    return {f"{prefix}_gaps": len(gaps), **{f"{prefix}_p{q}_s": percentile(gaps, q) for q in (50, 90, 99)},
            f"{prefix}_max_s": max(gaps, default=None)}


def long_prompt_row(name: str, workload: str, artifact: Path, options: list[str], jobs: tuple[list[Job], Job, Job],
                    warmup: Job, log_dir: Path) -> dict:
    """The decoding streams' inter-token latency while the long prompt is prefilled — over
    the gaps that overlap the time from sending it to its first token — and over their whole
    run, and the long request's time to first token. The server is warmed up by a short
    request and by a long one (other text), one at a time."""
    streams, long, long_warmup = jobs
    with Server(artifact, options, log_dir) as server:
        for job in (warmup, long_warmup):
            asyncio.run(drive(server.base, [job], 1))
        timings, long_timing, wall = asyncio.run(_long_prompt_during_decode(server.base, streams, long))
    sent = long_timing.arrival
    first = long_timing.token_times[0] if long_timing.token_times else None
    spans = [(a, b) for t in timings for a, b in zip(t.token_times, t.token_times[1:])]
    window = [b - a for a, b in spans if first is not None and a < first and b > sent]
    figures = {**_gap_figures(window, "window_itl"), **_gap_figures([b - a for a, b in spans], "overall_itl")}
    median = figures["overall_itl_p50_s"]
    for prefix in ("window_itl", "overall_itl"):
        p99 = figures[f"{prefix}_p99_s"]
        figures[f"{prefix}_p99_over_median"] = p99 / median if median and p99 is not None else None
    return {**summarize(name, workload, [*timings, long_timing], wall, None), "draft_tokens": 0,
            "accepted_draft_tokens": 0, "long_prompt_tokens": len(long.prompt_ids),
            "stream_tokens": [len(t.token_times) for t in timings],
            "long_ttft_s": None if first is None else first - sent, **figures}


def long_prompt_artifact(checkpoint: Path, recipe_path: Path, artifact: Path, max_seq_len: int, needed: int,
                         directory: Path) -> Path:
    """`artifact` when its cache holds `needed` tokens per request, else the recipe compiled
    again with `runtime.max_seq_len` raised to `needed`."""
    if max_seq_len >= needed:
        return artifact
    recipe = load_recipe(recipe_path)
    recipe = recipe.model_copy(update={"runtime": recipe.runtime.model_copy(update={"max_seq_len": needed})})
    return lmforge.optimize(checkpoint, recipe).save(directory / MODEL_NAME)


def long_prompt_rows(artifact: Path, jobs: tuple[list[Job], Job, Job], warmup: Job, args: argparse.Namespace,
                     log_dir: Path) -> list[dict]:
    """The long-prompt scenario with chunked prefill (`--max-tokens-per-step`) and without
    (`--max-tokens-per-step 0`: the whole prompt in one step), on a pool of KV blocks sized
    to hold every request of the scenario at once."""
    streams, long = jobs[0], jobs[1]
    blocks = sum(math.ceil((len(j.prompt_ids) + j.max_tokens) / DEFAULT_BLOCK_SIZE) + 1 for j in [*streams, long])
    common = ["--max-batch", str(max(args.max_batch, len(streams) + 1)), "--kv-blocks", str(blocks)]
    workload = f"{len(long.prompt_ids)}-token prompt during {len(streams)} streams"
    settings = ((f"serve, chunked prefill ({args.max_tokens_per_step}/step)", args.max_tokens_per_step),
                ("serve, no chunking (prompt in one step)", 0))
    return [long_prompt_row(name, workload, artifact, [*common, "--max-tokens-per-step", str(budget)], jobs, warmup,
                            log_dir) for name, budget in settings]


class _TokenClock(LogitsProcessor):
    """Records when each token's logits are ready (`generate` calls it once per new token)."""

    def __init__(self, start: float, timing: Timing) -> None:
        self.start, self.timing = start, timing

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.timing.token_times.append(time.monotonic() - self.start)
        return scores


def hf_row(model, eos: list[int], jobs: list[Job], workload: str) -> dict:
    """The jobs through HF `generate` one after another, each starting at its arrival or when
    the one before it ends; tokens after an end-of-sequence token are not counted."""
    timings, start = [], time.monotonic()
    with torch.no_grad():
        for job in jobs:
            time.sleep(max(0.0, start + job.arrival - time.monotonic()))
            timing = Timing(job.arrival)
            output = model.generate(torch.tensor([job.prompt_ids]), max_new_tokens=job.max_tokens, do_sample=False,
                                    logits_processor=LogitsProcessorList([_TokenClock(start, timing)]),
                                    pad_token_id=eos[0] if eos else None)
            new = output[0, len(job.prompt_ids):].tolist()
            kept = next((i for i, token in enumerate(new) if token in eos), len(new))
            timing.token_times = timing.token_times[:kept]
            timing.ok = True
            timings.append(timing)
    return {**summarize("hf generate, sequential", workload, timings, time.monotonic() - start, None),
            "draft_tokens": 0, "accepted_draft_tokens": 0}


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    table = Table(title=f"lmforge serve: {args.requests} requests, {args.clients} clients, {args.rate}/s arrivals, "
                        f"prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens")
    columns = ("workload", "row", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
               "prefix hits", "drafts accepted", "lost")
    for column in columns:
        table.add_column(column, justify="left" if column in ("workload", "row") else "right")
    ms = _milliseconds
    for row in rows:
        hits = "-" if row["prefix_cache_hit_rate"] is None else f"{row['prefix_cache_hit_rate']:.0%}"
        drafts = f"{row['accepted_draft_tokens']}/{row['draft_tokens']}" if row["draft_tokens"] else "-"
        table.add_row(row["workload"], row["row"], f"{row['requests_per_s']:.2f}", f"{row['output_tokens_per_s']:.1f}",
                      ms(row["ttft_p50_s"]), ms(row["ttft_p95_s"]), ms(row["itl_p50_s"]), ms(row["itl_p95_s"]),
                      hits, drafts, str(row["lost"]))
    Console(width=160).print(table)  # wide enough for every column when piped


def print_long_prompt_table(rows: list[dict]) -> None:
    """The streams' inter-token latency while the long prompt is prefilled and over their run."""
    if not rows:
        return
    table = Table(title=f"{rows[0]['workload']}: the streams' inter-token latency (ms) while it is prefilled "
                        f"(gaps overlapping its send .. first token) and over their whole run")
    for column in ("row", "long TTFT ms", "window gaps", "p50", "p90", "p99", "max", "all gaps", "p50", "p90", "p99",
                   "max", "p99/median (window, all)"):
        table.add_column(column, justify="left" if column == "row" else "right")
    ms = _milliseconds
    ratio = lambda value: "-" if value is None else f"{value:.1f}x"
    for row in rows:
        cells = [ms(row[f"{prefix}_{name}_s"]) for prefix in ("window_itl", "overall_itl")
                 for name in ("p50", "p90", "p99", "max")]
        table.add_row(row["row"], ms(row["long_ttft_s"]), str(row["window_itl_gaps"]), *cells[:4],
                      str(row["overall_itl_gaps"]), *cells[4:],
                      f"{ratio(row['window_itl_p99_over_median'])}, {ratio(row['overall_itl_p99_over_median'])}")
    Console(width=160).print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16, help="streams in flight at most")
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second (0: all at once)")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--prefix-tokens", type=int, default=256, help="the shared system prompt's length")
    parser.add_argument("--reuse-prefix-tokens", type=int, default=1024,
                        help="the prefix of the cold-vs-cached time-to-first-token measurement")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-tokens-per-step", type=int, default=512)
    parser.add_argument("--speculative-recipe", type=Path,
                        help="also serve an artifact compiled with this recipe (prompt lookup, draft heads)")
    parser.add_argument("--continuous-only", action="store_true",
                        help="only the continuous rows with the prefix cache; no prefix-reuse measurement")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the HF generate rows")
    parser.add_argument("--long-prompt-during-decode", action="store_true",
                        help="also send one --long-prompt-tokens prompt while --decoding-streams streams decode, "
                             "with chunked prefill and without, and report the streams' inter-token latency")
    parser.add_argument("--long-prompt-tokens", type=int, default=2048)
    parser.add_argument("--decoding-streams", type=int, default=8)
    parser.add_argument("--stream-output-tokens", type=int, default=256,
                        help="tokens each decoding stream asks for (enough to outlast the long prefill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    ids = tokenizer(prompt_text_for(args.checkpoint), add_special_tokens=False).input_ids
    compiled = lmforge.optimize(args.checkpoint, args.recipe)
    with tempfile.TemporaryDirectory() as temp:
        artifact = compiled.save(Path(temp) / MODEL_NAME)
        eos_ids = list(compiled.engine.eos_token_ids)
        compiled_len = compiled.engine.max_seq_len
        del compiled
        speculative = None
        if args.speculative_recipe is not None:
            speculative = lmforge.optimize(args.checkpoint, args.speculative_recipe).save(
                Path(temp) / "speculative" / MODEL_NAME)  # the server publishes its directory's name
        hf = None if args.skip_hf else AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
        warmup = Job(ids[-32:], 4, 0.0)
        batching = ["--max-batch", str(args.max_batch), "--max-tokens-per-step", str(args.max_tokens_per_step)]
        one_at_a_time = ["--max-batch", "1", "--max-tokens-per-step", str(args.max_tokens_per_step),
                         "--no-prefix-cache"]
        rows, log_dir = [], Path(temp) / "logs"
        log_dir.mkdir()
        for workload, shared in (("distinct prompts", False), (f"{args.prefix_tokens}-token shared prefix", True)):
            jobs = make_jobs(ids, tokenizer.bos_token_id, args, shared)
            if hf is not None:
                rows.append(hf_row(hf, eos_ids, jobs, workload))
            if not args.continuous_only:
                rows.append(serve_row("serve, one at a time", workload, artifact, one_at_a_time, jobs, warmup, args,
                                      log_dir))
            if shared and not args.continuous_only:
                rows.append(serve_row("serve, continuous, no prefix cache", workload, artifact,
                                      [*batching, "--no-prefix-cache"], jobs, warmup, args, log_dir))
            rows.append(serve_row("serve, continuous, prefix cache", workload, artifact, batching, jobs, warmup,
                                  args, log_dir))
            if speculative is not None:
                rows.append(serve_row("serve, continuous, speculative", workload, speculative, batching, jobs, warmup,
                                      args, log_dir))
        reuse = None if args.continuous_only else prefix_reuse(artifact, batching, ids, tokenizer.bos_token_id, args,
                                                               log_dir)
        if args.long_prompt_during_decode:
            jobs = long_prompt_jobs(ids, tokenizer.bos_token_id, args)
            needed = max(len(job.prompt_ids) + job.max_tokens for job in (*jobs[0], jobs[1]))
            long_artifact = long_prompt_artifact(args.checkpoint, args.recipe, artifact, compiled_len, needed,
                                                 Path(temp) / "long-context")
            rows += long_prompt_rows(long_artifact, jobs, warmup, args, log_dir)
    if args.json:
        json.dump({"settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
                   "rows": rows, "prefix_reuse": reuse}, sys.stdout, indent=2)
        print()
    else:
        print_table(rows, args)
        print_long_prompt_table([row for row in rows if "long_ttft_s" in row])
        if reuse is None:
            return
        ratio = "-" if reuse["cold_over_warm"] is None else f"{reuse['cold_over_warm']:.1f}x"
        print(f"a second request behind the same {reuse['prefix_tokens']}-token prefix: time to first token "
              f"{_milliseconds(reuse['ttft_cold_s'])} ms cold, {_milliseconds(reuse['ttft_warm_s'])} ms with the "
              f"prefix cached ({ratio} lower)")


if __name__ == "__main__":
    main()
