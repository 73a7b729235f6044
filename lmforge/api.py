"""`optimize()` and `load()`: the Python entry points, and the model object they return."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.codegen import lower_for_engine
from lmforge.compiler.artifact import load_artifact, load_artifact_tokenizer, read_recipe_text, save_artifact
from lmforge.compiler.capture import capture, load_reference
from lmforge.compiler.pipeline import Instrument, PassCallback, run_pipeline
from lmforge.compiler.placement import graph_device, place_model, resolve_device, resolve_dtype, with_runtime
from lmforge.compiler.program import Program
from lmforge.compiler.recipe import Recipe, load_recipe, parse_recipe
from lmforge.draft_heads import runtime_drafter
from lmforge.errors import LmforgeError
from lmforge.passes import PassContext
from lmforge.passes.base import ProgressFn
from lmforge.passes.calibrate import CalibrationData
from lmforge.runtime.cuda_graphs import graphs_for
from lmforge.runtime.engine import Engine
from lmforge.runtime.sampling import SamplingParams
from lmforge.verification import LossySnapshot, verify_lowered

DEFAULT_CONTEXT_CAP = 4096

@dataclass
class CausalLMOutput:
    logits: torch.Tensor

def _generation_settings(model: nn.Module) -> dict:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {"eos_token_ids": eos_ids, "pad_token_id": getattr(config, "pad_token_id", None)}

def sample_ids(vocab_size: int) -> torch.Tensor:
    """A fixed token batch for numeric checks: deterministic, independent of the user's data."""
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

def load_tokenizer(source: Any) -> Any:
    if not isinstance(source, (str, Path)):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError):
        return None

class CompiledModel:
    """A compiled program with its runtime: call it for logits, `.generate()` for tokens."""

    def __init__(self, program: Program, recipe: Recipe, generation: dict, tokenizer: Any = None) -> None:
        self.program, self.recipe, self.generation, self.tokenizer = program, recipe, generation, tokenizer
        self.rewrite_log: list[dict] = []
        context = getattr(program.config, "max_position_embeddings", None) or DEFAULT_CONTEXT_CAP
        device, dtype = graph_device(program.graph_module), getattr(torch, program.meta["dtype"])
        runner = lower_for_engine(program, recipe.codegen)
        self.engine = Engine(
            runner,
            program.meta["kv_cache"],
            max_seq_len=recipe.runtime.max_seq_len or min(context, DEFAULT_CONTEXT_CAP),
            dtype=dtype,
            eos_token_ids=generation["eos_token_ids"],
            pad_token_id=generation["pad_token_id"],
            tokenizer=tokenizer,
            speculation=program.meta.get("speculation"),
            drafter=runtime_drafter(program.drafter, program.meta.get("speculation"), device, dtype),
            vocab_size=getattr(program.config, "vocab_size", None),
            device=device,
            graphs=graphs_for(program, runner, recipe.codegen.backend, recipe.runtime.cuda_graphs, device),
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits for every position (no KV cache), like a Hugging Face forward. Bad token
        ids or masks raise `LmforgeError`; calls from several threads run concurrently."""
        return CausalLMOutput(logits=self.engine.forward(input_ids, attention_mask))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        streamer: Any = None,
    ) -> torch.Tensor:
        """Prompt + new tokens, as Hugging Face `generate` returns them. Bad input raises one
        `LmforgeError` before anything runs (`max_new_tokens` must be >= 1, as in Hugging
        Face); calls from several threads on one model take turns (one KV cache)."""
        sampling = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return self.engine.generate(
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_id=eos_token_id,
            stop_strings=stop_strings,
            streamer=streamer,
        )

    def save(self, path: str | Path, progress: ProgressFn | None = None) -> Path:
        """Write the artifact; with the `triton` backend this compiles its kernels for the
        recipe's `codegen.targets` (`progress(description, done, total)` hears about it)."""
        return save_artifact(
            path, self.program, recipe_yaml=self.recipe.to_yaml(), generation=self.generation, tokenizer=self.tokenizer,
            progress=progress,
        )

def optimize(
    model_or_path: nn.Module | str | Path,
    recipe: Recipe | str | Path | None = None,
    *,
    tokenizer: Any = None,
    on_pass: PassCallback | None = None,
    progress: ProgressFn | None = None,
    instruments: Sequence[Instrument] = (),
    rewrite_limit: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> CompiledModel:
    """Capture a Hugging Face causal LM, run the recipe's passes, and lower it.

    `recipe` is a Recipe, a path to a YAML file, YAML text, or None for the default recipe.
    `tokenizer` defaults to the checkpoint's own; lossy passes need it to read the
    recipe's calibration text. `progress(description, done, total)` hears about long work
    inside a pass (calibration searches, fine-tuning). `instruments` observe every pass
    and `rewrite_limit` applies only the first N rewrites (both for `lmforge.debug`); the
    rewrites the passes asked for are logged in `compiled.rewrite_log`. When the recipe runs
    `verify`, the returned model's Engine is checked too, after codegen (`lmforge.verification`).
    `device` ("cpu", "cuda") and `dtype` ("float32", "bfloat16", "float16") override the
    recipe's `runtime`; the model is moved and cast to them before capture (a module in
    place), so passes, their checks and the runtime all work there.
    """
    recipe = with_runtime(load_recipe(recipe), device, dtype)
    passes = recipe.instantiate()
    reference = place_model(load_reference(model_or_path, recipe.runtime.dtype), recipe.runtime.device, recipe.runtime.dtype)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_or_path)
    program = capture(reference)
    if isinstance(model_or_path, (str, Path)):
        program.meta["source"] = str(Path(model_or_path).resolve())
    calibration = (
        CalibrationData.from_config(recipe.calibration, tokenizer, reference) if recipe.calibration is not None else None
    )
    ctx = PassContext(
        reference=reference,
        sample_ids=sample_ids(reference.config.vocab_size).to(graph_device(program.graph_module)),
        calibration=calibration,
        quality_budget=recipe.quality_budget,
        progress=progress,
        rewrite_limit=rewrite_limit,
    )
    snapshot = LossySnapshot()
    run_pipeline(program, passes, ctx, on_pass, [*instruments, snapshot])
    compiled = CompiledModel(program, recipe, _generation_settings(reference), tokenizer)
    compiled.rewrite_log = ctx.rewrite_log
    # after codegen: `verify` also checks the Engine the user gets (lmforge/verification.py)
    verify_lowered(compiled.engine, program, reference, recipe.codegen, snapshot, progress)
    return compiled

def load(path: str | Path, *, device: str | None = None, dtype: str | None = None) -> CompiledModel:
    """Load an artifact written by `CompiledModel.save` or `lmforge compile`, checking hashes.

    It runs on `device` (default: its recipe's `runtime.device`, else cpu): artifacts are
    device-independent. `dtype` may only confirm the dtype it was compiled in, which its
    graph's casts record (`compiler.placement`); another dtype needs a recompile."""
    recipe = parse_recipe(read_recipe_text(path), str(Path(path) / "recipe.yaml"))
    recipe = with_runtime(recipe, device, dtype)
    target = resolve_device(recipe.runtime.device or "cpu")
    program, manifest = load_artifact(path, target)
    compiled = program.meta["dtype"]
    if dtype is not None and str(resolve_dtype(dtype)).removeprefix("torch.") != compiled:
        raise LmforgeError(f"{path}: compiled in {compiled}, not {str(resolve_dtype(dtype)).removeprefix('torch.')}; "
                           f"the dtype is fixed at compile time: recompile with runtime.dtype")
    return CompiledModel(program, recipe, manifest["generation"], load_artifact_tokenizer(path, manifest))
