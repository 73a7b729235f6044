"""`--max-tokens-per-step 0` turns chunked prefill off: a long prompt arriving beside running
decodes is prefilled whole in one step (the serving benchmark's "without chunking" rows
depend on it), with the same tokens as chunked; `lmforge serve` hands the 0 to the scheduler
and refuses a negative budget."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CharTokenizer
from typer.testing import CliRunner

import lmforge
import lmforge.serve.app
from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.serve.continuous import ContinuousScheduler
from lmforge.serve.scheduler import GenerationParams, Request

LONG_PROMPT = 60


def _steps_with_a_long_prompt_joining(model, max_tokens_per_step: int) -> tuple[list[list[int]], list[list[int]]]:
    """Two short requests start decoding, then a long prompt joins; the tokens each step fed
    per request and every request's output."""
    scheduler = ContinuousScheduler(model.engine, CharTokenizer(), max_batch=4, block_size=4,
                                    max_tokens_per_step=max_tokens_per_step)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (length,), generator=generator).tolist() for length in (6, 9, LONG_PROMPT)]
    requests = [Request(prompt, GenerationParams(8), lambda event: None) for prompt in prompts]
    steps, forward = [], scheduler.forward
    scheduler.forward = lambda pieces: steps.append([p.count for p in pieces]) or forward(pieces)
    for request in requests[:2]:
        scheduler.submit(request)
    scheduler.step()
    scheduler.submit(requests[2])
    while scheduler.step():
        pass
    return steps, [r.output_ids for r in requests]


def test_zero_budget_prefills_a_long_prompt_whole_beside_decodes_with_the_same_tokens(models):
    model = models("llama")
    whole_steps, whole_tokens = _steps_with_a_long_prompt_joining(model, 0)
    chunked_steps, chunked_tokens = _steps_with_a_long_prompt_joining(model, 16)
    assert [1, 1, LONG_PROMPT] in whole_steps  # both decodes and the whole prompt in one forward
    assert max(sum(counts) for counts in chunked_steps) == 16 and LONG_PROMPT not in sum(chunked_steps, [])
    assert whole_tokens == chunked_tokens


def test_describe_says_prompts_are_not_chunked(models):
    scheduler = ContinuousScheduler(models("llama").engine, CharTokenizer(), max_tokens_per_step=0)
    assert "no chunking" in scheduler.describe() and "chunked prefill" not in scheduler.describe()


def test_a_negative_budget_is_refused(models):
    with pytest.raises(LmforgeError, match="max_tokens_per_step >= 0"):
        ContinuousScheduler(models("llama").engine, CharTokenizer(), max_tokens_per_step=-1)


@pytest.mark.parametrize("given", ["0", "256"])
def test_lmforge_serve_passes_the_budget_to_the_server(monkeypatch, tmp_path, given):
    received = {}
    monkeypatch.setattr(lmforge, "load", lambda path, device=None: type("Loaded", (), {"tokenizer": object()})())
    monkeypatch.setattr(lmforge.serve.app, "create_app",
                        lambda model, name, **options: received.update(options) or
                        type("Server", (), {"state": type("State", (), {"scheduling": "stand-in"})})())
    monkeypatch.setattr("uvicorn.run", lambda server, **options: None)
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--max-tokens-per-step", given])
    assert result.exit_code == 0, result.output
    assert received["max_tokens_per_step"] == int(given)


def test_lmforge_serve_refuses_a_negative_budget(tmp_path):
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--max-tokens-per-step", "-1"])
    assert result.exit_code != 0 and "max-tokens-per-step" in result.output
