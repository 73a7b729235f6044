"""The OpenAI-compatible HTTP layer of `lmforge serve` (FastAPI).

It only translates: a request body becomes token ids and `GenerationParams`, is handed to
the scheduler, and the scheduler's `TokenEvent`s become an OpenAI response or its
server-sent-event stream. Events arrive on the scheduler's thread and are passed to the
event loop with `call_soon_threadsafe`. A client that goes away (stream closed, or a
non-streaming request whose connection dropped) cancels its request, which frees its row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lmforge.errors import LmforgeError
from lmforge.runtime.paged import paging_unsupported_reason
from lmforge.runtime.sampling import SamplingParams
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from lmforge.serve.continuous import ContinuousScheduler
from lmforge.serve.scheduler import GenerationParams, Request, Scheduler, SchedulerBase, TokenEvent

logger = logging.getLogger("lmforge.serve")

DISCONNECT_POLL_SECONDS = 0.5


class _Events:
    """The bridge from the scheduler's thread to one request's handler on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event: TokenEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _Served:
    """What the handlers share: the model's name, tokenizer and the scheduler."""

    def __init__(self, model: Any, name: str, scheduler: SchedulerBase) -> None:
        self.model, self.name, self.scheduler = model, name, scheduler
        self.tokenizer = model.tokenizer

    def check_model(self, requested: str) -> None:
        if requested != self.name:
            raise ApiError(404, f"the model '{requested}' does not exist; this server serves '{self.name}'", "model")

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        vocab = self.scheduler.engine.vocab_size
        if vocab is not None and any(not 0 <= token < vocab for token in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return list(prompt)

    def chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the model '{self.name}' has no chat template; use /v1/completions", "messages")
        messages = [message.model_dump() for message in body.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def params(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
               prompt_len: int) -> GenerationParams:
        """The request's settings; without `max_tokens` it may fill the rest of the cache."""
        limit = max_tokens if max_tokens is not None else max(1, self.scheduler.max_seq_len - prompt_len)
        greedy = body.temperature == 0
        sampling = SamplingParams(do_sample=not greedy, temperature=1.0 if greedy else body.temperature,
                                  top_k=max(body.top_k, 0), top_p=body.top_p, seed=body.seed)
        try:
            self.scheduler.check(prompt_len, limit)
        except LmforgeError as exc:
            raise ApiError(400, str(exc), "max_tokens" if max_tokens is not None else "messages") from None
        return GenerationParams(limit, sampling, tuple(body.stop), logprobs)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def paging_reason(model: Any) -> str | None:
    """Why `model` cannot be served over a paged cache, or None when it can."""
    program, recipe = getattr(model, "program", None), getattr(model, "recipe", None)
    if program is None or recipe is None:
        return "the model has no program to check for paged attention"
    return paging_unsupported_reason(program.graph_module, program.meta["kv_cache"], recipe.codegen.backend)


def make_scheduler(model: Any, metrics: ServeMetrics, *, max_batch: int, max_tokens_per_step: int,
                   kv_blocks: int | None = None, prefix_caching: bool = True) -> SchedulerBase:
    """Continuous batching over a paged cache (with prefix caching unless turned off) when
    the program's attention can be paged; else one batch at a time, with the reason logged
    (never a paged run that would be wrong)."""
    options = dict(max_batch=max_batch, max_tokens_per_step=max_tokens_per_step, metrics=metrics)
    reason = paging_reason(model)
    if reason is None:
        return ContinuousScheduler(model.engine, model.tokenizer, kv_blocks=kv_blocks, prefix_caching=prefix_caching,
                                   **options)
    logger.warning("serving one batch at a time: %s", reason)
    return Scheduler(model.engine, model.tokenizer, reason=reason, **options)


def create_app(model: Any, name: str, *, max_batch: int = 8, max_tokens_per_step: int = 4096,
               kv_blocks: int | None = None, prefix_caching: bool = True) -> FastAPI:
    """The server for a loaded `CompiledModel` published as `name`; the scheduler's worker
    runs from startup to shutdown. `app.state.scheduling` says how requests are batched."""
    metrics = ServeMetrics()
    scheduler = make_scheduler(model, metrics, max_batch=max_batch, max_tokens_per_step=max_tokens_per_step,
                               kv_blocks=kv_blocks, prefix_caching=prefix_caching)
    served = _Served(model, name, scheduler)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.scheduling = scheduler.describe()

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: HttpRequest, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None, 500),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return JSONResponse(error_body(f"the request body is not valid JSON: {reason}".rstrip(": "),
                                           "invalid_request_error", None, 400), status_code=400)
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        text = f"{param}: {message}" if param else message
        return JSONResponse(error_body(text, "invalid_request_error", param, 400), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lmforge",
                                            "max_model_len": scheduler.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        served.check_model(body.model)
        prompt_ids = served.prompt_ids(body.prompt)
        params = served.params(body, body.max_tokens, body.logprobs, len(prompt_ids))
        shape = _CompletionShape(served, name)
        return await _respond(served, prompt_ids, params, shape, body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        served.check_model(body.model)
        prompt_ids = served.chat_ids(body)
        params = served.params(body, body.token_limit, body.logprob_count, len(prompt_ids))
        shape = _ChatShape(served, name)
        return await _respond(served, prompt_ids, params, shape, body, http)

    return app


async def _respond(served: _Served, prompt_ids: list[int], params: GenerationParams, shape: Any,
                   body: SamplingFields, http: HttpRequest):
    events = _Events(asyncio.get_running_loop())
    request = Request(prompt_ids, params, events)
    try:
        served.scheduler.submit(request)
    except LmforgeError as exc:
        raise ApiError(400, str(exc)) from None
    if body.stream:
        include_usage = body.stream_options is None or body.stream_options.include_usage
        return StreamingResponse(_stream(served, request, events, shape, include_usage), media_type="text/event-stream")
    collected = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.queue.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    served.scheduler.cancel(request)
                    return JSONResponse(error_body("client disconnected", "cancelled", None, 499), status_code=499)
                continue
            if event.finish_reason is None:
                collected.append(event)
                continue
            if event.error is not None:
                raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
            return shape.full(request, collected, event.finish_reason)
    finally:
        if not request.finished:
            served.scheduler.cancel(request)


async def _stream(served: _Served, request: Request, events: _Events, shape: Any,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: chunks, a final chunk with the finish reason,
    a usage chunk (empty `choices`), then `[DONE]`. Closing the stream cancels the request."""
    try:
        for chunk in shape.opening():
            yield _sse(chunk)
        tokens = 0
        while True:
            event = await events.queue.get()
            if event.error is not None:
                yield _sse(error_body(f"generation failed: {event.error}", "server_error", None, 500))
                break
            if event.finish_reason is None:
                tokens += 1
                yield _sse(shape.chunk([event], None))
                continue
            yield _sse(shape.chunk([], event.finish_reason))
            if include_usage:
                yield _sse(shape.usage_chunk(len(request.prompt_ids), tokens))
            break
        yield "data: [DONE]\n\n"
    finally:
        if not request.finished:
            served.scheduler.cancel(request)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _CompletionShape:
    """`/v1/completions` bodies: `text_completion` objects, logprobs as four parallel lists."""

    def __init__(self, served: _Served, model: str) -> None:
        self.served, self.model = served, model
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.offset = 0

    def _object(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        return {**body, "usage": usage} if usage is not None else body

    def _logprobs(self, events: list[TokenEvent], wanted: bool) -> dict | None:
        if not wanted:
            return None
        text = self.served.token_text
        offsets = []
        for event in events:
            offsets.append(self.offset)
            self.offset += len(event.text)
        return {"tokens": [text(e.token_id) for e in events], "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{text(t): lp for t, lp in e.top_logprobs} for e in events], "text_offset": offsets}

    def opening(self) -> list[dict]:
        return []

    def chunk(self, events: list[TokenEvent], finish: str | None) -> dict:
        wanted = bool(events) and events[0].logprob is not None
        choice = {"index": 0, "text": "".join(e.text for e in events), "logprobs": self._logprobs(events, wanted),
                  "finish_reason": finish}
        return self._object([choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._object([], _usage(prompt_tokens, completion_tokens))

    def full(self, request: Request, events: list[TokenEvent], finish: str) -> dict:
        wanted = request.params.logprobs is not None
        choice = {"index": 0, "text": request.emitted, "logprobs": self._logprobs(events, wanted),
                  "finish_reason": finish}
        return self._object([choice], _usage(len(request.prompt_ids), len(events)))


class _ChatShape:
    """`/v1/chat/completions` bodies: `chat.completion` (and `.chunk`) objects."""

    def __init__(self, served: _Served, model: str) -> None:
        self.served, self.model = served, model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _object(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return {**body, "usage": usage} if usage is not None else body

    def _logprobs(self, events: list[TokenEvent], wanted: bool) -> dict | None:
        if not wanted:
            return None
        text: Callable[[int], str] = self.served.token_text

        def entry(token: int, logprob: float) -> dict:
            return {"token": text(token), "logprob": logprob, "bytes": list(text(token).encode())}

        return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
                            for e in events]}

    def opening(self) -> list[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._object("chat.completion.chunk", [choice])]

    def chunk(self, events: list[TokenEvent], finish: str | None) -> dict:
        wanted = bool(events) and events[0].logprob is not None
        delta = {"content": "".join(e.text for e in events)} if events else {}
        choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(events, wanted), "finish_reason": finish}
        return self._object("chat.completion.chunk", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._object("chat.completion.chunk", [], _usage(prompt_tokens, completion_tokens))

    def full(self, request: Request, events: list[TokenEvent], finish: str) -> dict:
        wanted = request.params.logprobs is not None
        choice = {"index": 0, "message": {"role": "assistant", "content": request.emitted},
                  "logprobs": self._logprobs(events, wanted), "finish_reason": finish}
        return self._object("chat.completion", [choice], _usage(len(request.prompt_ids), len(events)))
