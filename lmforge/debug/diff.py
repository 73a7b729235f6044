"""What a pass changed in the graph: nodes added, removed and rewired, grouped by layer and
role; and what differs between two artifacts (recipes, pass decisions, weights, quality)."""

from __future__ import annotations

import difflib
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from lmforge.compiler.artifact import WEIGHTS, read_manifest
from lmforge.compiler.layermap import role_of
from lmforge.compiler.pipeline import Instrument, node_signature
from lmforge.compiler.program import Program
from lmforge.passes import Pass, PassResult

Snapshot = dict[str, tuple]


def snapshot(program: Program) -> Snapshot:
    """Every node by name: its signature, layer and role."""
    return {node.name: (node_signature(node), *role_of(node)) for node in program.graph_module.graph.nodes}


def _where(entry: tuple) -> str:
    _, layer, role = entry
    return f"layer {layer} {role}" if layer is not None else "outside layers"


def graph_diff(before: Snapshot, after: Snapshot, examples: int = 8) -> dict:
    """Counts of added / removed / rewired nodes by (layer, role), with example names."""
    added = [name for name in after if name not in before]
    removed = [name for name in before if name not in after]
    rewired = [name for name in after if name in before and after[name][0] != before[name][0]]
    by_place: dict[str, Counter] = {}
    for kind, names, source in (("added", added, after), ("removed", removed, before), ("rewired", rewired, after)):
        for name in names:
            by_place.setdefault(_where(source[name]), Counter())[kind] += 1
    return {
        "added": len(added), "removed": len(removed), "rewired": len(rewired),
        "examples": {"added": added[:examples], "removed": removed[:examples], "rewired": rewired[:examples]},
        "by_place": {place: dict(counts) for place, counts in sorted(by_place.items())},
    }


class Diff(Instrument):
    """Adds a `diff` record to each pass's history entry."""

    def before_pass(self, index: int, pass_: Pass, program: Program) -> None:
        self.before = snapshot(program)

    def after_pass(self, index: int, pass_: Pass, program: Program, result: PassResult) -> None:
        program.history[-1]["diff"] = graph_diff(self.before, snapshot(program))


def _weights(artifact: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(artifact / WEIGHTS), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _decisions(manifest: dict) -> dict:
    meta = manifest.get("meta", {})
    return {key: value for key, value in meta.items() if key not in ("kv_cache", "dtype", "architecture", "source")}


def _quality(manifest: dict) -> dict:
    """The last held-out quality some pass measured, by pass."""
    return {entry["pass"]: entry["measurements"]["heldout_quality"]
            for entry in manifest.get("history", []) if "heldout_quality" in entry.get("measurements", {})}


def diff_artifacts(first: str | Path, second: str | Path) -> dict:
    """Recipes (unified diff), pass decisions in `meta`, the pass lists, weights (only in
    one, different shape, or max absolute difference) and measured quality."""
    first, second = Path(first), Path(second)
    manifests = read_manifest(first), read_manifest(second)
    recipes = [(path / "recipe.yaml").read_text().splitlines(keepends=True) for path in (first, second)]
    weights = _weights(first), _weights(second)
    changed = {}
    for name in sorted(set(weights[0]) & set(weights[1])):
        a, b = weights[0][name], weights[1][name]
        if a.shape != b.shape:
            changed[name] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        elif not torch.equal(a, b):
            changed[name] = f"max |difference| {(a.float() - b.float()).abs().max().item():.4g}"
    return {
        "artifacts": [str(first), str(second)],
        "recipe_diff": "".join(difflib.unified_diff(*recipes, fromfile=f"{first}/recipe.yaml", tofile=f"{second}/recipe.yaml")),
        "passes": [[entry["pass"] for entry in manifest.get("history", [])] for manifest in manifests],
        "decisions": [_decisions(manifest) for manifest in manifests],
        "weights": {
            "only_in_first": sorted(set(weights[0]) - set(weights[1])),
            "only_in_second": sorted(set(weights[1]) - set(weights[0])),
            "changed": changed,
            "bytes": [sum(t.nbytes for t in w.values()) for w in weights],
        },
        "kv_cache_slots": [len({e["cache"] for e in m["meta"]["kv_cache"]}) for m in manifests],
        "quality": [_quality(manifest) for manifest in manifests],
    }


def describe_artifact_diff(record: dict) -> str:
    """A human-readable rendering of `diff_artifacts`."""
    weights = record["weights"]
    lines = [f"A = {record['artifacts'][0]}", f"B = {record['artifacts'][1]}", "", "passes:"]
    lines += [f"  A: {' → '.join(record['passes'][0]) or '(none)'}", f"  B: {' → '.join(record['passes'][1]) or '(none)'}"]
    lines += ["", "recipe:", record["recipe_diff"] or "  identical"]
    for label, key in (("decisions", "decisions"), ("held-out quality", "quality")):
        if record[key][0] != record[key][1]:
            lines += ["", f"{label}:", f"  A: {json.dumps(record[key][0])}", f"  B: {json.dumps(record[key][1])}"]
    lines += ["", f"KV cache slots: A {record['kv_cache_slots'][0]}, B {record['kv_cache_slots'][1]}",
              f"weight bytes: A {weights['bytes'][0]:,}, B {weights['bytes'][1]:,}",
              f"weights only in A: {len(weights['only_in_first'])}, only in B: {len(weights['only_in_second'])}, "
              f"same name but different: {len(weights['changed'])}"]
    lines += [f"  {name}: {what}" for name, what in list(weights["changed"].items())[:20]]
    return "\n".join(lines)
