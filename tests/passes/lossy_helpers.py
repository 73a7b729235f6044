"""Shared set-up for the lossy-pass tests: a Program with calibration data around it."""

from __future__ import annotations

import torch

from lmforge.compiler.capture import capture
from lmforge.passes import PassContext
from lmforge.passes.calibrate import CalibrationConfig, CalibrationData, QualityBudget


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
