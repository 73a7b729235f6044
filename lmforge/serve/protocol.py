"""OpenAI wire types: the request bodies `lmforge serve` accepts and the errors it returns.

Requests mirror OpenAI's `/v1/completions` and `/v1/chat/completions` fields. Range checks
live here, so a bad value is a 400 before anything reaches the scheduler; fields OpenAI has
but lmforge does not implement are accepted only at their neutral value and otherwise
refused by name (never silently ignored). Unknown extra fields are ignored, as vLLM does.
Responses are plain dicts built in `app.py`: their shape is OpenAI's, and the `openai`
client is the test of it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.status)


def error_body(message: str, kind: str, param: str | None, code: int) -> dict:
    """The JSON OpenAI returns with a 4xx/5xx: `{"error": {message, type, param, code}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = True


class SamplingFields(BaseModel):
    """Fields both endpoints share. `temperature` 0 means greedy; `top_k` is an extension
    (0 or -1: off, as in vLLM); `seed` makes sampling repeatable."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        strings = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        if len(strings) > 4:
            raise ValueError("at most 4 stop strings")
        return strings

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported: lmforge serve returns one choice per request (n=1)")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: one prompt (text or token ids); `logprobs` = top-k per token."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported_completion_fields(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of={self.best_of} is not supported (n=1 only)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if not self.prompt:
            raise ValueError("prompt must not be empty")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`: messages rendered with the tokenizer's chat template;
    `logprobs` + `top_logprobs` as OpenAI's chat API has them."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_count(self) -> int | None:
        """How many alternatives to report per token (None: no logprobs at all)."""
        return (self.top_logprobs or 0) if self.logprobs else None
