"""CPU kernels for weights stored in a low precision (the `quantize` pass).

The program multiplies by a weight it dequantizes with ATen ops every call; here each such
linear layer calls a kernel that reads the stored format instead, and each dequantized
embedding table is computed once. Chosen by measurement on this 2-core CPU (benchmarks/
quantize.py --kernels, every linear of ref-llama-py and of a 104 M-parameter Llama-shaped
model, hidden 1024, medians of alternating runs, ms per forward of all weights):

    format  kernel                                   ref 1 row / 4 / 11     104M 1 row / 4 / 11
    fp32    oneDNN packed (what fp32 programs use)   2.59 / 2.46 / 3.00     24.5 / 18.7 / 21.7
    bf16    oneDNN packed bf16, bf16 activations     2.01 / 1.97 / 2.40      9.9 /  9.7 / 11.0
    bf16    aten.linear bf16                         2.27 / 2.36 / 2.88     15.9 / 14.8 / 17.3
    fp16    aten.linear fp16                         0.93 / 2.38 / 5.82      7.7 / 30.4 / 61.0
    int8    _weight_int8pack_mm, bf16 activations    0.66 / 1.00 / 2.10      8.2 / 10.0 / 25.0
    int8    _weight_int8pack_mm, fp32 activations    3.29 / 12.4 / 48.9     52.2 / 251  / 574
    int4    _weight_int4pack_mm_for_cpu (bf16)       0.43 / 0.60 / 1.38      3.5 /  5.4 / 18.4

(oneDNN cannot pack fp16 weights on this CPU: it needs avx_ne_convert or avx512_fp16.) So:

- `bf16`: oneDNN-packed bf16 weight, activations cast to bf16 and back.
- `fp16`: the weight widened to fp32 (exact) and oneDNN-packed, at fp32 speed. aten.linear
  in fp16 is 3x faster at one row but 1.6-2.8x slower than fp32 at 4 and 11 rows, and a
  program must multiply alike at every width: speculative decoding checks drafts with
  several rows and must reproduce the one-row greedy tokens exactly.
- `int8`: `_weight_int8pack_mm` on the int8 codes with bf16 activations at every width
  (for the same reason; the packed bf16 copy would be faster from 4 rows on).
- `int4`: `_weight_int4pack_mm_for_cpu` on torch's packed layout at every width (groups of
  32, 64, 128 or 256 columns; other group sizes run as dequantized packed bf16).

Weights kept exactly (`outliers`) add a sparse correction after the dense kernel: the
difference between each kept value and what its code dequantizes to, times its input column,
summed into its output row (`index_add`), in fp32.

The bf16 activations change results by bf16 rounding (about 1e-2 of the largest logit), so
a `verify` pass after `quantize` needs a `max_logit_error` that allows it.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from torch.fx.node import map_arg

from lmforge.compiler.quantized import QuantizedWeight, stored_format, stored_weight, unpack_int4

aten = torch.ops.aten
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _with_bias(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)
    return out if bias is None else out + bias


def linear_bf16_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "")
    return _with_bias(out, x, bias)


def linear_fp32_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _with_bias(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), x, bias)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The bf16 product as plain aten (a compiler packs the weight itself: the `cpp` backend)."""
    return _with_bias(torch.nn.functional.linear(x.to(torch.bfloat16), weight), x, bias)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def linear_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _with_bias(torch._weight_int8pack_mm(_rows(x).to(torch.bfloat16), codes, scales), x, bias)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    out = torch._weight_int4pack_mm_for_cpu(_rows(x).to(torch.bfloat16), packed, group_size, scales_and_zeros)
    return _with_bias(out, x, bias)


def _plus_outliers(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                   deltas: torch.Tensor) -> torch.Tensor:
    """`out` (any leading shape, last dim the outputs) plus the sparse outlier correction."""
    flat = _rows(out).float()
    return flat.index_add(1, rows, _rows(x).float()[:, columns] * deltas).view(out.shape)


def linear_bf16_packed_outliers(x: torch.Tensor, packed: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                                deltas: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _with_bias(_plus_outliers(linear_bf16_packed(x, packed, None), x, rows, columns, deltas), x, bias)


def linear_bf16_outliers(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                         deltas: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _with_bias(_plus_outliers(linear_bf16(x, weight, None), x, rows, columns, deltas), x, bias)


def linear_int8_outliers(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor,
                         columns: torch.Tensor, deltas: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _with_bias(_plus_outliers(linear_int8(x, codes, scales, None), x, rows, columns, deltas), x, bias)


def linear_int4_outliers(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                         rows: torch.Tensor, columns: torch.Tensor, deltas: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    dense = linear_int4(x, packed, scales_and_zeros, group_size, None)
    return _with_bias(_plus_outliers(dense, x, rows, columns, deltas), x, bias)


_WITH_OUTLIERS = {linear_bf16_packed: linear_bf16_packed_outliers, linear_bf16: linear_bf16_outliers,
                  linear_int8: linear_int8_outliers, linear_int4: linear_int4_outliers}


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def kernel_operands(module: torch.nn.Module, fmt: str, base: str, onednn: bool = True) -> tuple:
    """(kernel, the tensors it takes after the activations, in order) for one weight; with
    `onednn` False, bf16 and fp16 weights stay plain tensors (no oneDNN-packed copy, which
    `torch.export` cannot hold) for a compiler that packs them itself."""
    weight = stored_weight(module, fmt, base)
    kernel, operands = _dense_operands(weight, onednn)
    if weight.outlier_index is None:
        return kernel, operands
    index = weight.outlier_index.long()
    columns = weight.qweight.shape[1] * (2 if fmt == "int4" else 1)
    deltas = weight.outlier_value - weight.dequantize_codes().view(-1)[index]
    return _WITH_OUTLIERS[kernel], (*operands, index // columns, index % columns, deltas)


def _dense_operands(weight: QuantizedWeight, onednn: bool) -> tuple:
    fmt = weight.format
    bf16_kernel, pack = (linear_bf16_packed, _pack) if onednn else (linear_bf16, torch.Tensor.contiguous)
    if fmt == "bf16":
        return bf16_kernel, (pack(weight.qweight),)
    if fmt == "fp16":
        return (linear_fp32_packed if onednn else linear_fp32), (pack(weight.qweight.float()),)
    if fmt == "int8":
        return linear_int8, (weight.qweight, weight.scales.view(-1).to(torch.bfloat16))
    if weight.group_size not in INT4_KERNEL_GROUPS:
        return bf16_kernel, (pack(weight.dequantize_codes().to(torch.bfloat16)),)
    packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(weight.qweight).to(torch.int32), 1)
    # torch's int4 convention is w = (q - 8) * scale + zero; ours is w = q * scale + min
    scales = weight.scales.float()
    zeros = weight.zeros.float() + 8 * scales
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return linear_int4, (packed, scales_and_zeros, weight.group_size)


def _constant_expression(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(nodes in graph order, get_attr leaves) computing `node` from constants alone, or
    None if it reads an input."""
    nodes, leaves, pending = set(), set(), [node]
    while pending:
        current = pending.pop()
        if current in nodes or current in leaves:
            continue
        if current.op == "get_attr":
            leaves.add(current)
        elif current.op == "call_function":
            nodes.add(current)
            pending.extend(current.all_input_nodes)
        else:
            return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(nodes, key=order.get), sorted(leaves, key=order.get)


def _evaluate(module: fx.GraphModule, nodes: list[fx.Node], leaves: list[fx.Node]) -> torch.Tensor:
    env = {leaf: functools.reduce(getattr, leaf.target.split("."), module) for leaf in leaves}
    for node in nodes:
        env[node] = node.target(*map_arg(node.args, env.get), **map_arg(node.kwargs, env.get))
    return env[nodes[-1]]


def _register(module: fx.GraphModule, name: str, value, before: fx.Node):
    if not isinstance(value, torch.Tensor):
        return value
    if not hasattr(module, name):
        module.register_buffer(name, value)
    with module.graph.inserting_before(before):
        return module.graph.get_attr(name)


def select_quantized_kernels(module: fx.GraphModule, onednn: bool = True) -> None:
    """In place on `module`: every linear whose weight is a stored low-precision weight
    calls that format's kernel (`kernel_operands`); every embedding table computed from
    constants is computed once. The dequantizing nodes are left for dead-code elimination."""
    for node in list(module.graph.nodes):
        if node.target not in (aten.linear.default, aten.embedding.default):
            continue
        weight_arg = node.args[1] if node.target is aten.linear.default else node.args[0]
        if not isinstance(weight_arg, fx.Node) or weight_arg.op == "get_attr":
            continue
        expression = _constant_expression(weight_arg)
        if expression is None or not expression[0]:
            continue
        nodes, leaves = expression
        if node.target is aten.embedding.default:
            table = _register(module, f"{leaves[0].target}_table", _evaluate(module, nodes, leaves), node)
            node.args = (table, *node.args[1:])
            continue
        found = stored_format(module, [leaf.target for leaf in leaves])
        if found is None:
            continue
        fmt, base = found
        kernel, operands = kernel_operands(module, fmt, base, onednn)
        attributes = [_register(module, f"{base}_{fmt}_kernel_{i}", operand, node) for i, operand in enumerate(operands)]
        bias = node.args[2] if len(node.args) > 2 else None
        node.target = kernel
        node.args = (node.args[0], *attributes, bias)
