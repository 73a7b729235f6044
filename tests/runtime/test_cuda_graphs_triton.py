"""CUDA-graph capture of the `triton` backend's decode and verify steps, checked on the CPU
through Triton's interpreter with `StaticReplayCapturer` (see test_cuda_graphs.py): its
replay re-runs the step as recorded, with the Python values of the capture, so an attention
kernel that took the step's start or split count as a launch argument would attend at the
capture's position and change the tokens.

The model has a 32-token vocabulary so that a 32-token prompt holds every token: prompt
lookup then drafts on most steps (verify widths above 1) while the interpreter's prefill
stays short."""

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

import lmforge
from lmforge.runtime.cuda_graphs import StaticReplayCapturer, graphs_for

VOCAB = 32
RECIPE = ("passes: [{name: cleanup}, {name: fuse_projections}, {name: prompt_lookup, num_draft: 3}]\n"
          "codegen: {backend: triton}\nruntime: {max_seq_len: 600}")
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def triton_model():
    config = tiny_config("llama", num_layers=1)
    config.vocab_size = VOCAB
    torch.manual_seed(0)
    return lmforge.optimize(AutoModelForCausalLM.from_config(config).eval(), RECIPE)


def _generate(compiled, graphs, prompts, mask) -> torch.Tensor:
    default, compiled.engine.graphs = compiled.engine.graphs, graphs
    try:
        return compiled.generate(prompts, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    finally:
        compiled.engine.graphs = default


@pytest.mark.parametrize("batch", [1, 2])
def test_triton_greedy_tokens_with_graphs_equal_eager(triton_model, batch):
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.stack([torch.randperm(VOCAB, generator=generator) for _ in range(batch)])
    mask = torch.ones_like(prompts)
    mask[1:, :5] = 0  # left padding in the second row
    expected = _generate(triton_model, None, prompts, mask)
    graphs = graphs_for(triton_model.program, triton_model.engine.runner, "triton", "auto", torch.device("cpu"),
                        StaticReplayCapturer())
    assert torch.equal(_generate(triton_model, graphs, prompts, mask), expected)
    stats = triton_model.engine.speculation_stats
    assert stats["drafted"] > 0
    assert {key[0] for key in graphs.graphs} == {batch}
    assert 1 in {key[1] for key in graphs.graphs} and max(key[1] for key in graphs.graphs) > 1  # decode and verify
    assert graphs.replays == stats["forwards"] - 1  # every step after the prefill replayed
