"""The EAGLE drafter at run time: one decoder layer over the base model's hidden states.

At position t the drafter reads fc([h_t ; embedding(x_{t+1})]) — the base model's last hidden
state (the LM head's input) beside the embedding of the token that followed — runs one
decoder layer of the base model's shape (RMSNorm, grouped-query attention with rotary
positions, SwiGLU) and predicts the next hidden state h_{t+1}; its token is read through the
base model's frozen LM head, so the drafter has no vocabulary projection of its own. Drafting
k tokens is k steps of that layer, each fed its own previous output as the feature: the
drafter runs autoregressively over its own one-layer KV cache.

`EagleDrafter.extend` / `draft`: after every verify forward the accepted positions' (hidden
state, next token) pairs are written to the drafter's cache at the base model's slots and
positions; drafted entries (a chain, or a tree's nodes written by `write_tree`) live beyond
them and are overwritten by the next `extend`, which is how the cache rolls back to the
accepted path exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.codegen.cpu_kernels import packed_linear
from lmforge.errors import LmforgeError

TRAINED = ("fc_weight", "fc_bias", "input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down")
FROZEN = ("embedding", "lm_head")  # copies of the base model's, so the drafter is self-contained


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


def _rotary_table(length: int, head_dim: int, theta: float, dtype: torch.dtype,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_dim / 2) of every position, as `_rotate` computes them."""
    inverse = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inverse
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split layout) of x (..., d) by table rows cos, sin (..., d / 2)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


@dataclass(frozen=True)
class RuntimeKernels:
    """The drafter's projections as drafting runs them: q, k, v fused into one GEMM and gate,
    up into another (a draft step is a handful of rows, so each GEMM launched costs more than
    its arithmetic), and the LM head — the largest, read for every drafted token — packed
    for oneDNN as the target's are (`codegen.cpu_kernels.packed_linear`): on ref-llama-py's
    4096 x 256 head 78 us instead of 108 us for one row, 0.34-0.41 ms instead of 0.90 ms for
    16. The layer's own projections stay unpacked: packed, a one-row 256 x 256 GEMM took
    20 us instead of 7. Copies of the weights, rebuilt when the weights change (`current`)."""

    source: tuple[tuple[torch.Tensor, int], ...]
    fc: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]
    lm_head: Callable[[torch.Tensor], torch.Tensor]

    @staticmethod
    def _source(weights: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, int], ...]:
        """Which tensors, at which in-place version, the kernels were built from."""
        return tuple((tensor, tensor._version) for tensor in weights.values())

    @classmethod
    def current(cls, kernels: RuntimeKernels | None, weights: dict[str, torch.Tensor]) -> RuntimeKernels:
        """`kernels` if built from `weights` as they are now (the same tensors, not updated in
        place since), else fresh ones."""
        source = cls._source(weights)
        if kernels is not None and len(kernels.source) == len(source) and all(
                old is new and old_version == new_version
                for (old, old_version), (new, new_version) in zip(kernels.source, source)):
            return kernels
        w = {name: tensor.detach() for name, tensor in weights.items()}

        def plain(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda x: F.linear(x, weight, bias)

        return cls(source, plain(w["fc_weight"], w["fc_bias"]),
                   plain(torch.cat([w["q"], w["k"], w["v"]])), plain(w["o"]),
                   plain(torch.cat([w["gate"], w["up"]])), plain(w["down"]), packed_linear(w["lm_head"]))


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
    kernels: RuntimeKernels | None = field(default=None, repr=False)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    slot_ids: torch.Tensor | None = field(default=None, repr=False)
    past_padding: torch.Tensor | None = field(default=None, repr=False)

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

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """`logits` as drafting computes them, through the packed LM head (after `start`)."""
        return self.kernels.lm_head(features)

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
        """A fresh cache of `length` slots for a batch whose rows are left-padded by `pad` slots,
        with the rotary table and the padding mask its drafting steps index instead of
        recomputing them (a position never exceeds its slot, so `length` positions suffice)."""
        s, dtype = self.shape, self.weights["fc_weight"].dtype
        if self.keys is None or self.keys.shape[0] != batch or self.keys.shape[2] < length:
            self.keys = torch.zeros(batch, s.kv_heads, length, s.head_dim, dtype=dtype, device=device)
            self.values = torch.zeros_like(self.keys)
        slots = self.keys.shape[2]
        self.pad, self.committed = pad, None
        self.kernels = RuntimeKernels.current(self.kernels, self.weights)
        self.rotary = _rotary_table(slots, s.head_dim, s.rope_theta, dtype, device)
        self.slot_ids = torch.arange(slots, device=device)
        self.past_padding = None if pad is None else (self.slot_ids[None, :] >= pad[:, None])[:, None, None, :]

    def _mask(self, start: int, end: int, tree: tuple[int, torch.Tensor] | None) -> torch.Tensor | None:
        """Which cache slots (..end) queries written at start..end may see: the slots before
        them and themselves, never a row's left padding (a padding slot sees itself only).
        With `tree` = (base, visible), slots base..end hold draft-tree nodes and query i sees
        among them only where `visible[i, slot - base]` (itself and its ancestors). None when
        a single query sees every slot before it (a chain step without padding)."""
        if tree is None and end - start == 1:
            return None if self.past_padding is None else self.past_padding[..., :end]
        slots, queries = self.slot_ids[:end], self.slot_ids[start:end]
        allowed = slots[None, :] <= queries[:, None]
        if tree is not None:
            base, visible = tree
            allowed = torch.cat([allowed[:, :base], visible], dim=1)
        if self.pad is None:
            return allowed
        return allowed & self.past_padding[..., :end] | (slots[None, :] == queries[:, None])

    def _write(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, start: int,
               tree: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Run the layer on entries written at slots start.. and return their predicted
        features: fused projections (one qkv, one gate-up GEMM), one rotary pass over queries
        and keys together, grouped-query attention in one fused op."""
        s, w, kernels = self.shape, self.weights, self.kernels
        batch, length = tokens.shape
        end = start + length
        x = kernels.fc(torch.cat([features, F.embedding(tokens, w["embedding"])], dim=-1))
        qkv = kernels.qkv(F.rms_norm(x, (s.hidden,), w["input_norm"], s.eps))
        split = (s.heads + s.kv_heads) * s.head_dim
        cos, sin = self.rotary[0][positions][:, :, None], self.rotary[1][positions][:, :, None]
        rotated = _rotate_halves(qkv[..., :split].view(batch, length, s.heads + s.kv_heads, s.head_dim), cos, sin)
        self.keys[:, :, start:end] = rotated[:, :, s.heads :].transpose(1, 2)
        self.values[:, :, start:end] = qkv[..., split:].view(batch, length, s.kv_heads, s.head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(rotated[:, :, : s.heads].transpose(1, 2), self.keys[:, :, :end],
                                                  self.values[:, :, :end], attn_mask=self._mask(start, end, tree),
                                                  enable_gqa=True)
        x = x + kernels.o(attended.transpose(1, 2).reshape(batch, length, -1))
        gate, up = kernels.gate_up(F.rms_norm(x, (s.hidden,), w["post_norm"], s.eps)).chunk(2, dim=-1)
        return x + kernels.down(F.silu(gate) * up)

    def write_tree(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, start: int,
                   visible: torch.Tensor) -> torch.Tensor:
        """Draft-tree nodes (B, m) written at slots start..start+m beyond the committed ones,
        each seeing the committed slots and, of the tree slots written since the last commit,
        those `visible` (m, start + m - committed) marks: its ancestors and itself. Returns
        their predicted features; the next `extend` overwrites them (the rollback)."""
        return self._write(features, tokens, positions, start, (self.committed[1], visible))

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
        return self._chain(room, lambda logits: logits.argmax(-1))

    def sample_chain(self, room: int, distribution: Callable[[torch.Tensor], torch.Tensor],
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A chain of min(room, depth) tokens (B, k), each drawn from `distribution` of the
        drafter's logits (B, 1, V) -> probabilities, and those probabilities (B, k, V): the q
        that the rejection rule weighs the model's p against."""
        drawn = []

        def sample(logits: torch.Tensor) -> torch.Tensor:
            drawn.append(distribution(logits))
            return torch.multinomial(drawn[-1][:, 0], 1, generator=generator)

        return self._chain(room, sample), torch.cat(drawn, dim=1)

    def _chain(self, room: int, choose: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """min(room, depth) tokens, each `choose`n (B, 1) from the logits (B, 1, V) after the last."""
        feature, slot, position = self.committed
        tokens, length = [], min(room, self.depth)
        for index in range(length):
            tokens.append(choose(self.draft_logits(feature)))
            if index + 1 < length:
                feature = self._write(feature, tokens[-1], position, slot)
                slot, position = slot + 1, position + 1
        return torch.cat(tokens, dim=1)


def load_eagle(tensors: dict[str, torch.Tensor], shape: dict | None, depth: int) -> EagleDrafter:
    """A drafter from its stored tensors, its shape (`EagleShape.as_dict`) and its draft depth."""
    missing = sorted(set(TRAINED + FROZEN) - set(tensors))
    if missing or not isinstance(shape, dict) or set(shape) != set(EagleShape.__dataclass_fields__):
        raise LmforgeError(f"eagle drafter: the stored drafter lacks {', '.join(missing) or 'a valid shape'}; "
                           "retrain it")
    if not isinstance(depth, int) or depth < 1:
        raise LmforgeError(f"eagle drafter: its draft depth {depth!r} is not a positive integer; retrain it")
    return EagleDrafter(dict(tensors), EagleShape(**shape), depth)

