"""Artifact directory: save and load a compiled Program without pickle.

Layout: `manifest.json` (versions, architecture, recipe, pass history, sha256 of every
file), `weights.safetensors`, `program.pt2` (the graph, exported with the weights lifted to
inputs so they are stored once, in safetensors), `config.json`, tokenizer files,
`recipe.yaml`, `kernels/` for generated kernel sources, `attention_patterns.json` when
sparse-attention passes made per-head decisions (checked against the model on load), and
`drafter.safetensors` for Hydra draft heads, which the runtime runs beside the program. The directory is written under a
temporary name and renamed into place; loading checks every hash first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from torch import fx

from lmforge.compiler.architectures import spec_for
from lmforge.compiler.attention_patterns import FILENAME as PATTERNS_FILE
from lmforge.compiler.attention_patterns import load_patterns, patterns_document
from lmforge.compiler.layermap import build_layer_map
from lmforge.compiler.program import Program, plain_graph_module
from lmforge.errors import LmforgeError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.pt2"
KERNELS = "kernels"
DRAFTER = "drafter.safetensors"


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
    """Turn the weight placeholders of a loaded program back into module buffers."""
    module = exported.module()
    graph = module.graph
    for node in [n for n in graph.nodes if n.op == "placeholder"][2:]:
        if node.target not in weights:
            raise LmforgeError(f"artifact weights lack {node.target!r}, which program.pt2 needs")
        module.register_buffer(node.target, weights[node.target])
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


def _kernel_sources(program: Program, recipe_yaml: str, directory: Path) -> list[dict]:
    """The generated Triton kernels' sources, written when the recipe runs them."""
    if (yaml.safe_load(recipe_yaml) or {}).get("codegen", {}).get("backend") != "triton":
        return []
    from lmforge.codegen.triton_backend import write_kernel_sources  # a later stage, loaded only when used

    return write_kernel_sources(program, directory)


def save_artifact(
    out_dir: str | Path,
    program: Program,
    *,
    recipe_yaml: str,
    generation: dict,
    tokenizer: Any = None,
    overwrite: bool = True,
) -> Path:
    """Write the artifact atomically: build it under a temporary name, then rename."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LmforgeError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights = {name: tensor.contiguous().clone() for name, tensor in program.state_dict().items()}
        safetensors.torch.save_file(weights, staging / WEIGHTS)
        if program.drafter:
            safetensors.torch.save_file({k: v.contiguous() for k, v in program.drafter.items()}, staging / DRAFTER)
        torch.export.save(_export_graph(program.graph_module), staging / PROGRAM)
        (staging / "config.json").write_text(program.config.to_json_string())
        (staging / "recipe.yaml").write_text(recipe_yaml)
        patterns = patterns_document(program.meta, program.config)
        if patterns is not None:
            _write_json(staging / PATTERNS_FILE, patterns)
        (staging / KERNELS).mkdir()
        kernels = _kernel_sources(program, recipe_yaml, staging / KERNELS)
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
            "weight_bytes": sum(t.nbytes for t in weights.values()),
            "files": {str(p.relative_to(staging)): sha256(p) for p in files},
        }
        _write_json(staging / MANIFEST, manifest)
        if out_dir.exists():
            retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(retired)
            staging.rename(out_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_manifest(artifact: str | Path) -> dict:
    """The manifest, after checking the format version and every file's sha256."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not path.is_file():
        raise LmforgeError(f"{artifact}: not an lmforge artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{path}: corrupted manifest ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LmforgeError(
            f"{artifact}: artifact format {manifest.get('format_version')} is not the supported "
            f"format {FORMAT_VERSION}; recompile it with this lmforge"
        )
    for name, expected in manifest["files"].items():
        file = artifact / name
        if not file.is_file():
            raise LmforgeError(f"{artifact}: artifact is incomplete: {name} is missing")
        actual = sha256(file)
        if actual != expected:
            raise LmforgeError(
                f"{artifact}: {name} is corrupted (sha256 {actual[:12]}… does not match the "
                f"manifest's {expected[:12]}…); recompile or restore the artifact"
            )
    return manifest


def load_artifact(artifact: str | Path) -> tuple[Program, dict]:
    """The Program stored in an artifact, and its manifest."""
    from transformers import AutoConfig

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    config = AutoConfig.from_pretrained(artifact)
    weights = safetensors.torch.load_file(artifact / WEIGHTS)
    graph_module = _attach_weights(torch.export.load(artifact / PROGRAM), weights)
    meta = manifest["meta"]
    if (artifact / PATTERNS_FILE).is_file():
        load_patterns(artifact, meta, config)
    program = Program(
        graph_module=graph_module,
        layers=build_layer_map(graph_module, spec_for(config), meta["num_layers"]),
        config=config,
        meta=meta,
        history=manifest["history"],
        drafter=safetensors.torch.load_file(artifact / DRAFTER) if (artifact / DRAFTER).is_file() else {},
    )
    return program, manifest
