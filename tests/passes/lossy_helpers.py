"""Shared set-up for the lossy-pass tests: a Program with calibration data around it."""

from __future__ import annotations

import torch

from lmforge.codegen.cpu import compile_aten
from lmforge.compiler.capture import capture
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.passes import PassContext
from lmforge.passes.calibrate import CalibrationConfig, CalibrationData, QualityBudget, decoded_logits, full_logits


def random_calibration(model, windows: int = 4, length: int = 32) -> CalibrationData:
    """Calibration and held-out splits of random tokens (enough to exercise the search)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2 * windows, length), generator=generator)
    return CalibrationData(ids[:windows], ids[windows:], model)


def text_calibration(ref_path, tokenizer, reference, samples: int = 8, seq_len: int = 128) -> CalibrationData:
    """Calibration on the reference checkpoint's held-out text, small enough for the suite."""
    config = CalibrationConfig(data=str(ref_path / "heldout.txt"), samples=samples, eval_samples=samples, seq_len=seq_len)
    return CalibrationData.from_config(config, tokenizer, reference)


def context(model, data: CalibrationData, **budget) -> PassContext:
    return PassContext(reference=model, calibration=data, quality_budget=QualityBudget(**budget) if budget else None)


def program_and_context(model, data: CalibrationData, **budget):
    return capture(model), context(model, data, **budget)


def assert_quantized_program_runs(program, ids: torch.Tensor) -> torch.Tensor:
    """A quantized program gives the same logits with and without the KV cache, and its
    lowered form (packed weights, the quantized CPU kernels) stays close to them: the kernels
    take bf16 activations, a few per cent of the largest logit of a random model, where a
    wrong code layout or zero point would be of the order of the logits themselves. Returns
    the cache-free logits."""
    expected = full_logits(program, ids)
    torch.testing.assert_close(decoded_logits(program, ids, 5), expected, rtol=1e-4, atol=1e-4)
    runner = compile_aten(program.graph_module, pack_weights=True)
    with attention_context(AttentionContext(kv=None, start=0, q_len=ids.shape[1])):
        lowered = runner(ids, torch.arange(ids.shape[1]).expand_as(ids))
    assert (lowered - expected).abs().max() <= 4e-2 * expected.abs().max()
    return expected
