"""Recipes: the YAML a user writes to pick passes, codegen and runtime options.

Every error names the file, the line, the field and the valid choices, because a recipe is
hand-written and the user should never have to read a pydantic traceback to fix a typo.
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.codegen.gpu_targets import TARGETS
from lmforge.errors import LmforgeError
from lmforge.passes import PASSES, Pass
from lmforge.passes.calibrate import CalibrationConfig, QualityBudget

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"


class CodegenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["aten", "fx", "inductor", "cpp", "triton"] = Field(
        "aten",
        description="aten: generated Python calling ATen directly (no compile wait); fx: the FX "
        "graph as is; inductor: torch.compile (fused elementwise kernels, ~40 s first call; slower than aten "
        "with packed weights here, benchmarks/decode.py); cpp: the whole step (attention and cache writes "
        "included) compiled by Inductor to C++ per shape bucket on first use, frozen oneDNN-packed weights "
        "(dense attention only); triton: Triton kernels from the fusion partitioner; "
        "on CPU only through TRITON_INTERPRET=1 (tests), on CUDA for speed",
    )
    pack_weights: bool = Field(
        True,
        description="aten backend: multiply linear layers with oneDNN-packed fp32 weights (multi-threaded, "
        "no per-call repacking; ~2x faster matrix products at batch 1 here); false: plain aten.linear",
    )
    cpp_products: Literal["template", "onednn"] = Field(
        "template",
        description="cpp backend, decode and verify buckets: template multiplies weights with Inductor's C++ GEMM "
        "template (a decode step with no library call; ~0.6x the step time of onednn here, but a first compile "
        "about 3x longer); onednn calls oneDNN with packed weights (faster first compile). Prefill buckets use "
        "oneDNN either way",
    )
    targets: list[str] = Field(
        default_factory=lambda: list(TARGETS),
        description="triton backend: NVIDIA targets every kernel is compiled for ahead of time when an artifact "
        "is written (PTX, cubin and a registers/spills/shared-memory report in kernels/; no GPU needed); "
        "[] writes the kernel sources only",
    )

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        unknown = [target for target in targets if target not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target {unknown[0]!r}; valid targets: {', '.join(TARGETS)}")
        return list(dict.fromkeys(targets))


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_seq_len: int | None = Field(
        None, ge=1, description="KV cache length per sequence; default: the model's context, at most 4096"
    )
    device: Literal["cpu", "cuda"] | None = Field(
        None,
        description="where weights, KV cache, masks, sampling and draft sources live; default: where the model "
        "is (cpu for a checkpoint path). cuda without a CUDA device is an error",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype the model is captured, compiled and run in (weights and KV cache); default: the "
        "model's own. Fixed at compile time: the graph records Hugging Face's casts in it",
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on CUDA, decode and verify steps replay CUDA graphs captured per batch bucket "
        "(1, 2, 4, 8, 16, 32) and verify width, where the program allows it (the engine's graph_report and "
        "lmforge info say where it does not and why); off: every step launches eagerly. No effect on a CPU",
    )

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads a bare `off` (and `on`) as a boolean; take it as the word the user wrote."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class Recipe(BaseModel):
    """A validated recipe: ordered pass entries plus codegen and runtime options."""

    model_config = ConfigDict(extra="forbid")
    passes: list[dict[str, Any]] = Field(default_factory=list)
    codegen: CodegenConfig = Field(default_factory=CodegenConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    calibration: CalibrationConfig | None = Field(None, description="text that lossy passes calibrate on")
    quality_budget: QualityBudget | None = Field(
        None, description="budget every lossy pass must keep, measured cumulatively against the original model"
    )

    def instantiate(self) -> list[Pass]:
        """One configured pass object per entry, in recipe order."""
        passes = []
        for entry in self.passes:
            options = {key: value for key, value in entry.items() if key != "name"}
            cls = PASSES[entry["name"]]
            passes.append(cls(cls.Config(**options)))
        return passes

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _bounded_repr() -> reprlib.Repr:
    shown = reprlib.Repr()  # keyword arguments need Python 3.12
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlong = 3, 60, 60, 60
    shown.maxlist = shown.maxtuple = shown.maxdict = shown.maxset = 6
    return shown


_SHOWN = _bounded_repr()


def _shown(value: Any) -> str:
    """A bounded one-line repr: an error quotes what it refuses, never a whole (or aliased,
    exponentially large) document."""
    text = _SHOWN.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _path_text(path: tuple) -> str:
    """`passes[2].tokens`; keys that are not plain words are quoted, so a key holding a
    newline cannot break the one-line error."""
    parts = [f"[{p}]" if isinstance(p, int) and not isinstance(p, bool)
             else str(p) if isinstance(p, str) and p.isprintable() and p.strip() == p and p else _shown(p)
             for p in path]
    return ".".join(parts).replace(".[", "[")


class _Located:
    """Maps a field path like ("passes", 2, "tokens") to a line of the YAML source."""

    def __init__(self, source: str, name: str) -> None:
        self.name = name
        self.root = yaml.compose(source)
        self._refuse_duplicate_keys()

    def _refuse_duplicate_keys(self) -> None:
        """PyYAML keeps the last of two equal keys silently, so a recipe could say one thing
        on the line the user reads and another on the line that counts. Walks each node once
        (aliases share nodes), without recursion (nesting depth is the document's)."""
        seen, stack = set(), [(self.root, ())]
        while stack:
            node, path = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack.extend((child, (*path, index)) for index, child in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first: dict[tuple, int] = {}
                for key, child in node.value:
                    if isinstance(key, yaml.ScalarNode):
                        line = key.start_mark.line + 1
                        if (key.tag, key.value) in first:
                            raise LmforgeError(f"{self.name}:{line}: {_path_text((*path, key.value))}: duplicate key "
                                               f"{_shown(key.value)} (first at line {first[key.tag, key.value]})")
                        first[key.tag, key.value] = line
                        stack.append((child, (*path, key.value)))

    def line(self, path: tuple) -> int:
        node, line = self.root, 1
        for key in path:
            if node is None:
                break
            line = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == key), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def error(self, path: tuple, message: str) -> LmforgeError:
        where = _path_text(path)
        return LmforgeError(f"{self.name}:{self.line(path)}: {where or 'recipe'}: {message}")


def _nested_fields(config_cls: type[BaseModel], loc: tuple) -> dict:
    """The fields of the option model at `loc` inside a pass config (e.g. `kv_cache` of
    `quantize`), so an unknown nested key is listed against its own valid keys."""
    fields = config_cls.model_fields
    for part in loc:
        annotation = fields[part].annotation if part in fields else None
        models = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            break
        fields = models[0].model_fields
    return fields


def _choices(valid) -> str:
    return ", ".join(sorted(valid))


def _hint(word: str, valid) -> str:
    close = difflib.get_close_matches(str(word), list(valid), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_pass_entry(entry: Any, index: int, located: _Located) -> None:
    path = ("passes", index)
    if not isinstance(entry, dict):
        raise located.error(path, f"each pass must be a mapping with a 'name', got {_shown(entry)}")
    if "name" not in entry:
        raise located.error(path, f"missing field 'name'; registered passes: {_choices(PASSES)}")
    name = entry["name"]
    if not isinstance(name, str) or name not in PASSES:
        raise located.error(
            (*path, "name"),
            f"unknown pass {_shown(name)}{_hint(name, PASSES)} Registered passes: {_choices(PASSES)}",
        )
    config_cls = PASSES[name].Config
    options = {key: value for key, value in entry.items() if key != "name"}
    valid = config_cls.model_fields
    for key in options:
        if not isinstance(key, str):
            raise located.error((*path, key), f"unknown option {_shown(key)} for pass {name!r} (option names are "
                                f"words) Valid options: {_choices(valid) or '(none)'}")
    try:
        config_cls(**options)
    except ValidationError as exc:
        error = exc.errors()[0]
        field_path = (*path, *error["loc"])
        if error["type"] == "extra_forbidden":
            bad, within = error["loc"][-1], ".".join(str(part) for part in error["loc"][:-1])
            valid = _nested_fields(config_cls, error["loc"][:-1])
            raise located.error(
                field_path,
                f"unknown option {_shown(bad)} {f'in {within} of' if within else 'for'} pass {name!r}"
                f"{_hint(bad, valid)} Valid options: {_choices(valid) or '(none)'}",
            ) from None
        raise located.error(field_path, f"{_one_line(error['msg'])} (got {_shown(error.get('input'))})") from None


_SECTIONS = {
    "codegen": CodegenConfig,
    "runtime": RuntimeConfig,
    "calibration": CalibrationConfig,
    "quality_budget": QualityBudget,
}


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML objects to, in one line (a ReaderError's own text spans two)."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"unacceptable character #x{ord(exc.character) if isinstance(exc.character, str) else exc.character:04x}"
    return _one_line(getattr(exc, "problem", None) or str(exc).splitlines()[0])


def parse_recipe(source: str, name: str = "<recipe>") -> Recipe:
    """Validate YAML text into a Recipe, or raise an LmforgeError pointing at the line."""
    try:
        data = yaml.safe_load(source)
        located = _Located(source, name)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise LmforgeError(f"{where}: invalid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise LmforgeError(f"{name}: invalid YAML: nested too deeply for a recipe") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{name}:1: a recipe is a mapping with keys passes, codegen, runtime")
    for key in data:
        if key not in Recipe.model_fields:
            raise located.error(
                (key,), f"unknown section{_hint(str(key), Recipe.model_fields)} Valid sections: "
                f"{_choices(Recipe.model_fields)}"
            )
    passes = data.get("passes") or []
    if not isinstance(passes, list):
        raise located.error(("passes",), "must be a list of pass entries")
    for index, entry in enumerate(passes):
        _check_pass_entry(entry, index, located)
    try:
        return Recipe(**data)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "extra_forbidden":
            valid = _SECTIONS[error["loc"][0]].model_fields
            message = f"unknown option{_hint(error['loc'][-1], valid)} Valid options: {_choices(valid)}"
        else:
            message = f"{_one_line(error['msg'])} (got {_shown(error.get('input'))})"
        raise located.error(tuple(error["loc"]), message) from None


def load_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    """A Recipe from a Recipe, a path to YAML, YAML text, or None for the default recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is None:
        recipe = DEFAULT_RECIPE
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yaml", ".yml"))):
        path = Path(recipe)
        if not path.is_file():
            raise LmforgeError(f"recipe file not found: {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LmforgeError(f"{path}: a recipe is UTF-8 text; byte {exc.start} is 0x{exc.object[exc.start]:02x}") from None
        return parse_recipe(text, str(path))
    return parse_recipe(recipe)
