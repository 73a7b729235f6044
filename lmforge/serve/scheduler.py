"""The serving schedulers: one worker thread owns the Engine and runs queued requests.

Two drivers share the request life cycle here (`SchedulerBase`: queue, worker thread,
cancellation, sampling, detokenising, metrics):

- `ContinuousScheduler` (`serve/continuous.py`) batches at the iteration level over a paged
  KV cache: requests join and leave between steps, and long prompts are prefilled in chunks.
  It serves every program whose attention can be paged (`runtime.paged`).
- `Scheduler` here runs *one batch at a time*, for the programs that cannot be paged: when
  no batch is running, `schedule()` takes up to `max_batch` waiting requests (within the
  prefill token budget and the cache length) and they start together: one left-padded
  prefill, then decode steps until every row is done. Requests that arrive meanwhile wait
  for the next batch. A row that finishes or is cancelled stops emitting at once, but its
  cache row is only reused when the batch ends.

Every decode here is a plain one-token step (no drafts): lossless speculation gives the
same tokens, so greedy output equals `Engine.generate`'s. The continuous scheduler verifies
drafts per request (`serve/continuous.py`).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.runtime.buckets import pad_to_bucket
from lmforge.runtime.engine import Engine, left_padding, prompt_positions
from lmforge.runtime.sampling import SamplingParams, select_next
from lmforge.serve.metrics import ServeMetrics


@dataclass(frozen=True)
class GenerationParams:
    """Per-request settings: new-token limit, sampling, stop strings, top-k logprobs."""

    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    """What a request hears after each step: the text that became final (`text`, may be
    empty while a possible stop string or a partial character is held back), the token and
    its logprobs, and `finish_reason` on the last event (stop, length, cancelled, error)."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One request's state, owned by the worker thread once submitted. `on_event` is called
    from that thread (the HTTP layer hands the event to its event loop)."""

    prompt_ids: list[int]
    params: GenerationParams
    on_event: Callable[[TokenEvent], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    output_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Detokenizer:
    """Turns a request's tokens into final text: stop strings cut the text (and end the
    request); the tail that could still become a stop string or is half a character is held
    back, so streamed pieces always add up to the non-streamed text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def advance(self, request: Request, final: bool) -> tuple[str, bool]:
        """The new final text of `request` and whether a stop string ended it."""
        text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        hits = [text.find(stop) for stop in request.params.stop if stop in text]
        if hits:
            return text[: min(hits)][len(request.emitted):], True
        end = len(text)
        if not final:
            end -= max((len(stop) - 1 for stop in request.params.stop), default=0)
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, len(request.emitted))
        return text[len(request.emitted):end], False


class Batch:
    """Rows that started together: their token buffer, cache positions and padding."""

    def __init__(self, engine: Engine, requests: list[Request]) -> None:
        self.engine, self.requests = engine, requests
        width = max(len(r.prompt_ids) for r in requests)
        new_tokens = max(r.params.max_tokens for r in requests)
        device = engine.device
        ids = torch.full((len(requests), width), engine.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=device)
            mask[row, width - len(request.prompt_ids):] = 1
        ids, mask, _ = pad_to_bucket(ids, mask, engine.pad_token_id, limit=engine.max_seq_len - new_tokens)
        self.prompt_len = ids.shape[1]
        self.total = self.prompt_len + new_tokens
        engine.reserve_cache(len(requests), self.total)
        self.pad = left_padding(mask, ids)
        self.prompt, self.positions = ids, prompt_positions(mask, ids)
        self.length = self.prompt_len
        self.last_tokens: torch.Tensor | None = None

    def step(self) -> torch.Tensor:
        """The next-token logits of every row: the prefill first, then one decode step
        (fed the tokens `update` chose), exactly as `Engine.generate` runs them."""
        if self.last_tokens is None:
            return self.engine.step(self.prompt, self.positions, 0, self.pad)
        positions = self.positions[:, -1:] + (self.length - self.prompt_len + 1)
        logits = self.engine.step(self.last_tokens[:, None], positions, self.length, self.pad,
                                  generated=self.length - self.prompt_len, every_position=True)
        self.length += 1
        return logits[:, -1]

    @property
    def done(self) -> bool:
        started = self.last_tokens is not None
        return all(r.finished for r in self.requests) or (started and self.length + 1 >= self.total)


class SchedulerBase:
    """Queue + worker thread around one Engine, and what happens to a request whatever the
    batching: its checks, cancellation, the choice of each token, its text and its end.
    Subclasses write the worker loop (`_run`). The server keeps serving after any error: a
    failing step ends its requests with an `error` event, and the worker goes on."""

    def __init__(self, engine: Engine, tokenizer: Any, *, max_batch: int = 8, max_tokens_per_step: int = 4096,
                 metrics: ServeMetrics | None = None) -> None:
        if max_batch < 1 or max_tokens_per_step < 0:
            raise LmforgeError(f"max_batch must be >= 1 and max_tokens_per_step >= 0 (0: no limit) "
                               f"(got {max_batch}, {max_tokens_per_step})")
        self.engine, self.detokenizer = engine, Detokenizer(tokenizer)
        self.max_batch = max_batch
        # 0 lifts the limit: every prompt is prefilled whole in one step (no chunking)
        self.max_tokens_per_step: float = max_tokens_per_step or math.inf
        self.metrics = metrics or ServeMetrics()
        self.eos_ids = set(engine.eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.wakeup = threading.Condition()
        self.stopping = False
        self.worker = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request the cache cannot hold (a clear error, before it is queued)."""
        if prompt_len + max_tokens > self.max_seq_len:
            raise LmforgeError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                               f"exceeds the model's context of {self.max_seq_len} tokens")

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.worker.is_alive():
            self.worker.join(timeout=30)

    def submit(self, request: Request) -> None:
        self.check(len(request.prompt_ids), request.params.max_tokens)
        if request.params.sampling.seed is not None:
            request.generator = torch.Generator(self.engine.device).manual_seed(request.params.sampling.seed)
        with self.wakeup:
            self.waiting.append(request)
            self.metrics.occupancy(len(self.waiting), self.metrics.batch_size)
            self.wakeup.notify()

    def cancel(self, request: Request) -> None:
        """Stop `request` (its client went away): the worker drops a queued one when it next
        looks at the queue and stops a running one before its next step (continuous batching
        frees its blocks then); a finished request is left alone."""
        request.cancelled.set()
        with self.wakeup:
            self.wakeup.notify()

    def _accept(self, request: Request, logits: torch.Tensor, logprobs: torch.Tensor | None, now: float) -> int:
        """Choose `request`'s next token from its logits (1, vocab), record and emit it."""
        token = int(select_next(logits, request.params.sampling, request.generator)[0])
        self._record(request, token, logprobs, now)
        return token

    def _record(self, request: Request, token: int, logprobs: torch.Tensor | None, now: float) -> None:
        """Record and emit `request`'s next token, chosen already (sampled, or verified drafts)."""
        self.metrics.token(now - (request.last_token_time or request.arrival), request.last_token_time is None)
        request.last_token_time = now
        request.output_ids.append(token)
        self._emit_token(request, token, logprobs)

    def _emit_token(self, request: Request, token: int, logprobs: torch.Tensor | None) -> None:
        finish = None
        if token in self.eos_ids:
            request.output_ids.pop()  # the end-of-sequence token is not part of the text
            finish = "stop"
        elif len(request.output_ids) >= request.params.max_tokens:
            finish = "length"
        text, stopped = self.detokenizer.advance(request, final=finish is not None)
        finish = "stop" if stopped else finish
        request.emitted += text
        top: tuple[tuple[int, float], ...] = ()
        if logprobs is not None and request.params.logprobs:
            values, ids = logprobs.topk(request.params.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist()))
        wanted = logprobs is not None and request.params.logprobs is not None
        chosen_logprob = float(logprobs[token]) if wanted else None
        request.on_event(TokenEvent(text, token, chosen_logprob, top))
        if finish is not None:
            self._finish(request, finish)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.finished:
            return
        request.finish_reason = reason
        self.metrics.finished(reason, len(request.prompt_ids))
        request.on_event(TokenEvent("", finish_reason=reason, error=error))

    def _fail(self, requests: list[Request], exc: Exception) -> None:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for request in requests:
            self._finish(request, "error", error=message)


class Scheduler(SchedulerBase):
    """One batch at a time; see the module docstring for what a batch is. `max_batch` bounds
    the rows of a batch; `max_tokens_per_step` bounds the prefill (rows × longest prompt), at
    least one request always fits. `reason` says why the model is not served by continuous
    batching."""

    def __init__(self, engine: Engine, tokenizer: Any, *, reason: str = "chosen by the caller", **options: Any) -> None:
        super().__init__(engine, tokenizer, **options)
        self.reason = reason

    def describe(self) -> str:
        return f"one batch at a time ({self.reason})"

    def schedule(self) -> Batch | None:
        """The next batch from the waiting queue (first come, first served), or None."""
        chosen: list[Request] = []
        with self.wakeup:
            for request in list(self.waiting):
                if request.cancelled.is_set():
                    self.waiting.remove(request)
                    self._finish(request, "cancelled")
                    continue
                if chosen and not self._fits(chosen + [request]):
                    break
                chosen.append(request)
                self.waiting.remove(request)
                if len(chosen) == self.max_batch:
                    break
            self.metrics.occupancy(len(self.waiting), len(chosen), new_batch=bool(chosen))
        if not chosen:
            return None
        try:
            return Batch(self.engine, chosen)
        except Exception as exc:  # a batch that cannot even start (e.g. out of memory)
            self._fail(chosen, exc)
            return None

    def _fits(self, requests: list[Request]) -> bool:
        longest = max(len(r.prompt_ids) for r in requests)
        return (longest * len(requests) <= self.max_tokens_per_step
                and longest + max(r.params.max_tokens for r in requests) <= self.max_seq_len)

    def update(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """Choose each row's next token from `logits`, tell its request, and return the
        tokens the next step feeds (finished rows feed the pad token)."""
        now = time.monotonic()
        chosen = torch.full((len(batch.requests),), self.engine.pad_token_id, dtype=torch.long, device=logits.device)
        wanted = any(r.params.logprobs is not None for r in batch.requests)
        logprobs = logits.float().log_softmax(-1) if wanted else None
        for row, request in enumerate(batch.requests):
            if request.finished:
                continue
            if request.cancelled.is_set():
                self._finish(request, "cancelled")
                continue
            chosen[row] = self._accept(request, logits[row : row + 1], logprobs[row] if logprobs is not None else None,
                                       now)
        batch.last_tokens = chosen
        return chosen

    def _next_batch(self) -> Batch | None:
        with self.wakeup:
            while not self.stopping and not self.waiting:
                self.wakeup.wait()
            if self.stopping:
                return None
        return self.schedule()

    def _run(self) -> None:
        while not self.stopping:
            batch = self._next_batch()
            if batch is None:
                continue
            try:
                with self.engine.lock, torch.no_grad():
                    while not batch.done:
                        self.update(batch, batch.step())
            except Exception as exc:  # the server outlives any one batch
                self._fail(batch.requests, exc)
            for request in batch.requests:
                if not request.finished:
                    self._finish(request, "cancelled" if request.cancelled.is_set() else "length")
            self.metrics.occupancy(len(self.waiting), 0)
