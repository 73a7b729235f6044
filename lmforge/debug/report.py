"""`report.html`: one self-contained page (inline SVG plots, no scripts, no network) that
shows what every pass did: a per-pass table, quality after each pass, the decisions of
lossy passes (KV similarity, FFN convergence and measured costs), and one decoder layer's
graph before and after the pipeline."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from lmforge.compiler.layermap import role_of  # noqa: E402
from lmforge.compiler.program import Program  # noqa: E402
from lmforge.compiler.sparse_patterns import PATTERNS  # noqa: E402

if TYPE_CHECKING:
    from lmforge.debug.session import DebugRun

ROLE_COLOURS = {
    "q": "#4c78a8", "k": "#4c78a8", "v": "#4c78a8", "o": "#4c78a8", "qkv": "#4c78a8",
    "attention": "#e45756", "attention_other": "#9ecae9", "ffn": "#f58518", "ffn_gate": "#b279a2",
    "norm": "#54a24b", "residual_add": "#222222", "layer_other": "#bab0ac",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } .error { color: #b00; font-weight: bold; } .tie { color: #a60; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
figcaption { font-size: 13px; color: #555; } pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; }
"""


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"


def quality_plot(records: Sequence[dict]) -> str:
    """KL, perplexity change and top-1 agreement after each pass."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 3))
    labels = [f"{r['index'] + 1}:{r['pass']}" for r in records]
    for axis, key, title in zip(axes, ("kl", "ppl_increase", "top1"), ("KL (nats)", "perplexity change", "top-1 agreement")):
        axis.plot(range(len(records)), [r[key] for r in records], marker="o")
        axis.set_xticks(range(len(records)), labels, rotation=45, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    return _svg(figure)


def heatmap(matrix: Sequence[Sequence[float]], title: str, colour_label: str, xlabel: str = "layer",
            ylabel: str = "layer", marks: Sequence[Sequence[str]] | None = None) -> str:
    """A matrix as colours; `marks` writes a short label in each cell."""
    figure, axis = plt.subplots(figsize=(4.5, 4))
    image = axis.imshow(matrix, cmap="viridis", aspect="auto")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    for row, labels in enumerate(marks or []):
        for column, label in enumerate(labels):
            axis.text(column, row, label, ha="center", va="center", fontsize=7, color="white")
    figure.colorbar(image, ax=axis, label=colour_label)
    return _svg(figure)


def bar_plot(values: dict, title: str, ylabel: str) -> str:
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.bar([str(k) for k in values], list(values.values()), color="#f58518")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("layer")
    axis.set_ylabel(ylabel)
    return _svg(figure)


def _op_label(node) -> str:
    """`linear` for aten.linear.default, `getitem` for operator.getitem."""
    target = str(node.target)
    return target.split(".")[-2] if target.count(".") >= 2 else getattr(node.target, "__name__", target)


def layer_graph(program: Program, layer: int, title: str) -> str:
    """The nodes of one decoder layer laid out by dependency depth (no graphviz needed),
    coloured by role; weights and shape bookkeeping are left out."""
    nodes = [n for n in program.graph_module.graph.nodes
             if role_of(n)[0] == layer and n.op == "call_function" and "sym_size" not in str(n.target)]
    members = set(nodes)
    depth: dict = {}
    for node in nodes:
        parents = [p for p in node.all_input_nodes if p in members]
        depth[node] = 1 + max((depth[p] for p in parents), default=-1)
    rows: dict[int, list] = {}
    for node in nodes:
        rows.setdefault(depth[node], []).append(node)
    position = {node: (column - (len(row) - 1) / 2, -level) for level, row in rows.items() for column, node in enumerate(row)}
    figure, axis = plt.subplots(figsize=(6, max(3, 0.35 * len(rows))))
    for node in nodes:
        for parent in node.all_input_nodes:
            if parent in members:
                (x0, y0), (x1, y1) = position[parent], position[node]
                axis.plot([x0, x1], [y0, y1], color="#999", linewidth=0.6, zorder=1)
    for node in nodes:
        x, y = position[node]
        role = role_of(node)[1]
        axis.scatter([x], [y], s=60, color=ROLE_COLOURS.get(role, "#bab0ac"), zorder=2)
        axis.annotate(_op_label(node), (x, y), xytext=(4, 2), textcoords="offset points", fontsize=6)
    axis.set_title(f"{title} ({len(nodes)} ops)", fontsize=10)
    axis.axis("off")
    return _svg(figure)


def _pass_rows(history: list[dict]) -> str:
    rows = []
    for index, entry in enumerate(history):
        check = entry.get("verify_each", {})
        status = check.get("status", "lossy" if check and not check.get("lossless") else "")
        css = {"error": "error", "near-tie": "tie"}.get(status, "")
        divergent = check.get("first_divergent_layer")
        diff = entry.get("diff", {})
        cells = [
            str(index + 1), entry["pass"], f"{entry['seconds']:.2f}", f"{entry['ops_before']} → {entry['ops_after']}",
            str(entry["rewrites"]),
            f"+{diff.get('added', 0)} −{diff.get('removed', 0)} ~{diff.get('rewired', 0)}" if diff else "",
            f"{check['max_logit_error']:.3g}" if check else "", f"{check['top1']:.4f}" if check else "",
            f"{check['kl']:.4g}" if check else "", f"{check['ppl_increase']:+.2%}" if check else "",
            f"<span class='{css}'>{html.escape(status)}</span>",
            f"layer {divergent['layer']} ({divergent['relative_error']:.2g})" if divergent else "—",
            html.escape("; ".join(entry["notes"])),
        ]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    header = ("#", "pass", "s", "ops", "rewrites", "nodes +added −removed ~rewired", "max logit err", "top-1", "KL",
              "ppl Δ", "greedy check", "first divergent layer", "notes")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>"


def _decision_figures(history: list[dict]) -> list[str]:
    figures = []
    for entry in history:
        measurements = entry["measurements"]
        if entry["pass"] == "kv_share" and "similarity" in measurements:
            figures.append(_figure(heatmap(measurements["similarity"], "K/V cosine similarity between layers", "cosine"),
                                   f"kv_share chose groups {measurements['groups']}"))
        if entry["pass"] == "ffn_skip" and "convergence" in measurements:
            convergence = {int(k): v for k, v in measurements["convergence"].items()}
            figures.append(_figure(bar_plot(convergence, "cosine(stream before FFN, after FFN)", "cosine"),
                                   f"ffn_skip ({entry['config']['mode']}) chose layers {measurements['layers']}"))
            costs = {str(t.get("candidate", t.get("threshold"))): t["calibration_quality"]["ppl_increase"]
                     for t in measurements.get("trials", [])}
            if costs:
                figure, axis = plt.subplots(figsize=(6, 3))
                axis.bar(range(len(costs)), list(costs.values()), color="#4c78a8")
                axis.set_xticks(range(len(costs)), list(costs), rotation=60, ha="right", fontsize=6)
                axis.set_ylabel("perplexity change (calibration)")
                axis.set_title("measured cost of each candidate", fontsize=10)
                figures.append(_figure(_svg(figure), "ffn_skip search trials"))
    return figures


def _attention_pattern_figures(meta: dict) -> list[str]:
    """Per-head decisions of streaming_heads (score, S = streaming) and sparse_prefill
    (pattern per query head, with its measured recall)."""
    figures = []
    streaming = meta.get("streaming_heads")
    if streaming:
        layers = sorted(streaming["scores"], key=int)
        kinds = streaming["kinds"]
        marks = [["S" if layer in kinds and kinds[layer][head] else "R" for head in range(len(streaming["scores"][layer]))]
                 for layer in layers]
        label = "gate (1 = needs full attention)" if streaming["method"] == "gates" else "attention mass in sink + window"
        figures.append(_figure(
            heatmap([streaming["scores"][layer] for layer in layers], "streaming_heads: score per KV head", label,
                    xlabel="KV head", ylabel="layer", marks=marks),
            f"S: streaming (sink {streaming['sink']} + window {streaming['window']}), R: retrieval; "
            f"copy task {streaming['copy_accuracy']}"))
    sparse = meta.get("sparse_prefill")
    if sparse:
        layers = sorted(sparse["patterns"], key=int)
        codes = [[PATTERNS.index(name) for name in sparse["patterns"][layer]] for layer in layers]
        marks = [[name[0].upper() for name in sparse["patterns"][layer]] for layer in layers]
        figures.append(_figure(
            heatmap(codes, "sparse_prefill: pattern per query head", "0 a_shape · 1 vertical_slash · 2 block_sparse",
                    xlabel="query head", ylabel="layer", marks=marks),
            f"budget {sparse['budget']} blocks of {sparse['block']} per query block from {sparse['min_length']} "
            f"tokens; copy task {sparse['copy_accuracy']}"))
    return figures


def _most_changed_layer(history: list[dict], num_layers: int) -> int:
    changes = {layer: 0 for layer in range(num_layers)}
    for entry in history:
        for place, counts in entry.get("diff", {}).get("by_place", {}).items():
            if place.startswith("layer "):
                layer = int(place.split()[1])
                changes[layer] = changes.get(layer, 0) + sum(counts.values())
    return max(changes, key=lambda layer: (changes[layer], -layer))


def _kernel_section(run: DebugRun) -> str:
    """With the triton backend, the kernels codegen generates from the final program (the
    ahead-of-time report per target needs `lmforge compile`: minutes, so not here)."""
    if run.compiled.recipe.codegen.backend != "triton":
        return ""
    from lmforge.codegen.triton_backend import emit_kernels  # imports triton only for triton recipes

    rows = "".join(
        f"<tr><td>{html.escape(kernel.name)}</td><td>{len(kernel.ops)}</td>"
        f"<td>{html.escape(', '.join(kernel.ops[:6]) + (', …' if len(kernel.ops) > 6 else ''))}</td></tr>"
        for kernel in emit_kernels(run.compiled.program))
    return ("<h2>Generated Triton kernels</h2><table><tr><th>kernel</th><th>graph ops</th><th>replaces</th></tr>"
            f"{rows}</table><p>Registers, spills, shared memory and occupancy per GPU target: <code>lmforge compile"
            "</code> with this recipe, then <code>lmforge info</code> on the artifact.</p>")


def render_report(run: DebugRun) -> str:
    program, history = run.compiled.program, run.compiled.program.history
    layer = _most_changed_layer(history, program.meta["num_layers"])
    sections = [
        f"<h1>lmforge debug report</h1><p>source: {html.escape(str(program.meta.get('source', 'module')))} · "
        f"architecture {html.escape(program.meta['architecture'])} · {program.meta['num_layers']} layers · "
        f"{len(run.compiled.rewrite_log)} rewrites</p>",
        "<h2>Passes</h2>" + _pass_rows(history),
        "<p>Quality is measured after every pass against the original model on the same batch. A lossless pass is "
        "also checked against the program before it: a greedy flip where that program's top-2 logits and the pass's "
        "logit change are both within the near-tie margin is marked <span class='tie'>near-tie</span>; any other "
        "flip is an <span class='error'>error</span>.</p>",
    ]
    if run.records:
        sections.append("<h2>Quality after each pass</h2>" + _figure(quality_plot(run.records), "against the original model"))
    decisions = _decision_figures(history)
    sections.append("<h2>Decisions of lossy passes</h2>" + (
        f"<div class='figures'>{''.join(decisions)}</div>" if decisions else "<p>No kv_share or ffn_skip pass ran.</p>"))
    patterns = _attention_pattern_figures(program.meta)
    sections.append("<h2>Attention patterns</h2>" + (
        f"<div class='figures'>{''.join(patterns)}</div>" if patterns
        else "<p>No sparse-attention pass ran, so there are no per-head patterns to show.</p>"))
    sections.append(
        f"<h2>Layer {layer} before and after</h2><div class='figures'>"
        + _figure(layer_graph(run.captured, layer, "captured"), "as captured")
        + _figure(layer_graph(program, layer, "after the pipeline"), "after every pass")
        + "</div><p>Colours: " + ", ".join(
            f"<span style='color:{colour}'>■</span> {role}" for role, colour in ROLE_COLOURS.items()) + "</p>"
    )
    sections.append(_kernel_section(run))
    sections.append("<h2>Recipe</h2><pre>" + html.escape(run.compiled.recipe.to_yaml()) + "</pre>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lmforge debug report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def write_report(run: DebugRun, path: Path) -> Path:
    """Write the report atomically (temporary file, then rename)."""
    temporary = path.with_suffix(".html.tmp")
    temporary.write_text(render_report(run))
    temporary.replace(path)
    return path
