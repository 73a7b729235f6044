"""Long-range copy task: does a sparse attention still reach back to the one span that matters?

Perplexity over long text is dominated by local predictions, so a pattern that drops the one
distant block a prediction needs barely moves it. The copy task makes that block matter: a
window of real text, then a repeat of a span from early in the window; after a cue of
`cue` tokens the model must continue the span, which a model trained on code does by copying
(induction heads) from hundreds of tokens back. Accuracy is the top-1 agreement of its
predictions with the span's true continuation; the control (the source span replaced by
other text) measures what local context alone gets right, so a model that does not copy at
all shows up as equal accuracies. `streaming_heads` also trains its head gates on these
sequences (DuoAttention's synthetic retrieval data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class CopyTask:
    """Sequences `(N, length)` whose last `answer` tokens copy tokens `source .. source +
    answer` of the same row (the `cue` tokens before them repeat the tokens before those)."""

    ids: torch.Tensor
    source: int
    cue: int
    answer: int
    control_ids: torch.Tensor

    def control(self) -> CopyTask:
        """The same sequences with the source span replaced by another row's text: accuracy
        on it is what local context alone predicts, the baseline copying must beat."""
        return CopyTask(self.control_ids, self.source, self.cue, self.answer, self.control_ids)

    @property
    def answer_positions(self) -> slice:
        length = self.ids.shape[1]
        return slice(length - self.answer, length)

    def accuracy(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], batch: int = 2) -> float:
        """Fraction of answer tokens the model predicts top-1 (teacher-forced)."""
        length = self.ids.shape[1]
        with torch.no_grad():
            predicted = torch.cat([logits_fn(chunk)[:, length - self.answer - 1 : length - 1].argmax(-1)
                                   for chunk in self.ids.split(batch)])
        return (predicted == self.ids[:, self.answer_positions]).float().mean().item()


def copy_report(task: CopyTask, reference: Callable[[torch.Tensor], torch.Tensor],
                optimized: Callable[[torch.Tensor], torch.Tensor], label: str) -> dict[str, float]:
    """Copy accuracy of the reference model, of the reference without the copied source (the
    local-context baseline) and of the optimized program under `label`."""
    return {"dense": task.accuracy(reference), "dense_without_source": task.control().accuracy(reference),
            label: task.accuracy(optimized)}


def build_copy_task(windows: torch.Tensor, cue: int = 32, answer: int = 32, source_fraction: float = 0.1) -> CopyTask:
    """Turn windows of real text `(N, length)` into copy-task sequences of the same length:
    the first `length - cue - answer` tokens of the window, then its span starting at
    `source_fraction` of the window (the cue, then the answer)."""
    count, length = windows.shape
    document = length - cue - answer
    start = int(document * source_fraction)
    if start + cue + answer > document:
        raise LmforgeError(f"copy task: windows of {length} tokens are too short for a {cue}+{answer}-token span")
    span = windows[:, start : start + cue + answer]
    ids = torch.cat([windows[:, :document], span], dim=1)
    control = ids.clone()
    control[:, start : start + cue + answer] = windows.roll(1, dims=0)[:, start : start + cue + answer]
    return CopyTask(ids, start + cue, cue, answer, control)
