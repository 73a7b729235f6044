"""Training the EAGLE drafter and measuring it on held-out text.

Training (`train_eagle`) is self-distillation from the frozen base model: feature regression
(smooth L1 to the base's next hidden state) plus cross-entropy against the base's next-token
distribution, with EAGLE-3's training-time test — step k of the unrolled drafter is fed the
drafter's own step k-1 outputs and attends to the real entries before it plus its own chain,
exactly what the runtime's cache holds when it drafts token k+1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.eagle.drafter import EagleDrafter, EagleShape, TRAINED
from lmforge.errors import LmforgeError
from lmforge.training import ProgressFn, TrainingRun, train

STEP_DECAY = 0.8  # EAGLE-3 weighs training-time-test step k by 0.8**k
TOKEN_WEIGHT = 1.0  # cross-entropy beside the feature regression (weight 1)


def initial_eagle(model: Any, depth: int, seed: int = 0) -> EagleDrafter:
    """An untrained drafter for `model`: fc starts as [identity | small noise] so the
    feature passes through, attention and MLP outputs start at zero (as Medusa's blocks)."""
    output = model.get_output_embeddings()
    if getattr(output, "bias", None) is not None:
        raise LmforgeError("eagle drafter: the model's LM head has a bias; feature-level drafting needs a plain "
                           "projection")
    shape = EagleShape.of(model.config)
    generator = torch.Generator().manual_seed(seed)
    h, heads, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim

    def normal(rows: int, columns: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(rows, columns, generator=generator) * scale / columns ** 0.5

    weights = {
        "fc_weight": torch.cat([torch.eye(h), normal(h, h, 0.1)], dim=1), "fc_bias": torch.zeros(h),
        "input_norm": torch.ones(h), "q": normal(heads, h), "k": normal(kv, h), "v": normal(kv, h),
        "o": torch.zeros(h, heads), "post_norm": torch.ones(h), "gate": normal(shape.intermediate, h),
        "up": normal(shape.intermediate, h), "down": torch.zeros(h, shape.intermediate),
        "embedding": model.get_input_embeddings().weight.detach().float().clone(),
        "lm_head": output.weight.detach().float().clone(),
    }
    return EagleDrafter(weights, shape, depth)


def _base_features(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's input (last hidden state) and the base log-probabilities, frozen."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float().log_softmax(-1)


def eagle_loss(drafter: EagleDrafter, hidden: torch.Tensor, logprobs: torch.Tensor,
               tokens: torch.Tensor) -> torch.Tensor:
    """Unrolled over `depth` steps: step k at origin t predicts position t+k+1's feature and
    the base's distribution there; smooth-L1 feature loss + cross-entropy, step k weighted
    by STEP_DECAY**k."""
    losses = []
    for step, features in enumerate(drafter.unrolled(hidden, tokens, drafter.depth)):
        shift = step + 1
        if shift >= tokens.shape[1]:
            break
        predicted, target = features[:, :-shift], hidden[:, shift:]
        regression = F.smooth_l1_loss(predicted, target)
        cross_entropy = -(logprobs[:, shift:].exp() * drafter.logits(predicted).log_softmax(-1)).sum(-1).mean()
        losses.append(STEP_DECAY ** step * (regression + TOKEN_WEIGHT * cross_entropy))
    return torch.stack(losses).sum()


def train_eagle(
    model: Any,
    train_ids: torch.Tensor,
    *,
    depth: int = 4,
    steps: int = 300,
    lr: float = 2e-3,
    batch: int = 4,
    checkpoint: str | Path | None = None,
    progress: ProgressFn | None = None,
    seconds: float | None = None,
) -> tuple[EagleDrafter, TrainingRun]:
    """Train a drafter drafting `depth` tokens on windows `train_ids` (B, T) by self-distillation
    (the base model, the embedding and the LM head stay frozen); resumable from `checkpoint`,
    stopping early (checkpointed) once `seconds` of wall-clock time have passed."""
    drafter = initial_eagle(model, depth)
    params = {name: drafter.weights[name].requires_grad_(True) for name in TRAINED}

    def loss_fn(step: int) -> torch.Tensor:  # windows drawn from the step number, so a resumed run draws the same
        generator = torch.Generator().manual_seed(step)
        rows = train_ids[torch.randint(0, train_ids.shape[0], (batch,), generator=generator)]
        hidden, logprobs = _base_features(model, rows)
        return eagle_loss(drafter, hidden, logprobs, rows)

    run = train(params, loss_fn, steps=steps, lr=lr, checkpoint=checkpoint, progress=progress,
                description="training eagle drafter", seconds=seconds)
    for tensor in params.values():
        tensor.requires_grad_(False)
    return drafter, run


def greedy_continuations(model: Any, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompts (B, P) followed by the base model's own greedy `new_tokens` (no end-of-text stop)."""
    with torch.no_grad():
        out = model(prompts, use_cache=True)
        sequence = torch.cat([prompts, out.logits[:, -1:].argmax(-1)], dim=1)
        for _ in range(new_tokens - 1):
            out = model(sequence[:, -1:], past_key_values=out.past_key_values, use_cache=True)
            sequence = torch.cat([sequence, out.logits[:, -1:].argmax(-1)], dim=1)
    return sequence


def acceptance_per_depth(drafter: EagleDrafter, model: Any, sequences: torch.Tensor, prompt_len: int) -> dict:
    """Greedy acceptance on `sequences` (B, T) whose tokens after `prompt_len` are the base
    model's own greedy choices: at every origin t there, the drafter's chain as the runtime
    drafts it (its own features, its own tokens wherever they were accepted); depth d
    counts when depths < d were accepted. Returns the per-depth acceptance rates and the
    expected accepted drafts per verify forward (tokens per forward is one more)."""
    hidden, _ = _base_features(model, sequences)
    length, depth = sequences.shape[1], drafter.depth
    origins = slice(prompt_len - 1, length - depth - 1)
    with torch.no_grad():
        steps = drafter.unrolled(hidden, sequences, depth)
    reached = torch.ones_like(sequences[:, origins], dtype=torch.bool)
    rates, expected = [], 0.0
    for step, features in enumerate(steps):
        drafted = drafter.logits(features).argmax(-1)[:, origins]
        truth = sequences[:, prompt_len + step + 1 : length - depth + step + 1]
        matched = reached & (drafted == truth)
        rates.append(round(matched.sum().item() / max(reached.sum().item(), 1), 4))
        expected += matched.float().mean().item()
        reached = matched
    return {"acceptance_per_depth": rates, "accepted_per_forward": round(expected, 4),
            "tokens_per_forward": round(1 + expected, 4)}

