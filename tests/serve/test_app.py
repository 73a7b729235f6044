"""The HTTP layer in process, on a real Engine running a toy program that waits for the test:
a non-streamed request whose client goes away is cancelled while its tokens are pending."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from lmforge.runtime.engine import Engine
from lmforge.serve.app import create_app

VOCAB = 4096
LAYOUT = [{"cache": 0, "kv_heads": 1, "head_dim": 2}]


class GatedCounter:
    """Logits whose argmax is the input token + 1, computed only once `gate` is open."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return torch.nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 10


@pytest.fixture
def served(ref_path):
    program = GatedCounter()
    engine = Engine(program, LAYOUT, max_seq_len=64, vocab_size=VOCAB)
    app = create_app(SimpleNamespace(engine=engine, tokenizer=AutoTokenizer.from_pretrained(ref_path)), "toy")
    with TestClient(app) as http:
        yield app, http, program
        program.gate.set()


async def _post_then_disconnect(app, body: dict) -> list[dict]:
    """Call the ASGI app as a client that sends `body` and then hangs up."""
    incoming = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        return incoming.pop() if incoming else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("test", 1), "server": ("test", 80)}
    await app(scope, receive, send)
    return sent


def _cancelled(http: TestClient) -> int:
    lines = [line for line in http.get("/metrics").text.splitlines() if 'outcome="cancelled"' in line]
    return int(lines[0].split()[-1]) if lines else 0


def test_a_non_streamed_request_whose_client_left_is_cancelled(served):
    app, http, program = served
    sent = asyncio.run(_post_then_disconnect(app, {"model": "toy", "prompt": [5], "max_tokens": 40, "temperature": 0}))
    assert sent[0]["status"] == 499  # answered from the disconnect, while no token had been computed
    program.gate.set()
    for _ in range(600):
        if _cancelled(http) == 1:
            break
        threading.Event().wait(0.05)
    assert _cancelled(http) == 1
    reply = http.post("/v1/completions", json={"model": "toy", "prompt": [5], "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
