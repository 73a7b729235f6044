"""Medusa and Hydra draft heads: training against the frozen base model, and their files.

Medusa head i reads the base model's last hidden state at position t (the LM head's input) and
predicts token t+2+i: a residual SiLU block (zero-initialised, so an untrained head starts
as the base LM head shifted by i+1 tokens) followed by its own output projection
initialised from the LM head. Training is self-distillation: the loss is KL(base's
distribution for token t+2+i ‖ head i), computed with the base frozen, so the heads learn
what the model itself would say next — which is what speculative verification accepts.
Hydra heads (`HydraHeads`) also read the previous token of the chain, so each head's draft
conditions on the one before it; they are trained teacher-forced on the base model's own
greedy tokens with the same loss.

Files (HEADS_DIR): `heads.safetensors` (the weights) and `heads.json` (kind, count, sizes,
the base model's architecture and a fingerprint of its LM head so heads for another model
are refused, and the measured per-head agreement). No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F

from lmforge.codegen.cpu_kernels import packed_linear
from lmforge.eagle import EagleDrafter, load_eagle
from lmforge.errors import LmforgeError
from lmforge.training import ProgressFn, train

WEIGHTS, CONFIG = "heads.safetensors", "heads.json"


@dataclass
class MedusaHeads:
    """`count` heads over hidden size H and vocabulary V: `block_weight` (count*H, H) and
    `block_bias` (count*H) are the fused first layers, `output` (count, V, H) the output
    projections."""

    block_weight: torch.Tensor
    block_bias: torch.Tensor
    output: torch.Tensor

    @property
    def count(self) -> int:
        return self.output.shape[0]

    @classmethod
    def initial(cls, lm_head: torch.Tensor, count: int) -> MedusaHeads:
        vocab, hidden = lm_head.shape
        return cls(torch.zeros(count * hidden, hidden), torch.zeros(count * hidden),
                   lm_head.detach().float().clone().expand(count, vocab, hidden).contiguous())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"block_weight": self.block_weight, "block_bias": self.block_bias, "output": self.output}

    def teacher_forced(self, hidden: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
        """(B, T, count, V): every head at every position (Medusa heads ignore the tokens)."""
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states → (..., count, V) logits, one fused GEMM for the blocks."""
        size = hidden.shape[-1]
        blocks = F.linear(hidden, self.block_weight, self.block_bias).unflatten(-1, (self.count, size))
        states = hidden.unsqueeze(-2) + F.silu(blocks)
        return torch.einsum("...kh,kvh->...kv", states, self.output)


@dataclass
class HydraHeads:
    """`count` sequentially dependent heads (Hydra): head i reads the last hidden state h_t
    and the embedding e of the token before the one it predicts — for head 0 the base
    model's own next token, for head i the draft of head i-1 — and predicts the token after
    it: z = h + SiLU(W_i [h; e] + b_i), logits = U_i z. `block_weight` (count, H, 2H) and
    `block_bias` (count, H) start at zero, `output` (count, V, H) from the LM head;
    `embedding` (V, H) is the base model's input embedding (a frozen copy, so the drafter is
    self-contained). Being sequential, they draft at one position per step, after the base
    model chose its token, instead of at every position of every forward."""

    block_weight: torch.Tensor
    block_bias: torch.Tensor
    output: torch.Tensor
    embedding: torch.Tensor
    packed: list[tuple[Callable, Callable]] | None = None

    @property
    def count(self) -> int:
        return self.output.shape[0]

    def for_runtime(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> HydraHeads:
        """These heads on the program's device and in its dtype (they read its hidden states),
        each head's two products on packed weights (`cpu_kernels`, fp32 on the CPU only): the
        runtime drafts a chain after every verify forward has just streamed the model's
        weights through the cache, so the heads' 4 MB output projections come from DRAM."""
        placed = [t.to(device=device, dtype=dtype) for t in (self.block_weight, self.block_bias, self.output,
                                                             self.embedding)]
        block_weight, block_bias, output, _ = placed
        packed = [(packed_linear(block_weight[i], block_bias[i]), packed_linear(output[i])) for i in range(self.count)]
        return HydraHeads(*placed, packed)

    @classmethod
    def initial(cls, lm_head: torch.Tensor, embedding: torch.Tensor, count: int) -> HydraHeads:
        vocab, hidden = lm_head.shape
        return cls(torch.zeros(count, hidden, 2 * hidden), torch.zeros(count, hidden),
                   lm_head.detach().float().clone().expand(count, vocab, hidden).contiguous(),
                   embedding.detach().float().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"block_weight": self.block_weight, "block_bias": self.block_bias, "output": self.output,
                "embedding": self.embedding}

    def head_logits(self, index: int, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Head `index` on hidden states (..., H) and previous tokens (...) → (..., V)."""
        inputs = torch.cat([hidden, F.embedding(previous, self.embedding)], dim=-1)
        if self.packed is not None:
            block, output = self.packed[index]
            return output(hidden + F.silu(block(inputs)))
        state = hidden + F.silu(F.linear(inputs, self.block_weight[index], self.block_bias[index]))
        return F.linear(state, self.output[index])

    def teacher_forced(self, hidden: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
        """(B, T, count, V) with the base model's greedy tokens as the previous tokens: head i
        at position t reads greedy[t + i], which the chain would have drafted had every
        earlier head been right (positions past the end repeat the last token)."""
        length = hidden.shape[1]
        heads = []
        for index in range(self.count):
            previous = greedy[:, torch.arange(index, index + length).clamp_max(length - 1)]
            heads.append(self.head_logits(index, hidden, previous))
        return torch.stack(heads, dim=2)

    def children(self, hidden: torch.Tensor):
        """Tree children for `runtime.speculative.build_tree`: head d-1's top-k after each
        parent token (B, m), from the hidden states (B, H) of the last accepted positions."""
        def top(depth: int, parents: torch.Tensor, width: int) -> torch.Tensor:
            states = hidden[:, None].expand(-1, parents.shape[1], -1)
            return self.head_logits(depth - 1, states, parents).topk(width).indices
        return top

    def draft(self, hidden: torch.Tensor, first: torch.Tensor, length: int) -> torch.Tensor:
        """Greedy chain of `length` tokens after `first` (B,), from hidden states (B, H)."""
        tokens, previous = [], first
        for index in range(min(length, self.count)):
            previous = self.head_logits(index, hidden, previous).argmax(-1)
            tokens.append(previous)
        return torch.stack(tokens, dim=1)


def runtime_drafter(tensors: dict[str, torch.Tensor], speculation: dict | None, device: torch.device | str,
                    dtype: torch.dtype) -> HydraHeads | EagleDrafter | None:
    """The drafter a program's runtime runs — Hydra heads or the EAGLE drafter, as its
    `meta["speculation"]["draft_heads"]` says — from the weights the program carries."""
    if not tensors:
        return None
    heads = (speculation or {}).get("draft_heads") or {}
    if heads.get("kind") == "eagle":
        return load_eagle(tensors, heads.get("eagle"), heads["count"]).for_runtime(device, dtype)
    return HydraHeads(**tensors).for_runtime(device, dtype)


def lm_head_fingerprint(lm_head: torch.Tensor) -> str:
    return hashlib.sha256(lm_head.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _base_outputs(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's input (last hidden state) and the base log-probabilities."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float().log_softmax(-1)


def rank_hits(heads: MedusaHeads, model: Any, ids: torch.Tensor, ranks: int = 4, batch: int = 4) -> list[list[float]]:
    """Per head, how often the base model's own greedy choice for the token it predicts is
    the head's r-th best guess, for r < `ranks`: what a tree of width w would catch."""
    hits, total = torch.zeros(heads.count, ranks), torch.zeros(heads.count)
    for chunk in ids.split(batch):
        hidden, logprobs = _base_outputs(model, chunk)
        greedy = logprobs.argmax(-1)
        with torch.no_grad():
            guesses = heads.teacher_forced(hidden, greedy).topk(ranks, dim=-1).indices
        for i in range(heads.count):
            shift = i + 1
            hits[i] += (guesses[:, :-shift, i] == greedy[:, shift:, None]).float().sum((0, 1))
            total[i] += greedy[:, shift:].numel()
    return [[round(value, 4) for value in head] for head in (hits / total[:, None]).tolist()]


def agreement(heads: MedusaHeads, model: Any, ids: torch.Tensor, batch: int = 4) -> list[float]:
    """Per head, how often its top-1 equals the base model's own greedy choice for the
    token it predicts (what speculative verification would accept)."""
    return [head[0] for head in rank_hits(heads, model, ids, ranks=1, batch=batch)]


Heads = MedusaHeads | HydraHeads | EagleDrafter


def _kind(heads: Heads) -> str:
    return {HydraHeads: "hydra", MedusaHeads: "medusa", EagleDrafter: "eagle"}[type(heads)]


def initial_heads(model: Any, count: int, kind: str = "hydra") -> Heads:
    """Untrained heads of `kind` for `model` (what training starts from)."""
    lm_head = model.get_output_embeddings().weight
    if kind == "hydra":
        return HydraHeads.initial(lm_head, model.get_input_embeddings().weight, count)
    if kind != "medusa":
        raise LmforgeError(f"unknown draft head kind {kind!r}; choose medusa or hydra")
    return MedusaHeads.initial(lm_head, count)


def train_heads(
    model: Any,
    train_ids: torch.Tensor,
    *,
    count: int = 3,
    kind: str = "hydra",
    steps: int = 300,
    lr: float = 1e-3,
    batch: int = 8,
    checkpoint: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Heads, Any]:
    """Train `count` heads of `kind` on windows `train_ids` (the base model stays frozen;
    its embedding copy in Hydra heads is not trained)."""
    heads = initial_heads(model, count, kind)
    params = {name: tensor.requires_grad_(True) for name, tensor in heads.tensors().items() if name != "embedding"}
    generator = torch.Generator().manual_seed(0)

    def loss_fn(step: int) -> torch.Tensor:
        rows = torch.randint(0, train_ids.shape[0], (batch,), generator=generator)
        hidden, logprobs = _base_outputs(model, train_ids[rows])
        predicted = heads.teacher_forced(hidden, logprobs.argmax(-1)).log_softmax(-1)
        losses = []
        for i in range(count):
            shift = i + 1  # head i at position t predicts token t+2+i, which the base predicts at t+1+i
            losses.append(F.kl_div(predicted[:, :-shift, i], logprobs[:, shift:], log_target=True,
                                   reduction="none").sum(-1).mean())
        return torch.stack(losses).sum()

    run = train(params, loss_fn, steps=steps, lr=lr, checkpoint=checkpoint, progress=progress,
                description="training draft heads")
    for tensor in params.values():
        tensor.requires_grad_(False)
    return heads, run


def save_heads(directory: str | Path, heads: Heads, model: Any, measurements: dict) -> Path:
    """Write `heads.safetensors` and `heads.json` (each via a temporary file and a rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lm_head = model.get_output_embeddings().weight
    config = {
        "kind": _kind(heads), "heads": heads.count, "hidden_size": lm_head.shape[1], "vocab_size": lm_head.shape[0],
        "architecture": model.config.model_type, "lm_head_fingerprint": lm_head_fingerprint(lm_head), **measurements,
    }
    if isinstance(heads, EagleDrafter):
        config["eagle"] = heads.shape.as_dict()
    temporary = directory / (WEIGHTS + ".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in heads.tensors().items()}, str(temporary))
    os.replace(temporary, directory / WEIGHTS)
    temporary = directory / (CONFIG + ".tmp")
    temporary.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(temporary, directory / CONFIG)
    return directory


def _heads_problem(kind: Any, tensors: dict[str, torch.Tensor], lm_head: torch.Tensor) -> str | None:
    """What keeps `tensors` from being `kind` heads over this LM head (vocabulary V, hidden
    size H), or None; the dataclasses would raise TypeError or fail at the first draft."""
    from lmforge.compiler.artifact import hydra_problem

    vocab, hidden = lm_head.shape
    if kind == "hydra":
        return hydra_problem(tensors, hidden, vocab)
    if kind == "eagle":
        return None  # its own loader checks its shapes; any other kind loads as Medusa heads
    output = tensors.get("output")
    count = output.shape[0] if isinstance(output, torch.Tensor) and output.dim() == 3 else 0
    expected = {"block_weight": (count * hidden, hidden), "block_bias": (count * hidden,), "output": (count, vocab, hidden)}
    if set(tensors) != set(expected):
        return f"tensors {sorted(tensors)}, not {sorted(expected)}"
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape or count < 1 or not tensors[name].is_floating_point():
            return f"tensor {name!r} is {tensors[name].dtype} {tuple(tensors[name].shape)}, not float {shape}"
    return None


def load_heads(directory: str | Path, lm_head: torch.Tensor) -> tuple[Heads, dict]:
    """Heads trained for the model whose LM head is `lm_head`, or a clear refusal."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise LmforgeError(f"draft_heads: {directory} holds no {CONFIG} and {WEIGHTS}; train heads with "
                           "`lmforge train-heads CHECKPOINT -o DIR --data TEXT`")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise LmforgeError(f"draft_heads: {directory / CONFIG} is not a JSON object; retrain the heads")
    if config.get("lm_head_fingerprint") != lm_head_fingerprint(lm_head):
        raise LmforgeError(f"draft_heads: the heads in {directory} were trained for another model "
                           f"({config.get('architecture')}, vocabulary {config.get('vocab_size')}); retrain them for this one")
    try:
        tensors = safetensors.torch.load_file(str(directory / WEIGHTS))
    except Exception as exc:  # SafetensorError and friends: a malformed header or truncated data
        raise LmforgeError(f"draft_heads: {directory / WEIGHTS} is not a readable safetensors file "
                           f"({str(exc).splitlines()[0][:200]})") from None
    problem = _heads_problem(config.get("kind"), tensors, lm_head)
    if problem is not None:
        raise LmforgeError(f"draft_heads: {directory / WEIGHTS}: not {config.get('kind', 'medusa')} heads for this model: {problem}")
    if config.get("kind") == "eagle":
        return load_eagle(tensors, config.get("eagle"), config.get("heads")), config
    if config.get("kind") == "hydra":
        return HydraHeads(**tensors), config
    return MedusaHeads(**tensors), config
