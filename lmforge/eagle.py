"""EAGLE-style feature-level drafter: one decoder layer over the base model's hidden states.

At position t the drafter reads fc([h_t ; embedding(x_{t+1})]) — the base model's last hidden
state (the LM head's input) beside the embedding of the token that followed — runs one
decoder layer of the base model's shape (RMSNorm, grouped-query attention with rotary
positions, SwiGLU) and predicts the next hidden state h_{t+1}; its token is read through the
base model's frozen LM head, so the drafter has no vocabulary projection of its own. Drafting
k tokens is k steps of that layer, each fed its own previous output as the feature: the
drafter runs autoregressively over its own one-layer KV cache.

Training (`train_eagle`) is self-distillation from the frozen base model: feature regression
(smooth L1 to the base's next hidden state) plus cross-entropy against the base's next-token
distribution, with EAGLE-3's training-time test — step k of the unrolled drafter is fed the
drafter's own step k-1 outputs and attends to the real entries before it plus its own chain,
exactly what the runtime's cache holds when it drafts token k+1.

Runtime (`EagleDrafter.extend` / `draft`): after every verify forward the accepted positions'
(hidden state, next token) pairs are written to the drafter's cache at the base model's slots
and positions; drafted entries live beyond them and are overwritten by the next `extend`, which
is how the cache rolls back to the accepted path exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.training import ProgressFn, TrainingRun, train

TRAINED = ("fc_weight", "fc_bias", "input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down")
FROZEN = ("embedding", "lm_head")  # copies of the base model's, so the drafter is self-contained
STEP_DECAY = 0.8  # EAGLE-3 weighs training-time-test step k by 0.8**k
TOKEN_WEIGHT = 1.0  # cross-entropy beside the feature regression (weight 1)


@dataclass(frozen=True)
class EagleShape:
    """The sizes of the drafter's decoder layer, taken from the base model's config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float
    eps: float

    @classmethod
    def of(cls, config: Any) -> EagleShape:
        hidden, heads = config.hidden_size, config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        return cls(hidden=hidden, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads,
                   intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                   rope_theta=float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0),
                   eps=float(getattr(config, "rms_norm_eps", None) or 1e-6))

    def as_dict(self) -> dict:
        return asdict(self)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split layout) of x (B, heads, T, d) at positions (B, T)."""
    dim = x.shape[-1]
    inverse = theta ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions[:, None, :, None].float() * inverse
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


@dataclass
class EagleDrafter:
    """The drafter's weights (`TRAINED` + `FROZEN` names), its shape, how many tokens it
    drafts per step (`depth`), and at run time its KV cache and the state after the last
    accepted position."""

    weights: dict[str, torch.Tensor]
    shape: EagleShape
    depth: int
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    pad: torch.Tensor | None = None
    committed: tuple[torch.Tensor, int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return self.depth

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def for_runtime(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> EagleDrafter:
        """This drafter on the program's device and in its dtype (it reads the program's hidden states)."""
        return EagleDrafter({name: tensor.to(device=device, dtype=dtype) for name, tensor in self.weights.items()},
                            self.shape, self.depth)

    def _inputs(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        """The residual stream fc([feature; embedding]) and rotated queries, keys, values (B, heads, T, d)."""
        w, s = self.weights, self.shape
        x = F.linear(torch.cat([features, F.embedding(tokens, w["embedding"])], dim=-1), w["fc_weight"], w["fc_bias"])
        normed = _rms(x, w["input_norm"], s.eps)
        batch, length, _ = x.shape
        q = F.linear(normed, w["q"]).view(batch, length, s.heads, s.head_dim).transpose(1, 2)
        k = F.linear(normed, w["k"]).view(batch, length, s.kv_heads, s.head_dim).transpose(1, 2)
        v = F.linear(normed, w["v"]).view(batch, length, s.kv_heads, s.head_dim).transpose(1, 2)
        return x, _rotate(q, positions, s.rope_theta), _rotate(k, positions, s.rope_theta), v

    def _output(self, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, residual add and the SwiGLU block: the predicted next features."""
        w = self.weights
        batch, _, length, _ = attended.shape
        x = residual + F.linear(attended.transpose(1, 2).reshape(batch, length, -1), w["o"])
        normed = _rms(x, w["post_norm"], self.shape.eps)
        return x + F.linear(F.silu(F.linear(normed, w["gate"])) * F.linear(normed, w["up"]), w["down"])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens' logits through the base model's LM head."""
        return F.linear(features, self.weights["lm_head"])

    def _grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(self.shape.heads // self.shape.kv_heads, dim=1)

    def unrolled(self, hidden: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over whole windows: hidden (B, T, H) base features of tokens
        (B, T). Step k's output at origin t is the drafter's feature for position t+k+1 after
        drafting k tokens from the real prefix ending at t (fed tokens[t+k+1], clamped at the
        end); it attends to the real entries at slots <= t and its own chain's steps 1..k."""
        batch, length, _ = hidden.shape
        origins = torch.arange(length, device=hidden.device)
        causal = origins[None, :] <= origins[:, None]
        scale = self.shape.head_dim ** -0.5
        features, outputs, chain_keys, chain_values = hidden, [], [], []
        for step in range(steps):
            fed = tokens[:, (origins + step + 1).clamp_max(length - 1)]
            residual, q, k, v = self._inputs(features, fed, (origins + step).expand(batch, length))
            k, v = self._grouped(k), self._grouped(v)
            if step == 0:
                real_keys, real_values = k, v
            else:
                chain_keys.append(k)
                chain_values.append(v)
            scores = [(q @ real_keys.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))]
            scores += [(q * key).sum(-1, keepdim=True) * scale for key in chain_keys]
            weights = torch.cat(scores, dim=-1).softmax(-1)
            attended = weights[..., :length] @ real_values
            for index, value in enumerate(chain_values):
                attended = attended + weights[..., length + index : length + index + 1] * value
            features = self._output(residual, attended)
            outputs.append(features)
        return outputs

    def start(self, batch: int, length: int, pad: torch.Tensor | None, device: torch.device | str) -> None:
        """A fresh cache of `length` slots for a batch whose rows are left-padded by `pad` slots."""
        s, dtype = self.shape, self.weights["fc_weight"].dtype
        if self.keys is None or self.keys.shape[0] != batch or self.keys.shape[2] < length:
            self.keys = torch.zeros(batch, s.kv_heads, length, s.head_dim, dtype=dtype, device=device)
            self.values = torch.zeros_like(self.keys)
        self.pad, self.committed = pad, None

    def _attend(self, q: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Queries written at slots start..end attend to the cache's slots before them and
        themselves, never to a row's left padding (a padding slot sees itself only)."""
        slots, queries = torch.arange(end, device=q.device), torch.arange(start, end, device=q.device)
        allowed = (slots[None, :] <= queries[:, None])[None]
        if self.pad is not None:
            allowed = allowed & (slots[None, None, :] >= self.pad[:, None, None]) | (slots[None, :] == queries[:, None])
        scores = q @ self._grouped(self.keys[:, :, :end]).transpose(-1, -2) * self.shape.head_dim ** -0.5
        weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        return weights @ self._grouped(self.values[:, :, :end])

    def _write(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Run the layer on entries written at slots start.. and return their predicted features."""
        residual, q, k, v = self._inputs(features, tokens, positions)
        end = start + tokens.shape[1]
        self.keys[:, :, start:end], self.values[:, :, start:end] = k, v
        return self._output(residual, self._attend(q, start, end))

    def extend(self, hidden: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
               start: int) -> torch.Tensor:
        """Commit accepted positions: base hidden states (B, n, H) at cache slots start..start+n
        and positions (B, n), each with the token that followed it (B, n). Must continue the
        last commit: slots written by drafts since then are overwritten (the rollback)."""
        expected = 0 if self.committed is None else self.committed[1]
        if start != expected:
            raise LmforgeError(f"eagle drafter: extend at slot {start}, but its cache holds {expected} accepted slots")
        features = self._write(hidden, next_tokens, positions, start)
        self.committed = (features[:, -1:], start + next_tokens.shape[1], positions[:, -1:] + 1)
        return features

    def draft(self, room: int) -> torch.Tensor:
        """Greedy chain of min(room, depth) tokens (B, k) after the committed positions."""
        feature, slot, position = self.committed
        tokens = []
        for index in range(min(room, self.depth)):
            token = self.logits(feature).argmax(-1)
            tokens.append(token)
            if index + 1 < min(room, self.depth):
                feature = self._write(feature, token, position, slot)
                slot, position = slot + 1, position + 1
        return torch.cat(tokens, dim=1)


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
) -> tuple[EagleDrafter, TrainingRun]:
    """Train a drafter drafting `depth` tokens on windows `train_ids` (B, T) by self-distillation
    (the base model, the embedding and the LM head stay frozen); resumable from `checkpoint`."""
    drafter = initial_eagle(model, depth)
    params = {name: drafter.weights[name].requires_grad_(True) for name in TRAINED}

    def loss_fn(step: int) -> torch.Tensor:  # windows drawn from the step number, so a resumed run draws the same
        generator = torch.Generator().manual_seed(step)
        rows = train_ids[torch.randint(0, train_ids.shape[0], (batch,), generator=generator)]
        hidden, logprobs = _base_features(model, rows)
        return eagle_loss(drafter, hidden, logprobs, rows)

    run = train(params, loss_fn, steps=steps, lr=lr, checkpoint=checkpoint, progress=progress,
                description="training eagle drafter")
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


def load_eagle(tensors: dict[str, torch.Tensor], shape: dict | None, depth: int) -> EagleDrafter:
    """A drafter from its stored tensors, its shape (`EagleShape.as_dict`) and its draft depth."""
    missing = sorted(set(TRAINED + FROZEN) - set(tensors))
    if missing or not isinstance(shape, dict) or set(shape) != set(EagleShape.__dataclass_fields__):
        raise LmforgeError(f"eagle drafter: the stored drafter lacks {', '.join(missing) or 'a valid shape'}; "
                           "retrain it")
    if not isinstance(depth, int) or depth < 1:
        raise LmforgeError(f"eagle drafter: its draft depth {depth!r} is not a positive integer; retrain it")
    return EagleDrafter(dict(tensors), EagleShape(**shape), depth)

