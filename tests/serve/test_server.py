"""`lmforge serve` end to end: the real `openai` client against a server in a subprocess.

One artifact of the reference checkpoint (cleanup only, a 256-token cache) is compiled per
module, the server started on a free port (continuous batching, 32 tokens per step, so
longer prompts are prefilled in chunks), and its answers compared with
`lmforge.load(...).generate` on the same artifact.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

import lmforge
from lmforge.serve.app import create_app

RECIPE = "passes:\n  - name: cleanup\nruntime:\n  max_seq_len: 256\n"
MODEL = "ref-art"
PROMPTS = ["Once upon a time", "The history of the city", "In mathematics, a group is", "She opened the door and"]
STARTUP_SECONDS = 300
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def artifact(ref_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / MODEL
    lmforge.optimize(ref_path, RECIPE).save(path)
    return path


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory, request):
    """The base URL of a running `lmforge serve`; the server is stopped after the module.
    The test process loads its own copy of the artifact while the server starts."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve-log") / "server.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(artifact), "--port", str(port),
                                "--max-batch", "4", "--max-tokens-per-step", "32"],
                               stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        request.getfixturevalue("local")
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"lmforge serve exited with {process.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lmforge serve did not answer /health"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def local(artifact):
    return lmforge.load(artifact)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _generated_text(model, prompt: str, max_new_tokens: int, **sampling) -> tuple[str, int]:
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=max_new_tokens, **sampling)[0, ids.shape[1]:].tolist()
    eos = set(model.engine.eos_token_ids)
    cut = next((i for i, token in enumerate(new) if token in eos), None)
    counted = len(new) if cut is None else cut + 1
    return model.tokenizer.decode(new[:cut], skip_special_tokens=True), counted


def _metrics(server: str) -> dict[str, float]:
    """Every sample of /metrics by its name and labels, checking each line's syntax."""
    samples = {}
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP \w+ .+|TYPE \w+ (counter|gauge|histogram))", line), line
            continue
        match = re.fullmatch(r'(\w+(?:\{\w+="[^"]*"\})?) (\S+)', line)
        assert match, line
        samples[match[1]] = float(match[2])
    return samples


def test_greedy_completion_equals_generate(client, local):
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    text, counted = _generated_text(local, PROMPTS[0], 24)
    assert reply.choices[0].text == text
    assert reply.usage.prompt_tokens == len(local.tokenizer(PROMPTS[0]).input_ids)
    assert reply.usage.completion_tokens == counted
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + counted


def test_seeded_sampling_equals_generate(client, local):
    settings = dict(temperature=0.8, top_k=20, seed=7)
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, extra_body={"top_k": 20},
                                      temperature=0.8, seed=7)
    text, _ = _generated_text(local, PROMPTS[1], 16, do_sample=True, **settings)
    assert reply.choices[0].text == text


def test_streamed_text_equals_non_streamed(client):
    options = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=32, temperature=0, stop=["\n\n"], logprobs=3)
    whole = client.completions.create(**options)
    chunks = list(client.completions.create(stream=True, **options))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed_logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs
                         for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed_logprobs == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert all(len(top) == 3 for top in whole.choices[0].logprobs.top_logprobs)


def test_chat_with_a_template_equals_generate(local, ref_path):
    """The same engine behind an in-process app whose tokenizer has a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(ref_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False, return_tensors="pt").input_ids
    new = local.generate(ids, max_new_tokens=12)[0, ids.shape[1]:].tolist()
    eos = set(local.engine.eos_token_ids)
    new = new[: next((i for i, token in enumerate(new) if token in eos), len(new))]
    app = create_app(SimpleNamespace(engine=local.engine, tokenizer=tokenizer), MODEL)
    with TestClient(app) as http:
        chat = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http).chat.completions
        options = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
        reply = chat.create(**options)
        chunks = list(chat.create(stream=True, **options))
    assert reply.choices[0].message.content == tokenizer.decode(new, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == ids.shape[1]
    top = [len(entry.top_logprobs) for entry in reply.choices[0].logprobs.content]
    assert top == [2] * reply.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_chat_without_template_is_400(client):
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b'{"model": "ref-art", "prompt": "x",', 400, "not valid JSON"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "word " * 300}, 400, "exceeds the model's context"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 256}, 400, "exceeds the model's context"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "top_k": -2}, 400, "top_k"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n=2 is not supported"),
        ({"model": MODEL, "prompt": [999999]}, 400, "token ids"),
        ({"model": MODEL}, 400, "prompt"),
    ],
)
def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(server, client, body, status, says):
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    reply = httpx.post(f"{server}/v1/completions", headers={"content-type": "application/json"}, **sent)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0).usage.completion_tokens == 1


def test_staggered_concurrent_requests_each_equal_generate_alone_and_a_cancelled_stream_frees_its_blocks(
        server, local):
    """Six requests of different lengths join one by one while a long stream runs; the
    stream is closed half-way. With a 32-token step budget the two long prompts are prefilled
    in chunks beside the others' decode tokens. Each answer equals `generate` alone, requests
    joined a running batch, and every block is free at the end."""
    prompts = [*PROMPTS, "The history of the city " * 20, "In mathematics, a group is a set " * 12]
    limits = [16, 9, 20, 12, 16, 6]
    alone = [_generated_text(local, prompt, limit)[0] for prompt, limit in zip(prompts, limits)]
    before = _metrics(server)
    async_client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

    async def one(prompt: str, limit: int, delay: float) -> str:
        await asyncio.sleep(delay)
        reply = await async_client.completions.create(model=MODEL, prompt=prompt, max_tokens=limit, temperature=0)
        return reply.choices[0].text

    async def scenario() -> list[str]:
        blocker = await async_client.completions.create(model=MODEL, prompt="A long story:", max_tokens=200,
                                                        temperature=0, stream=True)
        await anext(aiter(blocker))
        replies = [asyncio.ensure_future(one(p, n, 0.15 * i)) for i, (p, n) in enumerate(zip(prompts, limits))]
        await asyncio.sleep(0.3)
        await blocker.response.aclose()
        return list(await asyncio.gather(*replies))

    assert asyncio.run(scenario()) == alone
    after = _metrics(server)
    cancelled = 'lmforge_requests_total{outcome="cancelled"}'
    assert after[cancelled] - before.get(cancelled, 0) == 1
    joined = after["lmforge_batch_size_started_count"] - after['lmforge_batch_size_started_bucket{le="1"}']
    assert joined > before["lmforge_batch_size_started_count"] - before['lmforge_batch_size_started_bucket{le="1"}']
    assert after["lmforge_queue_length"] == 0 and after["lmforge_batch_size"] == 0
    assert after["lmforge_kv_blocks_used"] == 0 and after["lmforge_kv_blocks_total"] == 4 * 256 // 16


def test_metrics_report_requests_tokens_and_latencies(server, client):
    client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4, temperature=0)
    samples = _metrics(server)
    assert sum(v for k, v in samples.items() if k.startswith("lmforge_requests_total")) >= 1
    assert samples["lmforge_generation_tokens_total"] >= 4
    assert samples["lmforge_time_to_first_token_seconds_count"] >= 1
    assert samples["lmforge_inter_token_latency_seconds_count"] >= 3
    buckets = [v for k, v in samples.items() if k.startswith("lmforge_inter_token_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == samples["lmforge_inter_token_latency_seconds_count"]


def test_models_lists_the_artifact(client):
    assert [model.id for model in client.models.list()] == [MODEL]

