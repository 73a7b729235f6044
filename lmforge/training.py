"""A small resumable training loop for the parts of lmforge that learn parameters
(KV-sharing heal, draft heads, head gates).

It trains named tensors with Adam, reports progress through a callback, and every
`checkpoint_every` steps writes the parameters and the optimizer moments to one
safetensors file (step count in its metadata), atomically. Starting again with the same
checkpoint path resumes from the last saved step instead of starting over.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from lmforge.errors import LmforgeError

LossFn = Callable[[int], torch.Tensor]
ProgressFn = Callable[[str, int, int], None]


@dataclass
class TrainingRun:
    """What a run did: steps taken in this call, the step it resumed from, the losses."""

    resumed_from: int
    steps_run: int
    losses: list[float]


def _save(path: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Adam, step: int) -> None:
    tensors = {f"param.{name}": tensor.detach().contiguous() for name, tensor in params.items()}
    for name, tensor in params.items():
        state = optimizer.state.get(tensor)
        if state:
            tensors[f"exp_avg.{name}"] = state["exp_avg"].contiguous()
            tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].contiguous()
    temporary = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(tensors, str(temporary), metadata={"step": str(step)})
    os.replace(temporary, path)


def _resume(path: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Adam) -> int:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["step"])
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
    for name, tensor in params.items():
        stored = saved.get(f"param.{name}")
        if stored is None or stored.shape != tensor.shape:
            raise LmforgeError(f"checkpoint {path} does not match this run (parameter {name!r}); delete it to start over")
        with torch.no_grad():
            tensor.copy_(stored)
        if f"exp_avg.{name}" in saved:
            optimizer.state[tensor] = {
                "step": torch.tensor(float(step)),
                "exp_avg": saved[f"exp_avg.{name}"],
                "exp_avg_sq": saved[f"exp_avg_sq.{name}"],
            }
    return step


def train(
    params: dict[str, torch.Tensor],
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: ProgressFn | None = None,
    description: str = "training",
    seconds: float | None = None,
) -> TrainingRun:
    """Minimise `loss_fn(step)` over `params` (leaf tensors with requires_grad) for
    `steps` steps in total, resuming from `checkpoint` when it exists. With `seconds`, stop
    after the first step that ends past that wall-clock budget (checkpointed there, so the
    next call with the same checkpoint continues)."""
    deadline = time.monotonic() + seconds if seconds is not None else None
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    path = Path(checkpoint) if checkpoint is not None else None
    start = _resume(path, params, optimizer) if path is not None and path.is_file() else 0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    losses = []
    for step in range(start, steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(f"{description} (loss {losses[-1]:.4f})", step + 1, steps)
        out_of_time = deadline is not None and time.monotonic() > deadline
        if path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps or out_of_time):
            _save(path, params, optimizer, step + 1)
        if out_of_time:
            break
    return TrainingRun(resumed_from=start, steps_run=len(losses), losses=losses)
