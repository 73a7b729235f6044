"""GPTQ: quantize a linear layer's weight column by column, compensating each column's
rounding error on the columns not yet quantized (Frantar et al., 2022).

The loss is the layer's output error on calibration inputs X, whose curvature is the
Hessian H = 2·XᵀX. Quantizing column j leaves an error e_j; the optimal update of the
remaining columns is −e_j · H⁻¹[j, j:] / H⁻¹[j, j], read off the upper Cholesky factor of
H⁻¹ (numerically stable, computed once). Columns go in blocks of `block_size` so most of
the update is one matrix product per block. Options as in the reference implementation:
dampening (a fraction of H's mean diagonal added to it), act-order (columns with the largest
H diagonal first; the int4 groups then take their scale and zero from the original weight,
so they stay contiguous runs of columns in the stored format), and entries kept exactly
(outliers), whose error is zero and which do not widen a group's range.

The codes and scales are the formats of `compiler/quantized.py`, so the kernels that read
round-to-nearest weights read these unchanged.
"""

from __future__ import annotations

import torch

from lmforge.compiler.quantized import (
    QuantizedWeight,
    int4_codes,
    int4_params,
    int8_codes,
    int8_scales,
    pack_int4,
)


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2·XᵀX / n of calibration inputs `(n, in)` (the mean keeps it comparable across n)."""
    inputs = inputs.double()
    return (2 * inputs.T @ inputs / max(inputs.shape[0], 1)).float()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹."""
    h = h.double() + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    fmt: str,
    group_size: int | None = None,
    block_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    exact: torch.Tensor | None = None,
) -> QuantizedWeight:
    """`weight` `(out, in)` as int8 (per row) or int4 (groups of `group_size` columns),
    with second-order error compensation under Hessian `h` `(in, in)`. `exact` marks
    entries kept exactly (returned as the weight's outliers)."""
    if fmt not in ("int8", "int4"):
        raise ValueError(f"GPTQ quantizes to int8 or int4, not {fmt}")
    w = weight.detach().float().clone()
    rows, columns = w.shape
    h = h.detach().float().clone()
    exact = torch.zeros_like(w, dtype=torch.bool) if exact is None else exact.clone()
    dead = h.diagonal() == 0  # inputs never seen: their columns cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    group = group_size if fmt == "int4" else columns
    groups = columns // group
    if fmt == "int8":
        scales, zeros = int8_scales(w, ~exact), None
    elif act_order:
        scales, zeros = int4_params(w.view(rows, groups, group), ~exact.view(rows, groups, group))
    else:
        scales = torch.empty(rows, groups, dtype=torch.float16)
        zeros = torch.empty(rows, groups, dtype=torch.float16)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(columns)
    w, exact, h = w[:, order], exact[:, order], h[order][:, order]
    upper = _inverse_cholesky(h, damp)
    codes = torch.empty_like(w)
    block_size = -(-block_size // group) * group if fmt == "int4" else block_size
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, errors, inverse = w[:, start:end].clone(), torch.zeros(rows, end - start), upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            original = int(order[column])
            if fmt == "int4" and not act_order and column % group == 0:
                params = int4_params(block[:, i:i + group], ~exact[:, column:column + group])
                scales[:, column // group], zeros[:, column // group] = params
            if fmt == "int8":
                code = int8_codes(block[:, i:i + 1], scales).view(-1)
                dequantized = code * scales.view(-1)
            else:
                scale, zero = scales[:, original // group], zeros[:, original // group]
                code = int4_codes(block[:, i], scale, zero)
                dequantized = code * scale.float() + zero.float()
            codes[:, column] = code
            dequantized = torch.where(exact[:, column], block[:, i], dequantized)
            error = (block[:, i] - dequantized) / inverse[i, i]
            block[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ upper[start:end, end:]
    restore = torch.argsort(order)
    w, codes, exact = w[:, restore], codes[:, restore], exact[:, restore]
    if fmt == "int8":
        quantized = QuantizedWeight("int8", codes.to(torch.int8), scales)
    else:
        quantized = QuantizedWeight("int4", pack_int4(codes.to(torch.uint8)), scales, zeros)
    return quantized.with_outliers(w, exact)
