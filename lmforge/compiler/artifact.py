"""Artifact directory: save and load a compiled Program without pickle.

Layout: `manifest.json` (versions, architecture, recipe, pass history, sha256 of every
file), `weights.safetensors`, `program.json` (the graph in torch.export's JSON schema, exported
with the weights lifted to inputs so they are stored once, in safetensors), `config.json`,
tokenizer files, `recipe.yaml`, `kernels/` (with the `triton` backend: each generated kernel's
source and, per `codegen.targets` entry, every kernel's PTX and cubin, whose resource report the
manifest's `kernels`, `library_kernels` and `kernel_report` hold: `codegen/triton_artifact.py`),
`attention_patterns.json` when sparse-attention passes made per-head decisions
(checked against the model on load), and `drafter.safetensors` for Hydra draft heads, which the
runtime runs beside the program. The directory is built in a locked staging directory and
swapped into place (atomic_dir), so a killed compile leaves the old artifact or none.

An artifact may come from a stranger, and its manifest hashes sit beside the files they vouch
for: they catch corruption, not malice. So loading checks the manifest's shape and every listed
file's hash before reading anything else, reads only listed files (by plain relative paths, no
symbolic links), and takes nothing executable from the artifact: safetensors for tensors, JSON
checked by program_file for the graph, Hugging Face config and tokenizer without remote code.
Kernel sources are code, and their hashes prove nothing against a crafted artifact: loading a
`triton` artifact re-emits the kernels from the program (codegen is deterministic) and refuses
it if a stored source differs; the runtime launches only kernels it generated itself. The PTX
and cubin are for reading (`cuobjdump`, `nvdisasm`, diffs between versions): lmforge never loads
them; on a GPU Triton compiles the regenerated source itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from torch import fx

from lmforge.compiler.architectures import spec_for
from lmforge.compiler.atomic_dir import replace_with, staged_directory
from lmforge.compiler.attention_patterns import FILENAME as PATTERNS_FILE
from lmforge.compiler.attention_patterns import load_patterns, patterns_document
from lmforge.compiler.layermap import build_layer_map
from lmforge.compiler.placement import graph_on
from lmforge.compiler.program import Program, plain_graph_module
from lmforge.compiler.program_file import parse_json, program_bytes, read_program
from lmforge.errors import LmforgeError
from lmforge.passes.base import ProgressFn

FORMAT_VERSION = 2  # 2: program.json replaced torch.export's pickle-bearing program.pt2
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.json"
CONFIG = "config.json"
RECIPE = "recipe.yaml"
KERNELS = "kernels"
DRAFTER = "drafter.safetensors"
REQUIRED_FILES = (WEIGHTS, PROGRAM, CONFIG, RECIPE)
MAX_MANIFEST_BYTES = 64 << 20  # lmforge writes kilobytes; the bound keeps a hostile one from exhausting memory
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lift_weights(graph_module: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of the graph whose weights are placeholders after the two token inputs."""
    graph, env, names, root = fx.Graph(), {}, [], torch.nn.Module()
    nodes = list(graph_module.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
    for node in nodes:
        if node.op == "get_attr" and isinstance(getattr(graph_module, node.target), torch.Tensor):
            env[node] = graph.placeholder(node.target)
            env[node].meta = dict(node.meta)
            names.append(node.target)
    for node in nodes:
        if node.op == "get_attr" and node not in env:  # a branch subgraph of torch.cond: it stays a module
            root.add_module(node.target, getattr(graph_module, node.target))
        if node.op != "placeholder" and node not in env:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    return fx.GraphModule(root, graph), names


def _export_graph(graph_module: fx.GraphModule) -> torch.export.ExportedProgram:
    lifted, names = _lift_weights(graph_module)
    weights = [getattr(graph_module, name) for name in names]
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=1 << 16)
    example = (torch.zeros(2, 8, dtype=torch.long), torch.arange(8).repeat(2, 1))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, *[None] * len(weights))
    exported = torch.export.export(lifted, (*example, *weights), dynamic_shapes=dynamic, strict=False)
    exported.example_inputs = None  # they hold the weights, already in safetensors
    return exported


def _attach_weights(exported: torch.export.ExportedProgram, weights: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Turn the weight placeholders of a loaded program back into module buffers.

    Works on the exported graph itself, not `exported.module()`, which would also compile
    pytree and guard code for calling conventions lmforge does not use."""
    module = exported.graph_module
    graph = module.graph
    for node in [n for n in graph.nodes if n.op == "placeholder"][2:]:
        if node.target not in weights:
            raise LmforgeError(f"artifact weights lack {node.target!r}, which {PROGRAM} needs")
        expected, weight = node.meta.get("val"), weights[node.target]
        same = isinstance(expected, torch.Tensor) and expected.shape == weight.shape and expected.dtype == weight.dtype
        if not same:
            raise LmforgeError(f"artifact weight {node.target!r} is {weight.dtype} {tuple(weight.shape)}, "
                               f"not what {PROGRAM} expects")
        module.register_buffer(node.target, weight)
        with graph.inserting_before(node):
            attr = graph.get_attr(node.target)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    return plain_graph_module(module, prefix="")


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _versions() -> dict[str, str]:
    import transformers

    from lmforge import __version__

    return {"lmforge": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _codegen_backend(recipe_yaml: str) -> Any:
    recipe = yaml.safe_load(recipe_yaml) or {}
    codegen = recipe.get("codegen") if isinstance(recipe, dict) else None
    return codegen.get("backend") if isinstance(codegen, dict) else None


def _as_loaded(staging: Path, program: Program, weights: dict[str, torch.Tensor]) -> Program:
    """The program as `load_artifact` will rebuild it from the staged graph and weights. The
    round trip through program.json renames nodes and weights, which generated kernels name,
    so the kernels stored (and compiled) are those a load of this artifact generates."""
    graph_module = _attach_weights(read_program(staging / PROGRAM), dict(weights))
    return Program(graph_module=graph_module,
                   layers=build_layer_map(graph_module, spec_for(program.config), program.meta["num_layers"]),
                   config=program.config, meta=program.meta, history=program.history)


def save_artifact(
    out_dir: str | Path,
    program: Program,
    *,
    recipe_yaml: str,
    generation: dict,
    tokenizer: Any = None,
    overwrite: bool = True,
    progress: ProgressFn | None = None,
) -> Path:
    """Write the artifact atomically: build it under a temporary name, then rename. With the
    `triton` backend this compiles every kernel for the recipe's `codegen.targets`, which takes
    a few seconds a kernel; `progress(description, done, total)` hears about it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LmforgeError(f"{out_dir} already exists")
    graph_module = graph_on(program.graph_module, torch.device("cpu"))  # artifacts name no device
    with staged_directory(out_dir) as staging:
        weights = {name: tensor.contiguous().clone() for name, tensor in graph_module.state_dict().items()}
        safetensors.torch.save_file(weights, staging / WEIGHTS)
        if program.drafter:
            safetensors.torch.save_file({k: v.cpu().contiguous() for k, v in program.drafter.items()}, staging / DRAFTER)
        (staging / PROGRAM).write_bytes(program_bytes(_export_graph(graph_module)))
        (staging / CONFIG).write_text(program.config.to_json_string())
        (staging / RECIPE).write_text(recipe_yaml)
        patterns = patterns_document(program.meta, program.config)
        if patterns is not None:
            _write_json(staging / PATTERNS_FILE, patterns)
        (staging / KERNELS).mkdir()
        codegen = None
        kernels, library_kernels = [], []
        if _codegen_backend(recipe_yaml) == "triton":
            from lmforge.codegen.triton_artifact import write_kernels  # a later stage, loaded only when used
            from lmforge.compiler.recipe import parse_recipe

            codegen = parse_recipe(recipe_yaml).codegen
            saved = _as_loaded(staging, program, weights)
            kernels, library_kernels = write_kernels(saved, codegen, staging, progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "architecture": program.meta["architecture"],
            "meta": program.meta,
            "history": program.history,
            "generation": generation,
            "kernels": kernels,
            "library_kernels": library_kernels,
            "weight_bytes": sum(t.nbytes for t in weights.values()),
            "files": {str(p.relative_to(staging)): sha256(p) for p in files},
        }
        _write_json(staging / MANIFEST, manifest)
        if codegen is not None:  # counting launches may load the staged artifact: after its manifest
            from lmforge.codegen.triton_artifact import kernel_report

            manifest["kernel_report"] = kernel_report(saved, codegen, staging)
            _write_json(staging / MANIFEST, manifest)
        replace_with(staging, out_dir)
    return out_dir


def _corrupted(path: Path, problem: str) -> LmforgeError:
    return LmforgeError(f"{path}: corrupted manifest ({problem}); recompile or restore the artifact")


def _check_manifest(manifest: Any, path: Path) -> None:
    """The fields loading relies on, with the types it relies on."""
    if not isinstance(manifest, dict):
        raise _corrupted(path, "not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LmforgeError(
            f"{path.parent}: artifact format {manifest.get('format_version')} is not the supported "
            f"format {FORMAT_VERSION}; recompile it with this lmforge"
        )
    for key, kind in (("files", dict), ("meta", dict), ("history", list), ("generation", dict), ("architecture", str)):
        if not isinstance(manifest.get(key), kind):
            raise _corrupted(path, f"{key!r} is not a JSON {'object' if kind is dict else kind.__name__}")
    for name, digest in manifest["files"].items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _corrupted(path, f"the sha256 of {name[:80]!r} is not 64 hex digits")
    if not isinstance(manifest["generation"].get("eos_token_ids"), list):
        raise _corrupted(path, "generation lacks eos_token_ids")
    meta = manifest["meta"]
    if not isinstance(meta.get("num_layers"), int) or not isinstance(meta.get("kv_cache"), list):
        raise _corrupted(path, "meta lacks num_layers or kv_cache")
    if not isinstance(getattr(torch, str(meta.get("dtype")), None), torch.dtype):
        raise _corrupted(path, f"meta's dtype {str(meta.get('dtype'))[:40]!r} is not a torch dtype")
    problem = _layout_problem(meta["kv_cache"], meta["num_layers"])
    if problem is not None:
        raise _corrupted(path, f"meta.kv_cache {problem}")
    if not isinstance(manifest.get("weight_bytes"), int) or manifest["weight_bytes"] < 0:
        raise _corrupted(path, "weight_bytes is not a byte count")
    unlisted = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if unlisted:
        raise LmforgeError(f"{path.parent}: artifact is incomplete: the manifest does not list {unlisted[0]}")


def _layout_problem(layout: list, num_layers: int) -> str | None:
    """What makes a KV cache layout unusable before any size is computed: slots are indices
    below twice the layer count (a layer's own slot, then its streaming ring), head counts and
    sizes are integers. How much memory the sizes add up to is the Engine's check
    (`runtime.kv_cache.check_cache_fits`), against the memory there is."""
    for index, entry in enumerate(layout):
        slots = [entry, entry.get("streaming")] if isinstance(entry, dict) and "streaming" in entry else [entry]
        for slot in slots:
            if not isinstance(slot, dict):
                return f"entry {index} is not a JSON object"
            for key, low, high in (("cache", 0, 2 * num_layers - 1), ("kv_heads", 0, None), ("head_dim", 1, None)):
                value = slot.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
                    bound = f"{low}..{high}" if high is not None else f">= {low}"
                    return f"entry {index}: {key} is {str(value)[:40]}, not an integer {bound}"
    return None


def _listed_file(artifact: Path, name: str) -> Path:
    """The regular file a manifest entry names: a plain relative path that stays inside the
    artifact, through no symbolic link."""
    parts = name.split("/")
    if "\\" in name or "\0" in name or any(part in ("", ".", "..") for part in parts):
        raise LmforgeError(f"{artifact}: manifest entry {name[:80]!r} is not a plain relative path inside the artifact")
    path = artifact
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise LmforgeError(f"{artifact}: artifact is incomplete: {name} is missing") from None
        if stat.S_ISLNK(mode):
            raise LmforgeError(f"{artifact}: {name} is a symbolic link; an artifact holds only regular files")
    if not stat.S_ISREG(mode):
        raise LmforgeError(f"{artifact}: {name} is not a regular file")
    return path


def read_manifest(artifact: str | Path) -> dict:
    """The manifest, after checking its shape, the format version and every listed file's sha256.

    Nothing else in the artifact is read before this passes, and files the manifest does not
    list are never read."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not path.is_file():
        raise LmforgeError(f"{artifact}: not an lmforge artifact (no {MANIFEST})")
    if path.is_symlink():
        raise LmforgeError(f"{path} is a symbolic link; an artifact holds only regular files")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise _corrupted(path, f"{size:,} bytes, more than the {MAX_MANIFEST_BYTES:,} a manifest may take")
    manifest = parse_json(path.read_bytes(), f"{path}: corrupted manifest")
    _check_manifest(manifest, path)
    for name, expected in manifest["files"].items():
        actual = sha256(_listed_file(artifact, name))
        if actual != expected:
            raise LmforgeError(
                f"{artifact}: {name} is corrupted (sha256 {actual[:12]}… does not match the "
                f"manifest's {expected[:12]}…); recompile or restore the artifact"
            )
    return manifest


def read_recipe_text(artifact: str | Path) -> str:
    """The artifact's recipe.yaml, which `lmforge.load` parses before the rest (it picks the
    device): a directory without a manifest is not an artifact, and the recipe must be a plain
    UTF-8 file inside it, like every file the manifest lists."""
    artifact = Path(artifact)
    if not (artifact / MANIFEST).is_file():
        raise LmforgeError(f"{artifact}: not an lmforge artifact (no {MANIFEST})")
    try:
        return _listed_file(artifact, RECIPE).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise LmforgeError(f"{artifact / RECIPE}: not UTF-8 text; recompile or restore the artifact") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except Exception as exc:  # SafetensorError and friends: a malformed header or truncated data
        raise LmforgeError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def _is_tokenizer_file(name: str) -> bool:
    return "/" not in name and name not in {MANIFEST, WEIGHTS, PROGRAM, RECIPE, DRAFTER, PATTERNS_FILE}


@contextmanager
def _hugging_face_view(artifact: Path, manifest: dict) -> Iterator[Path]:
    """A directory holding links to the listed config and tokenizer files and nothing else:
    the Hugging Face loaders pick files by name, so they must not see unlisted ones."""
    with tempfile.TemporaryDirectory(prefix="lmforge-artifact-") as view:
        for name in filter(_is_tokenizer_file, manifest["files"]):
            os.symlink((artifact / name).resolve(), Path(view) / name)
        yield Path(view)


def load_artifact(artifact: str | Path, device: torch.device | None = None) -> tuple[Program, dict]:
    """The Program stored in an artifact, and its manifest; on `device` when given (weights
    are read on the CPU, then the graph is moved: `compiler.placement.graph_on`)."""
    from transformers import AutoConfig

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    files = manifest["files"]
    with _hugging_face_view(artifact, manifest) as view:
        try:
            config = AutoConfig.from_pretrained(view, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise LmforgeError(f"{artifact / CONFIG}: not a config transformers can read without remote code "
                               f"({str(exc).splitlines()[0][:200]})") from None
    weights = _read_safetensors(artifact / WEIGHTS)
    stored = sum(tensor.nbytes for tensor in weights.values())
    graph_module = _attach_weights(read_program(artifact / PROGRAM), weights)  # names the tensor that differs
    if stored != manifest["weight_bytes"]:
        raise LmforgeError(f"{artifact / MANIFEST}: weight_bytes says {manifest['weight_bytes']:,}, {WEIGHTS} holds "
                           f"{stored:,} bytes of tensors; recompile or restore the artifact")
    if device is not None and device.type != "cpu":
        graph_module = graph_on(graph_module, device)
    meta = manifest["meta"]
    if PATTERNS_FILE in files:
        load_patterns(artifact, meta, config)
    program = Program(
        graph_module=graph_module,
        layers=build_layer_map(graph_module, spec_for(config), meta["num_layers"]),
        config=config,
        meta=meta,
        history=manifest["history"],
        drafter=_checked_drafter(artifact, meta, config) if DRAFTER in files else {},
    )
    _check_kernels(artifact, program, manifest)
    return program, manifest


HYDRA_TENSORS = ("block_weight", "block_bias", "output", "embedding")


def hydra_shapes(count: int, hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """The shape of each Hydra head tensor (`draft_heads.HydraHeads`) for `count` heads."""
    return {"block_weight": (count, hidden, 2 * hidden), "block_bias": (count, hidden),
            "output": (count, vocab, hidden), "embedding": (vocab, hidden)}


def hydra_problem(tensors: dict[str, torch.Tensor], hidden: int, vocab: int) -> str | None:
    """What is wrong with `tensors` as Hydra heads for a model of this hidden size and
    vocabulary (missing or extra names, non-float dtypes, shapes that disagree), or None. The
    runtime builds `HydraHeads(**tensors)`, so anything else would be a TypeError or a shape
    error in the first draft."""
    names = set(tensors)
    missing, extra = [n for n in HYDRA_TENSORS if n not in names], sorted(names - set(HYDRA_TENSORS))
    if missing or extra:
        return f"tensor {(missing or extra)[0]!r} is {'missing' if missing else 'not a Hydra head tensor'}"
    bad_dtype = next((n for n in HYDRA_TENSORS if not tensors[n].is_floating_point()), None)
    if bad_dtype is not None:
        return f"tensor {bad_dtype!r} is {tensors[bad_dtype].dtype}, not floating point"
    weight = tensors["block_weight"]
    count = weight.shape[0] if weight.dim() == 3 else 0
    for name, shape in hydra_shapes(count, hidden, vocab).items():
        if tuple(tensors[name].shape) != shape or count < 1:
            return f"tensor {name!r} has shape {tuple(tensors[name].shape)}, not {shape}"
    return None


def _checked_drafter(artifact: Path, meta: dict, config: Any) -> dict[str, torch.Tensor]:
    """The drafter's tensors, refused unless they make the Hydra heads the manifest says the
    program drafts with (an EAGLE drafter is checked by its own loader)."""
    tensors = _read_safetensors(artifact / DRAFTER)
    heads = meta.get("speculation", {}).get("draft_heads") if isinstance(meta.get("speculation"), dict) else None
    kind = heads.get("kind", "hydra") if isinstance(heads, dict) else "hydra"
    if kind == "eagle":
        return tensors
    if kind != "hydra":
        raise LmforgeError(f"{artifact / MANIFEST}: speculation.draft_heads.kind {str(kind)[:40]!r} runs no "
                           f"drafter, yet the manifest lists {DRAFTER}")
    problem = hydra_problem(tensors, config.hidden_size, config.vocab_size)
    if problem is None and isinstance(heads, dict) and heads.get("count") != tensors["block_weight"].shape[0]:
        problem = (f"it holds {tensors['block_weight'].shape[0]} heads, the manifest's "
                   f"speculation.draft_heads.count says {str(heads.get('count'))[:20]}")
    if problem is not None:
        raise LmforgeError(f"{artifact / DRAFTER}: not Hydra heads for this model: {problem}")
    return tensors


def _check_kernels(artifact: Path, program: Program, manifest: dict) -> None:
    """A `triton` artifact's stored kernel sources must be what lmforge generates from its
    program (`triton_artifact.check_stored_sources`); any other artifact lists none."""
    kernels = manifest.get("kernels", [])
    if _codegen_backend((artifact / RECIPE).read_text()) != "triton":
        if kernels:
            raise LmforgeError(f"{artifact}: the manifest lists kernels, but the recipe's backend does not run them")
        return
    from lmforge.codegen.triton_artifact import check_stored_sources

    def read_text(name: str) -> str:
        if name not in manifest["files"]:
            raise LmforgeError(f"{artifact}: artifact is incomplete: the manifest does not list {name}")
        return _listed_file(artifact, name).read_text()

    check_stored_sources(program, kernels, read_text, artifact)


def load_artifact_tokenizer(artifact: str | Path, manifest: dict) -> Any:
    """The artifact's tokenizer, or None if it was saved without one. Never with remote code:
    a tokenizer_config.json naming its own Python class is refused by transformers."""
    files = manifest["files"]
    if "tokenizer_config.json" not in files and "tokenizer.json" not in files:
        return None
    from transformers import AutoTokenizer

    with _hugging_face_view(Path(artifact), manifest) as view:
        try:
            return AutoTokenizer.from_pretrained(view, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as exc:
            raise LmforgeError(f"{artifact}: its tokenizer files do not load without remote code "
                               f"({str(exc).splitlines()[0][:200]})") from None
