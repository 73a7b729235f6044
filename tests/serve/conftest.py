"""Tiny compiled models shared by the tests that drive the continuous scheduler step by step."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

import lmforge


@pytest.fixture(scope="module")
def models():
    """Compiled tiny models by architecture, each compiled when a test first asks for it."""
    compiled = {}

    def get(kind: str):
        if kind not in compiled:
            compiled[kind] = lmforge.optimize(tiny_model(kind), "runtime: {max_seq_len: 96}\n")
        return compiled[kind]

    return get


@pytest.fixture(scope="module", params=["llama", "gemma2"])  # gemma2: sliding window 12 and soft-capping
def both(request, models):
    return models(request.param)


@pytest.fixture(scope="module")
def model(models):
    return models("llama")
