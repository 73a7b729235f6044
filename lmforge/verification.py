"""Verification of what runs: the lowered program through the Engine `optimize()` returns.

The `verify` pass checks the Program's FX graph before codegen; it never sees the code
generator's output, packed weights, the runtime's KV-cache decoding or its speculative
loop. This stage runs after lowering when the recipe contains `verify` (option `lowered`),
on the very Engine the user gets, with sample prompts at batch 1 and in a left-padded batch:

- codegen: prefill logits of the lowered program vs the program graph (same Engine, FX runner);
- lossless pipeline: prefill logits and greedy tokens vs the reference model's. Each row of
  the padded batch is compared with the reference model on that row alone, decoding with its
  own KV cache, so Hugging Face's handling of padding is not what is under test;
- lossy pipeline: greedy tokens vs those of the program right after the last lossy pass
  (later lossless passes and codegen must keep them); the quality budget stays in the pass;
- runtime: after lossy passes, cached decoding vs greedy decoding by cache-free forwards of
  the lowered program (unless the program decides per decoded token, where the two differ
  by design; after lossless passes the reference's tokens imply it), and, when the recipe
  drafts, speculative decoding vs plain decoding of the same Engine.

A program that cannot run in this process (the `triton` backend on a CPU without Triton's
interpreter) is not run: its record says so (`not_run`) and the checks run the same program
lowered by the `aten` backend instead, after the graph-level checks of the pass.

A failure is one LmforgeError naming the stage it blames; when greedy tokens differ the
program graph is decoded too, to tell a pass from codegen. The checks, batch shapes and
backend go into the `verify` history entry, which `lmforge info` and the debug report show.

The module lives beside `api.py`, not in `passes/` (passes never import the runtime) nor in
`debug/` (it runs on every compile whose recipe asks for it and stops a bad one, where the
debug tools only observe): it is the one place where graph, codegen and runtime meet.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.codegen import NotRunnableHere, lower
from lmforge.codegen.cpu_kernels import can_pack_weights
from lmforge.compiler.pipeline import Instrument
from lmforge.compiler.program import Program, draft_head_count
from lmforge.compiler.recipe import CodegenConfig
from lmforge.compiler.speculation_rules import per_token_decisions
from lmforge.errors import LmforgeError
from lmforge.passes import Pass, PassResult
from lmforge.passes.base import ProgressFn
from lmforge.passes.calibrate import full_logits
from lmforge.passes.verify import VerifyConfig, check_record, pass_stage, verification_status
from lmforge.runtime.engine import Engine

PROMPT_LENGTH = 24
SPECULATION_STEPS_FACTOR = 4  # drafts need the output to repeat the text: decode longer to see some


class LossySnapshot(Instrument):
    """Keeps the program as it was right after the last lossy pass: the program whose greedy
    tokens later lossless passes, codegen and speculation must keep."""

    def __init__(self) -> None:
        self.program: Program | None = None

    def after_pass(self, index: int, pass_: Pass, program: Program, result: PassResult) -> None:
        if not pass_.lossless:
            self.program = program.clone()


@dataclass(frozen=True)
class Prompts:
    """A batch of prompts: ids and mask as `generate` takes them, and each row unpadded."""

    name: str
    ids: torch.Tensor
    mask: torch.Tensor | None
    rows: tuple[torch.Tensor, ...]

    def describe(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.ids.shape))}"

    def alone(self) -> list[Prompts]:
        """Each row as a batch of one, unpadded."""
        return [Prompts("alone", row[None], None, (row,)) for row in self.rows]

    def real(self) -> torch.Tensor:
        """(batch, length) bool: the positions that hold prompt tokens, not padding."""
        return torch.ones_like(self.ids, dtype=torch.bool) if self.mask is None else self.mask.bool()


def sample_prompts(vocab_size: int, rows: int, length: int,
                   device: torch.device = torch.device("cpu")) -> tuple[Prompts, Prompts]:
    """A prompt alone (batch 1) and `rows` prompts of decreasing length, left-padded; the
    first row of the batch is the single prompt. Each prompt's last third repeats its start,
    so prompt lookup finds drafts from the first step. Drawn on the CPU (the same prompts on
    every device), then moved to `device`."""
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for row in range(rows):
        size = max(2, length * (rows - row) // rows)
        head = torch.randint(0, vocab_size, (size - size // 3,), generator=generator)
        prompts.append(torch.cat([head, head[: size // 3]]))
    ids = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :], mask[row, length - len(prompt) :] = prompt, 1
    prompts = [prompt.to(device) for prompt in prompts]
    ids, mask = ids.to(device), mask.to(device)
    return Prompts("batch 1", prompts[0][None], None, (prompts[0],)), Prompts("left-padded", ids, mask, tuple(prompts))


def without_drafts(speculation: dict | None) -> dict:
    """Speculation settings that keep the program's output layout (draft heads' outputs
    are still split off) but draft nothing: plain greedy decoding of the same program."""
    heads = (speculation or {}).get("draft_heads")
    return {"draft_heads": {**heads, "count": 0}} if heads else {}


def decode(engine: Engine, prompts: Prompts, steps: int) -> torch.Tensor:
    """The Engine's `steps` greedy new tokens (end-of-sequence ignored), (batch, steps)."""
    tokens = engine.generate(prompts.ids, prompts.mask, max_new_tokens=steps, eos_token_id=[])
    return tokens[:, prompts.ids.shape[1] :]


def decode_cache_free(engine: Engine, prompts: Prompts, steps: int) -> torch.Tensor:
    """Greedy new tokens from a cache-free forward of the whole sequence at every step."""
    ids = prompts.ids
    mask = torch.ones_like(ids) if prompts.mask is None else prompts.mask
    for _ in range(steps):
        ids = torch.cat([ids, engine.forward(ids, mask)[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, prompts.ids.shape[1] :]


@torch.no_grad()
def reference_run(reference: Any, row: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference model on one unpadded prompt: its logits (length, vocab) and its
    `steps` greedy new tokens, decoded with its own KV cache as Hugging Face `generate` does."""
    cache = "cache" if "cache" in inspect.signature(reference.forward).parameters else "past_key_values"  # transformers 5
    output = reference(row[None], use_cache=True)
    logits, tokens = output.logits[0], []
    while len(tokens) < steps:
        tokens.append(output.logits[:, -1].argmax(-1, keepdim=True))
        if len(tokens) < steps:
            output = reference(tokens[-1], use_cache=True, **{cache: getattr(output, cache)})
    return logits, torch.cat(tokens, dim=1)[0] if tokens else torch.empty(0, dtype=torch.long)


def first_difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    rows, steps = (got != expected).nonzero(as_tuple=True)
    row, step = int(rows[0]), int(steps[0])
    return f"row {row}, new token {step}: {int(got[row, step])} instead of {int(expected[row, step])}"


def codegen_stage(codegen: CodegenConfig) -> str:
    packed = codegen.backend == "aten" and codegen.pack_weights and can_pack_weights()
    return f"codegen {codegen.backend}" + (", packed weights" if packed else "")


class LoweredCheck:
    """The checks of one compile (see the module doc); `checks` lists what was compared.

    Expected greedy tokens come from each prompt decoded alone: by the reference model after
    lossless passes, by the program as the last lossy pass left it otherwise (in the same
    batch if that program decides per decoded token: dynamic `ffn_skip` skips only when every
    row of the batch may). A difference is blamed by decoding the final program graph
    through a draft-free Engine: alone (its passes), in the batch (codegen if that
    matches), else the runtime's left padding; after lossless passes a cache-free decode of
    the lowered program first tells the runtime's KV cache from the rest."""

    def __init__(self, engine: Engine, program: Program, reference: Any, codegen: CodegenConfig,
                 config: VerifyConfig, snapshot: Program | None) -> None:
        self.engine, self.program, self.reference, self.config = engine, program, reference, config
        self.codegen = codegen_stage(codegen)
        self.snapshot = snapshot
        self.lossless = snapshot is None
        later = program.history if snapshot is None else program.history[len(snapshot.history):]
        self.passes = pass_stage(later)
        self.per_token = per_token_decisions(program.meta)
        self.drafts = bool(engine.speculation.get("prompt_lookup")) or draft_head_count(engine.speculation) > 0
        self.plain = self._engine(engine.runner, program)
        self.graph = self._engine(program.graph_module, program)
        self.expected_engine = None if snapshot is None else self._engine(snapshot.graph_module, snapshot)
        self.checks: list[dict] = []
        self.decode_steps = SPECULATION_STEPS_FACTOR * config.greedy_tokens if self.drafts else config.greedy_tokens
        self.speculation: dict = {"drafted": 0, "accepted": 0, "batches without drafts": []}
        self._references: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _engine(self, runner: Any, program: Program) -> Engine:
        """A draft-free Engine like the user's (cache length, dtype, layout, vocabulary: a bad
        token id is one LmforgeError here too, not an IndexError inside the graph) over `runner`."""
        return Engine(runner, program.meta["kv_cache"], max_seq_len=self.engine.max_seq_len,
                      dtype=getattr(torch, program.meta["dtype"]), pad_token_id=self.engine.pad_token_id,
                      speculation=without_drafts(program.meta.get("speculation")),
                      vocab_size=getattr(program.config, "vocab_size", None))

    def check(self, stage: str, what: str, prompts: Prompts, ok: bool, detail: str) -> None:
        self.checks.append(check_record(what, stage, ok, detail, batch=prompts.describe()))
        if not ok and self.config.fail:
            raise LmforgeError(f"verify ({stage}): {what} ({prompts.describe()}): {detail}")

    def run(self, prompts: Prompts) -> None:
        with torch.no_grad():
            self._logits(prompts)
            if self.config.greedy_tokens > 0:
                self._tokens(prompts, self.config.greedy_tokens)

    def _reference(self, row: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's logits and greedy tokens for one row alone (kept by content)."""
        key = tuple(row.tolist())
        if key not in self._references:
            self._references[key] = reference_run(self.reference, row, steps)
        return self._references[key]

    def _logits(self, prompts: Prompts) -> None:
        lowered = self.engine.forward(prompts.ids, prompts.mask)
        graph = self.graph.forward(prompts.ids, prompts.mask)
        real, allowed = prompts.real(), self.config.max_logit_error
        codegen_error = (lowered - graph)[real].abs().max().item()
        self.check(self.codegen, "prefill logits of the lowered program vs the program graph", prompts,
                   codegen_error <= allowed, f"max difference {codegen_error:.3g} (allowed {allowed:g})")
        if not self.lossless:
            return
        expected = torch.cat([self._reference(row, self.config.greedy_tokens)[0] for row in prompts.rows])
        error = (lowered[real] - expected).abs().max().item()
        stage = self.codegen
        if error > allowed and codegen_error <= allowed:
            alone = torch.cat([full_logits(self.program, row[None])[0] for row in prompts.rows])
            stage = self.passes if (alone - expected).abs().max().item() > allowed else "runtime, left padding"
        self.check(stage, "prefill logits of the lowered program vs the reference model", prompts, error <= allowed,
                   f"max difference {error:.3g} (allowed {allowed:g})")

    def _expected_tokens(self, prompts: Prompts, steps: int) -> torch.Tensor:
        if self.lossless:
            return torch.stack([self._reference(row, steps)[1] for row in prompts.rows])
        if self.per_token:
            return decode(self.expected_engine, prompts, steps)
        return torch.cat([decode(self.expected_engine, alone, steps) for alone in prompts.alone()])

    def _blame(self, prompts: Prompts, expected: torch.Tensor, steps: int) -> str:
        """Which stage made the lowered program's tokens differ from `expected` (class doc)."""
        if self.lossless and torch.equal(decode_cache_free(self.engine, prompts, steps), expected):
            return "runtime, KV cache decoding"
        run = decode_cache_free if self.lossless else decode
        in_batch = torch.equal(run(self.graph, prompts, steps), expected)
        if self.per_token:
            return self.codegen if in_batch else self.passes
        if not torch.equal(torch.cat([run(self.graph, single, steps) for single in prompts.alone()]), expected):
            return self.passes
        return self.codegen if in_batch else "runtime, left padding"

    def _tokens(self, prompts: Prompts, steps: int) -> None:
        drafting = decode(self.plain, prompts, self.decode_steps) if self.drafts else None
        plain = decode(self.plain, prompts, steps) if drafting is None else drafting[:, :steps]  # greedy: a prefix
        expected = self._expected_tokens(prompts, steps)
        ok = bool(torch.equal(plain, expected))
        source = "the reference model" if self.lossless else f"the program after {self.snapshot.history[-1]['pass']}"
        how = "in the same batch" if self.per_token else "each prompt alone"
        self.check(f"{self.codegen} + runtime" if ok else self._blame(prompts, expected, steps),
                   f"greedy tokens of the lowered program vs {source} ({how})", prompts, ok,
                   "identical" if ok else first_difference(plain, expected))
        if not self.lossless and not self.per_token:  # after lossless passes the reference's tokens imply it
            cache_free = decode_cache_free(self.engine, prompts, steps)
            ok = bool(torch.equal(plain, cache_free))
            self.check("runtime, KV cache decoding", "greedy tokens of cached decoding vs cache-free forwards",
                       prompts, ok, "identical" if ok else first_difference(plain, cache_free))
        if drafting is not None:
            self._speculation(prompts, drafting)

    def _speculation(self, prompts: Prompts, plain: torch.Tensor) -> None:
        """The user's Engine, drafting, against the same Engine's runner without drafts.
        Whether drafts come depends on the text, so this decodes `decode_steps` tokens and
        counts a batch as checked only if something was drafted."""
        speculative = decode(self.engine, prompts, plain.shape[1])
        drafted, accepted = (self.engine.speculation_stats.get(key, 0) for key in ("drafted", "accepted"))
        self.speculation["drafted"] += drafted
        self.speculation["accepted"] += accepted
        ok = bool(torch.equal(speculative, plain))
        if drafted == 0 and ok:
            self.speculation["batches without drafts"].append(prompts.describe())
            return
        self.check("runtime, speculative decoding", f"{plain.shape[1]} greedy tokens with drafts vs without", prompts,
                   ok, f"identical ({drafted} drafted, {accepted} accepted)" if ok else first_difference(speculative, plain))

    def record(self, batches: list[Prompts]) -> dict:
        return {
            "codegen": self.codegen,
            "batches": [{"name": p.name, "shape": list(p.ids.shape), "prompt_lengths": [len(r) for r in p.rows]}
                        for p in batches],
            "greedy_tokens": self.config.greedy_tokens,
            "expected_tokens": "reference model" if self.lossless else f"program after {self.snapshot.history[-1]['pass']}",
            "cache_consistency": "implied: cached decoding gives the reference model's tokens" if self.lossless
                                 else "checked" if not self.per_token
                                 else f"not applicable: the program decides per decoded token ({', '.join(self.per_token)})",
            "speculation": {"sources": sorted(self.engine.speculation), **self.speculation} if self.drafts
                           else "not applicable: the recipe does not draft",
        }


def verify_lowered(engine: Engine, program: Program, reference: Any, codegen: CodegenConfig,
                   snapshot: LossySnapshot | None = None, progress: ProgressFn | None = None) -> None:
    """Run the lowered checks for the last `verify` entry of `program.history` (nothing
    when the recipe has none, or it was not run) and add them to that entry; raises the
    first failure unless the pass says `fail: false`."""
    entry = next((entry for entry in reversed(program.history) if entry["pass"] == "verify"), None)
    if entry is None:
        return
    config, measurements = VerifyConfig(**entry["config"]), entry["measurements"]
    checks = measurements.setdefault("checks", [])
    if not config.lowered:
        measurements["lowered"] = "not checked: lowered: false"
        measurements["status"] = verification_status(checks, "the graph-level checks do not apply and lowered: false")
        return
    start = time.perf_counter()
    not_run = engine.runner.reason if isinstance(engine.runner, NotRunnableHere) else None
    backend = codegen.backend
    if not_run is not None:  # e.g. triton on a CPU without the interpreter: check the aten lowering instead
        codegen = CodegenConfig(backend="aten")
        engine = copy.copy(engine)  # the user's Engine keeps its runner, which says why it cannot run
        engine.runner = lower(program, codegen)
    lowered = LoweredCheck(engine, program, reference, codegen, config, snapshot.program if snapshot else None)
    length = min(PROMPT_LENGTH, engine.max_seq_len - lowered.decode_steps)
    if length < 3:
        raise LmforgeError(f"verify: runtime.max_seq_len {engine.max_seq_len} leaves no room for a prompt and "
                           f"{lowered.decode_steps} new tokens; raise it or set lowered: false")
    batches = sample_prompts(program.config.vocab_size, config.padded_rows, length, engine.device)
    try:
        for done, prompts in enumerate(batches):
            if progress is not None:
                progress(f"verify: lowered program, {prompts.describe()}", done, len(batches))
            lowered.run(prompts)
        if progress is not None:
            progress("verify: lowered program", len(batches), len(batches))
    finally:
        checks.extend(lowered.checks)
        engine.cache, engine.draft_inputs, engine.speculation_stats = None, None, {}
    measurements["lowered"] = {**lowered.record(list(batches)), "seconds": round(time.perf_counter() - start, 4)}
    if not_run is not None:
        measurements["lowered"]["not_run"] = (f"the {backend} program was not run on this machine ({not_run}); "
                                              f"the lowered checks ran the same program through {lowered.codegen}")
        entry["notes"].append(measurements["lowered"]["not_run"])
    measurements["status"] = verification_status(checks, "nothing applies")
    passed = sum(check["ok"] for check in lowered.checks)
    entry["notes"].append(f"lowered program ({lowered.codegen}): {passed}/{len(lowered.checks)} checks passed at "
                          f"{' and '.join(p.describe() for p in batches)}")
