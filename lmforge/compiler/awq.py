"""AWQ: activation-aware weight scaling before quantization (Lin et al., 2023).

A few input channels carry much larger activations than the rest, and the weights that
multiply them matter most to the output. Scaling input channel j of a linear layer's weight
by s_j and its input by 1/s_j leaves the product unchanged, but rounds those weights on a
finer relative grid. AWQ takes s = m^α, m the channel's mean |activation| on calibration
text, and searches α ∈ [0, 1] for the smallest output error of the quantized layer on the
calibration activations (α = 0 is plain round-to-nearest, so the search never does worse
than it there). Linears reading the same input (q/k/v, gate/up) share one scale.

Then AWQ's clipping search (`search_clip`, its `auto_clip`): round-to-nearest spends its
grid on each group's extreme weights; shrinking the range a group's codes span to a ratio r
of its largest magnitude (weights beyond it clamped) rounds the rest more finely. r is
searched per output row and group of input columns, 1 down to 1 - `max_shrink`, for the
smallest error of that group's share of the output on the calibration activations; q and k
projections are left unclipped, as in AWQ (their error reaches the output through softmax,
which this per-linear error does not see). Measured on ref-llama-py at int4 g32 (benchmarks/
quantize.py --methods --weights "int4 g32", 8 calibration and 8 held-out windows of 128
tokens; perplexity change, KL): round to nearest +1.09 %, 0.0075; AWQ scales alone +2.39 %,
0.0074; AWQ with clipping +0.82 %, 0.0069; GPTQ -0.36 %, 0.0055 — the clipping is what makes
AWQ beat round to nearest here, and GPTQ stays the better method on this model.

The 1/s goes into the RMSNorm weight that produces the input when nothing else reads it, so
the program keeps its shape and the kernels are unchanged; otherwise (the attention output
feeding o_proj, the SwiGLU product feeding down_proj) the graph multiplies the input by a
per-channel constant before the linears.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from lmforge.compiler.layermap import role_of, set_role
from lmforge.compiler.program import Program

aten = torch.ops.aten
INPUT_SCALE = "__awq_input_scale"


def normalized_scales(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    """m^α divided by the geometric mean of its extremes, so scales sit around 1."""
    scales = magnitude.clamp_min(1e-6).pow(alpha)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(
    weights: list[torch.Tensor],
    gram: torch.Tensor,
    magnitude: torch.Tensor,
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    grid: int = 20,
) -> tuple[torch.Tensor, float, float, float]:
    """(scales, α, output MSE at α, output MSE of plain round-to-nearest) for linears of
    `weights` reading inputs X with second moment `gram` = XᵀX / n and per-channel mean
    |activation| `magnitude`. `fake_quantize` maps a weight to its quantized-then-dequantized
    value. The output MSE of a weight error Δ is mean((XΔᵀ)²) = Σ (ΔG ∘ Δ) / out, which
    needs G once instead of every calibration row per trial."""
    gram = gram.float()

    def error(scales: torch.Tensor) -> float:
        total = 0.0
        for weight in weights:
            delta = fake_quantize(weight * scales) / scales - weight
            total += ((delta @ gram) * delta).sum().item() / weight.shape[0]
        return total

    trials = [(error(normalized_scales(magnitude, alpha)), alpha) for alpha in torch.linspace(0, 1, grid + 1).tolist()]
    rtn = error(torch.ones_like(magnitude))
    best, alpha = min(trials)
    if rtn <= best:
        return torch.ones_like(magnitude), 0.0, rtn, rtn
    return normalized_scales(magnitude, alpha), alpha, best, rtn


def group_second_moments(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks `(groups, group, group)` of XᵀX / n: the second moment of each
    group of input columns on its own (the cross-group terms drop out of a group's error)."""
    groups = gram.shape[0] // group_size
    blocks = gram.float().view(groups, group_size, groups, group_size)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def search_clip(
    weight: torch.Tensor,
    gram: torch.Tensor,
    group_size: int,
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(clipped weight, ratio per (row, group), output MSE clipped, output MSE unclipped) of
    a linear `weight` reading inputs with second moment `gram`, quantized by `fake_quantize`
    in groups of `group_size` input columns (the whole row for per-channel formats). Each
    (row, group) keeps the ratio r of its largest magnitude, among 1, 1 - max_shrink / grid,
    …, 1 - max_shrink, whose clamped-then-quantized weights δ = q(clamp(w, ±r·max)) - w give
    the smallest δᵀ G_g δ, G_g that group's block of `gram`."""
    weight = weight.detach().float()
    rows, columns = weight.shape
    groups = columns // group_size
    blocks = group_second_moments(gram, group_size)
    magnitude = weight.view(rows, groups, group_size).abs().amax(dim=-1, keepdim=True)

    def group_errors(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        limit = (magnitude * ratio).expand(rows, groups, group_size).reshape(rows, columns)
        clipped = torch.minimum(torch.maximum(weight, -limit), limit)
        delta = (fake_quantize(clipped) - weight).view(rows, groups, group_size)
        return torch.einsum("rgi,gij,rgj->rg", delta, blocks, delta), clipped

    unclipped, _ = group_errors(torch.ones(()))
    best, ratios = unclipped, torch.ones(rows, groups)
    for step in range(1, grid + 1):
        ratio = 1 - max_shrink * step / grid
        errors, _ = group_errors(torch.tensor(ratio))
        better = errors < best
        best, ratios = torch.where(better, errors, best), torch.where(better, ratio, ratios)
    errors, clipped = group_errors(ratios[..., None])
    return clipped, ratios, errors.sum().item() / rows, unclipped.sum().item() / rows


def _foldable_norm_weight(program: Program, source: fx.Node, linears: list[fx.Node], width: int) -> fx.Node | None:
    """The get_attr of a 1-D weight that `source` multiplies by, when the product is read
    only by `linears` and the weight only by `source` (so dividing it changes nothing else)."""
    if source.target is not aten.mul.Tensor or set(source.users) != set(linears):
        return None
    for argument in source.args:
        if not isinstance(argument, fx.Node) or argument.op != "get_attr" or len(argument.users) != 1:
            continue
        value = getattr(program.graph_module, argument.target)
        readers = [node for node in program.graph_module.graph.nodes
                   if node.op == "get_attr" and node.target == argument.target]
        if isinstance(value, torch.Tensor) and value.shape == (width,) and len(readers) == 1:
            return argument
    return None


def _replace_constant(module: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Rebind constant `name` to a new tensor: programs cloned for trials share the old one."""
    delattr(module, name)
    module.register_buffer(name, value.detach().contiguous())


def fold_input_scales(program: Program, source: fx.Node, linears: list[fx.Node], scales: torch.Tensor) -> str:
    """Multiply the weights of `linears` (all reading `source`) by `scales` per input column
    and divide their input by the same, exactly (before any rounding). Returns where the
    division went: "norm" (folded into the weight `source` multiplies by) or "input" (a
    per-channel constant multiplied in)."""
    module, graph = program.graph_module, program.graph_module.graph
    for linear in linears:
        name = linear.args[1].target
        _replace_constant(module, name, getattr(module, name) * scales)
    norm_weight = _foldable_norm_weight(program, source, linears, scales.shape[0])
    if norm_weight is not None:
        _replace_constant(module, norm_weight.target, getattr(module, norm_weight.target) / scales)
        return "norm"
    name = program.add_weight(linears[0].args[1].target + INPUT_SCALE, 1 / scales)
    first = min(linears, key=list(graph.nodes).index)
    with graph.inserting_before(first):
        constant = graph.get_attr(name)
        scaled = graph.call_function(aten.mul.Tensor, (source, constant))
    layer, role = role_of(first)
    if layer is not None:
        for node in (constant, scaled):
            set_role(node, layer, role)
    for linear in linears:
        linear.args = (scaled, *linear.args[1:])
    return "input"
