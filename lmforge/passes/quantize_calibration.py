"""What the `quantize` pass measures on calibration text: the inputs of linear layers (for
AWQ and GPTQ) and each layer's sensitivity to quantization (for mixed precision).

Statistics come from the unmodified program's forward on the calibration windows (not
layer by layer through already-quantized layers), one window batch at a time so that only
sums stay in memory: per input node, the mean |activation| per channel and XᵀX (GPTQ's
Hessian up to a factor, and the second moment AWQ's scale search measures output error with).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from lmforge.compiler.program import Program
from lmforge.passes.calibrate import CalibrationData, Quality, QualityBudget, node_values

@dataclass
class InputStatistics:
    """Running statistics of one linear input over the calibration windows."""

    abs_sum: torch.Tensor
    gram: torch.Tensor
    rows: int = 0

    @property
    def magnitude(self) -> torch.Tensor:
        """Mean |activation| per channel."""
        return self.abs_sum / max(self.rows, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """XᵀX / n."""
        return (self.gram / max(self.rows, 1)).float()

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2·XᵀX (per row, which leaves its relative dampening unchanged)."""
        return 2 * self.second_moment


def input_statistics(program: Program, data: CalibrationData, sources: list[fx.Node]) -> dict[str, InputStatistics]:
    """Statistics of the values `sources` compute on the calibration windows, by node name."""
    stats: dict[str, InputStatistics] = {}
    for chunk in data.ids("calibration").split(data.batch):
        for name, value in node_values(program, chunk, sources).items():
            rows = value.reshape(-1, value.shape[-1]).float()
            if name not in stats:
                width = rows.shape[1]
                stats[name] = InputStatistics(torch.zeros(width), torch.zeros(width, width, dtype=torch.float64))
            entry = stats[name]
            entry.abs_sum += rows.abs().sum(0)
            entry.gram += rows.double().T @ rows.double()
            entry.rows += rows.shape[0]
    return stats


@dataclass
class MixedPrecisionChoice:
    """Per unit (a layer index, "lm_head" or "embedding") the chosen format, with what was measured."""

    formats: dict[str, str]
    sensitivity: dict[str, dict[str, float]]
    calibration: Quality
    steps: list[str] = field(default_factory=list)


def choose_mixed_precision(
    units: list[str],
    levels: list[str],
    unit_bytes: Callable[[str, str], int],
    measure: Callable[[dict[str, str], str], Quality],
    budget: QualityBudget,
) -> MixedPrecisionChoice:
    """Greedy mixed precision: every unit starts at the cheapest level (`levels[0]`, the last
    level keeps the weights as they are). Sensitivity is the calibration perplexity change
    with only that unit at a level; while the whole program misses the budget on calibration
    text, the unit whose next level buys the most perplexity per extra byte moves up one
    level. Held-out text then confirms: GPTQ and AWQ fit the calibration windows, so quality
    there flatters the codes, and while held-out text misses the budget the same ranking
    moves further units up (each such step is noted)."""
    kept = levels[-1]
    sensitivity = {unit: {level: measure({unit: level}, "calibration").ppl_increase for level in levels[:-1]}
                   for unit in units}
    for unit in units:
        sensitivity[unit][kept] = 0.0
    formats = {unit: levels[0] for unit in units}

    def gain_per_byte(unit: str) -> float:
        here, there = formats[unit], levels[levels.index(formats[unit]) + 1]
        gain = sensitivity[unit][here] - sensitivity[unit][there]
        return gain / max(unit_bytes(unit, there) - unit_bytes(unit, here), 1)

    def step() -> str | None:
        movable = [unit for unit in units if formats[unit] != kept]
        if not movable:
            return None
        unit = max(movable, key=gain_per_byte)
        formats[unit] = levels[levels.index(formats[unit]) + 1]
        return unit

    steps = []
    quality = measure(formats, "calibration")
    while not quality.within(budget) and (unit := step()) is not None:
        quality = measure(formats, "calibration")
        steps.append(f"{unit} → {formats[unit]} (calibration {quality.describe()})")
    heldout = measure(formats, "heldout")
    while not heldout.within(budget) and (unit := step()) is not None:
        heldout = measure(formats, "heldout")
        steps.append(f"{unit} → {formats[unit]}: the budget held on calibration text but not on held-out text "
                     f"(held-out {heldout.describe()})")
    return MixedPrecisionChoice(formats, sensitivity, quality, steps)
