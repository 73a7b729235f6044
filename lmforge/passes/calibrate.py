"""Calibration data and quality metrics shared by every lossy pass.

A lossy pass chooses what to change on the *calibration* split and is judged on the
*held-out* split, which calibration never sees: both are cut from the user's text
(recipe section `calibration`), as non-overlapping windows from opposite ends of the token
stream. Quality is always measured against the unmodified reference model: perplexity
change, top-1 agreement of next-token predictions and mean KL(reference ‖ program).
Nothing here downloads data; without a `calibration` section a lossy pass stops with an
error that says what to add.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from lmforge.compiler.kv_layout import allocate_kv_buffers
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.compiler.program import Program
from lmforge.compiler.speculation_rules import per_token_decisions
from lmforge.errors import LmforgeError
from lmforge.passes.base import Pass, PassContext

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs")
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
State = TypeVar("State")


class QualityBudget(BaseModel):
    """Limits a lossy pass must respect on held-out text; unset limits are not checked."""

    model_config = ConfigDict(extra="forbid")
    max_ppl_increase: float | None = Field(
        None, ge=0, description="largest allowed relative perplexity increase (0.03 = +3 %)"
    )
    min_top1: float | None = Field(
        None, ge=0, le=1, description="smallest allowed next-token top-1 agreement with the original model"
    )
    max_kl: float | None = Field(None, ge=0, description="largest allowed mean KL(original ‖ optimized), in nats")
    best_effort: bool = Field(
        False, description="when the budget cannot be met, keep the closest configuration instead of failing"
    )


class CalibrationConfig(BaseModel):
    """Recipe section `calibration`: where the text comes from and how much of it to use."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="a text file, or a directory whose text files are read in sorted order")
    samples: int = Field(16, ge=1, description="calibration windows (used to make decisions)")
    eval_samples: int = Field(16, ge=1, description="held-out windows (used to check the budget)")
    seq_len: int = Field(256, ge=8, description="tokens per window")


@dataclass(frozen=True)
class Quality:
    """Quality of a program relative to the original model on one split."""

    ppl_reference: float
    ppl: float
    ppl_increase: float
    top1: float
    kl: float

    def violations(self, budget: QualityBudget | None) -> list[str]:
        """Human-readable list of the limits this measurement breaks."""
        if budget is None:
            return []
        broken = []
        if budget.max_ppl_increase is not None and self.ppl_increase > budget.max_ppl_increase:
            broken.append(f"perplexity +{self.ppl_increase:.2%} > +{budget.max_ppl_increase:.2%}")
        if budget.min_top1 is not None and self.top1 < budget.min_top1:
            broken.append(f"top-1 agreement {self.top1:.4f} < {budget.min_top1:.4f}")
        if budget.max_kl is not None and self.kl > budget.max_kl:
            broken.append(f"KL {self.kl:.4f} > {budget.max_kl:.4f}")
        return broken

    def within(self, budget: QualityBudget | None) -> bool:
        return not self.violations(budget)

    def as_dict(self) -> dict[str, float]:
        return {key: round(value, 6) for key, value in asdict(self).items()}

    def describe(self) -> str:
        return f"perplexity {self.ppl_increase:+.2%}, top-1 {self.top1:.4f}, KL {self.kl:.4f}"


def _read_text(path: Path) -> list[str]:
    if path.is_file():
        return [path.read_text(errors="replace")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if files:
            return [p.read_text(errors="replace") for p in files]
        raise LmforgeError(f"calibration.data: {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    raise LmforgeError(
        f"calibration.data: no such file or directory: {path} (relative paths are read from the current directory)"
    )


def token_windows(data: str | Path, tokenizer: Any, seq_len: int) -> torch.Tensor:
    """All consecutive windows of `seq_len` tokens of a text file or directory (files
    joined by the end-of-sequence token), `(windows, seq_len)`."""
    if tokenizer is None:
        raise LmforgeError("reading text needs the model's tokenizer; use a checkpoint directory that has one")
    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in _read_text(Path(data)):
        stream.extend(tokenizer(text).input_ids + separator)
    windows = len(stream) // seq_len
    return torch.tensor(stream[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


def tokenize_windows(config: CalibrationConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and held-out windows of `seq_len` tokens from the configured text."""
    ids = token_windows(config.data, tokenizer, config.seq_len)
    windows = ids.shape[0]
    needed = config.samples + config.eval_samples
    if windows < needed:
        raise LmforgeError(
            f"calibration.data: {config.data} gives {windows} windows of {config.seq_len} tokens, "
            f"but samples + eval_samples = {needed}; give more text or lower those numbers"
        )
    return ids[: config.samples], ids[windows - config.eval_samples :]


def full_logits(program: Program, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits of `program` without a KV cache."""
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with attention_context(AttentionContext(kv=None, start=0, q_len=input_ids.shape[1])):
        return program(input_ids, positions)


def greedy_extend(next_logits: LogitsFn, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """`prompt` followed by `steps` greedy tokens, recomputing the full sequence each step
    (no cache): the yardstick the verify checks compare programs with."""
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, next_logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def decoded_logits(
    program: Program, input_ids: torch.Tensor, prompt_len: int, skip_counts: dict[int, int] | None = None
) -> torch.Tensor:
    """Logits of a teacher-forced decode: prefill `prompt_len` tokens, then feed the rest
    one token per step through a KV cache, as generation would. Decode-time decisions
    (dynamic skipping) only happen on this path, so they must be measured on it; they are
    counted into `skip_counts` when it is given."""
    batch, length = input_ids.shape
    buffers = allocate_kv_buffers(program.meta["kv_cache"], batch, length, getattr(torch, program.meta["dtype"]),
                                  input_ids.device)
    positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    outputs = []
    with attention_context(AttentionContext(kv=buffers, start=0, q_len=prompt_len)):
        outputs.append(program(input_ids[:, :prompt_len], positions[:, :prompt_len]))
    for step in range(prompt_len, length):
        context = AttentionContext(kv=buffers, start=step, q_len=1, generated=step - prompt_len, skip_counts=skip_counts)
        with attention_context(context):
            outputs.append(program(input_ids[:, step : step + 1], positions[:, step : step + 1]))
    return torch.cat(outputs, dim=1)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, graph_module: torch.fx.GraphModule, names: set[str]) -> None:
        super().__init__(graph_module)
        self.names, self.values = names, {}

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.names:
            self.values[node.name] = value.detach()
        return value


def node_values(program: Program, input_ids: torch.Tensor, nodes: list[torch.fx.Node]) -> dict[str, torch.Tensor]:
    """The tensors `nodes` compute in a cache-free forward of `input_ids`, by node name:
    how passes look at hidden states and keys without changing the graph."""
    recorder = _Recorder(program.graph_module, {node.name for node in nodes})
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    with torch.no_grad(), attention_context(AttentionContext(kv=None, start=0, q_len=input_ids.shape[1])):
        recorder.run(input_ids, positions)
    return recorder.values


class CalibrationData:
    """The two splits plus the reference model's log-probabilities on them (computed once)."""

    def __init__(self, calibration_ids: torch.Tensor, heldout_ids: torch.Tensor, reference: Any, batch: int = 4,
                 source: tuple[CalibrationConfig, Any] | None = None) -> None:
        self.splits = {"calibration": calibration_ids, "heldout": heldout_ids}
        self.reference, self.batch, self.source = reference, batch, source
        self._reference_logprobs: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: CalibrationConfig, tokenizer: Any, reference: Any) -> CalibrationData:
        calibration, heldout = tokenize_windows(config, tokenizer)
        device = next(reference.parameters()).device  # the windows feed the reference and the program there
        return cls(calibration.to(device), heldout.to(device), reference, source=(config, tokenizer))

    def at_length(self, seq_len: int, samples: int, eval_samples: int) -> CalibrationData:
        """The same text cut into windows of another length (long-context passes judge
        themselves beyond their window, which the recipe's short windows never reach)."""
        if self.source is None:
            raise LmforgeError("these calibration windows were given as token ids; long windows need the text and tokenizer")
        config, tokenizer = self.source
        config = config.model_copy(update={"seq_len": seq_len, "samples": samples, "eval_samples": eval_samples})
        return CalibrationData.from_config(config, tokenizer, self.reference)

    def ids(self, split: str) -> torch.Tensor:
        return self.splits[split]

    def reference_logprobs(self, split: str) -> torch.Tensor:
        if split not in self._reference_logprobs:
            with torch.no_grad():
                logits = torch.cat([self.reference(chunk).logits for chunk in self.ids(split).split(self.batch)])
            self._reference_logprobs[split] = logits.float().log_softmax(-1)
        return self._reference_logprobs[split]

    def quality(self, logits_fn: LogitsFn, split: str = "heldout", from_position: int = 0) -> Quality:
        """Measure `logits_fn` (token ids → logits) against the reference on `split`,
        scoring the predictions made at positions `from_position` onwards."""
        ids = self.ids(split)
        with torch.no_grad():
            logprobs = torch.cat([logits_fn(chunk) for chunk in ids.split(self.batch)]).float().log_softmax(-1)
        scored = slice(from_position, None)
        return compare(self.reference_logprobs(split)[:, scored], logprobs[:, scored], ids[:, scored])

    def program_quality(
        self,
        program: Program,
        split: str = "heldout",
        decode_from: int | None = None,
        skip_counts: dict[int, int] | None = None,
    ) -> Quality:
        """Quality of a Program from full-sequence logits or, for a program that makes
        decode-time decisions, from teacher-forced decoding after `decode_from` prompt
        tokens (default: half the window), scoring only the decoded positions."""
        if decode_from is None and makes_decode_time_decisions(program):
            decode_from = self.ids(split).shape[1] // 2
        if decode_from is None:
            return self.quality(lambda ids: full_logits(program, ids), split)
        return self.quality(lambda ids: decoded_logits(program, ids, decode_from, skip_counts), split, decode_from)


def makes_decode_time_decisions(program: Program) -> bool:
    """Whether the program decodes differently from its cache-free forward (dynamic
    ffn_skip, merged or evicting KV caches), so that its quality must be measured by decoding."""
    return bool(per_token_decisions(program.meta))


def compare(reference_logprobs: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor) -> Quality:
    """Perplexity of both on the next tokens of `ids`, top-1 agreement and mean KL."""
    targets = ids[:, 1:, None]
    nll_reference = -reference_logprobs[:, :-1].gather(-1, targets).mean().item()
    nll = -logprobs[:, :-1].gather(-1, targets).mean().item()
    top1 = (logprobs.argmax(-1) == reference_logprobs.argmax(-1)).float().mean().item()
    kl = F.kl_div(logprobs, reference_logprobs, log_target=True, reduction="none").sum(-1).mean().item()
    return Quality(
        ppl_reference=math.exp(nll_reference),
        ppl=math.exp(nll),
        ppl_increase=math.exp(nll - nll_reference) - 1.0,
        top1=top1,
        kl=max(kl, 0.0),
    )


class LossyPass(Pass):
    """A pass that trades quality for speed or memory: it needs calibration data and
    honours its own `quality_budget` option, else the recipe-wide one."""

    lossless = False

    def calibration_and_budget(self, ctx: PassContext) -> tuple[CalibrationData, QualityBudget | None]:
        return require_calibration(ctx, self.name), getattr(self.config, "quality_budget", None) or ctx.quality_budget


def require_calibration(ctx: Any, pass_name: str) -> CalibrationData:
    """The pass context's calibration data, or an error that says how to provide it."""
    if getattr(ctx, "calibration", None) is None:
        raise LmforgeError(
            f"{pass_name} is lossy and needs calibration text to choose and check its changes; add to the "
            "recipe:\n  calibration:\n    data: PATH_TO_TEXT   # a file or a directory of text files\n"
            "(nothing is downloaded; use text the model was not trained on)"
        )
    return ctx.calibration


def enforce_budget(pass_name: str, quality: Quality, budget: QualityBudget | None, what: str) -> list[str]:
    """Raise if `quality` (held-out) breaks `budget`, unless the budget is best-effort, in
    which case return a note saying by how much it was missed."""
    broken = quality.violations(budget)
    if not broken:
        return []
    message = f"{pass_name}: {what} misses the quality budget on held-out text: {'; '.join(broken)}"
    if budget is not None and budget.best_effort:
        return [message + " (best_effort: kept)"]
    raise LmforgeError(message + ". Loosen quality_budget, or set best_effort: true to keep the closest result")


@dataclass
class SearchResult(Generic[State]):
    """Outcome of `greedy_search`: the chosen state, how many steps were kept, every
    candidate measured (for the pass history) and notes for the user."""

    chosen: State
    steps: int
    trials: list[dict]
    notes: list[str]


def greedy_search(
    pass_name: str,
    start: State,
    neighbours: Callable[[State], list[State]],
    measure: Callable[[State, str], Quality],
    describe: Callable[[State], Any],
    budget: QualityBudget | None,
    report: Callable[[int], None] = lambda steps: None,
) -> SearchResult[State]:
    """Greedy search under a quality budget, shared by the lossy passes that choose what to
    change (layers to share KV, FFNs to drop).

    Each round measures every neighbour of the current state on the calibration split and
    moves to the cheapest (by perplexity increase) while it stays within the budget. The
    held-out split then confirms the result, stepping back while it does not. When not even
    one step fits, the error (or, with best_effort, the note) says what the cheapest step
    would have cost."""
    path, trials, notes = [start], [], []
    cheapest: tuple[State, Quality] | None = None
    while True:
        measured = []
        for candidate in neighbours(path[-1]):
            quality = measure(candidate, "calibration")
            trials.append({"candidate": describe(candidate), "calibration_quality": quality.as_dict()})
            measured.append((quality, candidate))
        if not measured:
            break
        quality, candidate = min(measured, key=lambda item: item[0].ppl_increase)
        if cheapest is None:
            cheapest = (candidate, quality)
        if not quality.within(budget):
            break
        path.append(candidate)
        report(len(path) - 1)
    while len(path) > 1 and not measure(path[-1], "heldout").within(budget):
        notes.append(f"{describe(path[-1])} met the budget on calibration text but not on held-out text; undone")
        path.pop()
    if len(path) > 1:
        return SearchResult(path[-1], len(path) - 1, trials, notes)
    if cheapest is None:
        return SearchResult(start, 0, trials, notes + ["no candidate to try"])
    if budget is not None and budget.best_effort:
        notes.append(f"nothing fits the budget; best_effort keeps the cheapest step, {describe(cheapest[0])}")
        return SearchResult(cheapest[0], 1, trials, notes)
    raise LmforgeError(
        f"{pass_name}: no change fits the quality budget; the cheapest, {describe(cheapest[0])}, costs "
        f"{cheapest[1].describe()} on calibration text. Loosen quality_budget, set best_effort: true, "
        "or choose explicitly in the recipe"
    )
