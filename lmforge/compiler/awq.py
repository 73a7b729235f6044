"""AWQ: activation-aware weight scaling before quantization (Lin et al., 2023).

A few input channels carry much larger activations than the rest, and the weights that
multiply them matter most to the output. Scaling input channel j of a linear layer's weight
by s_j and its input by 1/s_j leaves the product unchanged, but rounds those weights on a
finer relative grid. AWQ takes s = m^α, m the channel's mean |activation| on calibration
text, and searches α ∈ [0, 1] for the smallest output error of the quantized layer on the
calibration activations (α = 0 is plain round-to-nearest, so the search never does worse
than it there). Linears reading the same input (q/k/v, gate/up) share one scale.

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
