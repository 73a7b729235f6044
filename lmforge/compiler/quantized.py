"""Low-precision weight formats shared by the `quantize` pass and the CPU kernel selection.

A quantized weight is stored as ordinary program constants with fixed suffixes on the
original weight's attribute name, so that they travel through `weights.safetensors` (no
pickle) and a loaded program is recognised by name alone:

- `int8`: `NAME__qweight` int8 `(out, in)` and `NAME__scales` fp32 `(out, 1)`, symmetric per
  output channel: `w = q * scale`.
- `int4`: `NAME__qweight` uint8 `(out, in / 2)` holding two 4-bit codes per byte (column
  `2i` in the low nibble, `2i + 1` in the high one), `NAME__scales` and `NAME__zeros` fp16
  `(out, in / group)`, asymmetric per group of `group` input columns: `w = q * scale + zero`
  with `q` in 0..15 (zero is the group's minimum, as in torchao's and GPTQ's min/max RTN).
- `bf16` / `fp16`: the weight itself in that dtype, under its own name.
- outliers (int8 / int4, SpQR-style): `NAME__outlier_index` int32 flat indices `row * in + col`
  and `NAME__outlier_value` fp32, weights kept exactly: they replace the dequantized values
  at those positions. Their codes are still stored (the dense kernels read every code), so
  the kernel adds `value - dequantized` at those positions as a sparse correction.

The program dequantizes with plain ATen ops (`dequantize_nodes`), so any backend runs it
and `torch.export` stores it; the CPU backend replaces that arithmetic with a kernel that
reads the stored format directly (`codegen/cpu_quantized.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx

aten = torch.ops.aten
QWEIGHT, SCALES, ZEROS = "__qweight", "__scales", "__zeros"
OUTLIER_INDEX, OUTLIER_VALUE = "__outlier_index", "__outlier_value"
INT4_MAX = 15
INT8_MAX = 127


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight in a stored format: codes, scales, zero points, the group size and the
    weights kept exactly (outliers)."""

    format: str
    qweight: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None
    outlier_value: torch.Tensor | None = None

    @property
    def group_size(self) -> int | None:
        if self.format != "int4":
            return None
        return self.qweight.shape[1] * 2 // self.scales.shape[1]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The constants this weight is stored as, by attribute name."""
        if self.format in ("bf16", "fp16"):
            return {name: self.qweight}
        stored = {name + QWEIGHT: self.qweight, name + SCALES: self.scales}
        if self.zeros is not None:
            stored[name + ZEROS] = self.zeros
        if self.outlier_index is not None:
            stored[name + OUTLIER_INDEX] = self.outlier_index
            stored[name + OUTLIER_VALUE] = self.outlier_value
        return stored

    def dequantize_codes(self) -> torch.Tensor:
        """The fp32 weight the codes alone represent (outliers not applied)."""
        if self.format in ("bf16", "fp16"):
            return self.qweight.float()
        if self.format == "int8":
            return self.qweight.float() * self.scales
        codes = unpack_int4(self.qweight).float()
        rows, columns = codes.shape
        grouped = codes.view(rows, self.scales.shape[1], -1)
        return (grouped * self.scales.float()[..., None] + self.zeros.float()[..., None]).view(rows, columns)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this format represents (the reference the kernels must match)."""
        weight = self.dequantize_codes()
        if self.outlier_index is None:
            return weight
        return weight.view(-1).index_put((self.outlier_index.long(),), self.outlier_value).view(weight.shape)

    def with_outliers(self, weight: torch.Tensor, mask: torch.Tensor) -> QuantizedWeight:
        """This weight with the entries of `weight` where `mask` is set kept exactly."""
        index = mask.view(-1).nonzero().view(-1)
        if not len(index):
            return self
        return replace(self, outlier_index=index.to(torch.int32), outlier_value=weight.detach().float().view(-1)[index])


def int8_scales(weight: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int8 scale per row `(rows, 1)` from the largest magnitude among the
    entries `keep` marks (all when None): outliers kept exactly do not widen the range."""
    magnitude = weight.abs() if keep is None else weight.abs().masked_fill(~keep, 0)
    return (magnitude.amax(dim=-1, keepdim=True) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def int8_codes(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.round(weight / scales).clamp(-INT8_MAX, INT8_MAX)


def int4_params(groups: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) of each group `(..., group)` over the entries `keep` marks: the
    step spans the group's min..max in 15 codes; the zero point is the minimum."""
    if keep is None:
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    else:
        low = groups.masked_fill(~keep, float("inf")).amin(dim=-1)
        high = groups.masked_fill(~keep, float("-inf")).amax(dim=-1)
        low, high = torch.where(keep.any(dim=-1), low, 0.0), torch.where(keep.any(dim=-1), high, 0.0)
    scales = ((high - low) / INT4_MAX).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    return scales, low.to(torch.float16)


def int4_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of `weight` given broadcastable fp16 `scales` and `zeros`."""
    return torch.round((weight - zeros.float()) / scales.float()).clamp(0, INT4_MAX)


def quantize_int8(weight: torch.Tensor, keep: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest symmetric int8, one scale per output channel (row)."""
    weight = weight.detach().float()
    scales = int8_scales(weight, keep)
    return QuantizedWeight("int8", int8_codes(weight, scales).to(torch.int8), scales)


def quantize_int4(weight: torch.Tensor, group_size: int, keep: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest asymmetric int4 over groups of `group_size` input columns."""
    weight = weight.detach().float()
    rows, columns = weight.shape
    groups = weight.view(rows, columns // group_size, group_size)
    scales, zeros = int4_params(groups, None if keep is None else keep.view(groups.shape))
    codes = int4_codes(groups, scales[..., None], zeros[..., None])
    return QuantizedWeight("int4", pack_int4(codes.view(rows, columns).to(torch.uint8)), scales, zeros)


def cast_weight(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    return QuantizedWeight(fmt, weight.detach().to(torch.bfloat16 if fmt == "bf16" else torch.float16))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """`(rows, 2n)` codes in 0..15 → `(rows, n)` uint8, two per byte."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: `(rows, n)` uint8 → `(rows, 2n)` uint8 codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


def stored_format(module: torch.nn.Module, leaf_names: list[str]) -> tuple[str, str] | None:
    """(format, original weight name) of a weight expression whose constants are
    `leaf_names`, or None when they are not one stored weight."""
    for name in leaf_names:
        if name.endswith(QWEIGHT):
            base = name.removesuffix(QWEIGHT)
            return ("int8" if getattr(module, name).dtype == torch.int8 else "int4"), base
    if len(leaf_names) == 1:
        dtype = getattr(module, leaf_names[0]).dtype
        if dtype in (torch.bfloat16, torch.float16):
            return ("bf16" if dtype == torch.bfloat16 else "fp16"), leaf_names[0]
    return None


def stored_weight(module: torch.nn.Module, fmt: str, base: str) -> QuantizedWeight:
    """The `QuantizedWeight` a module holds under `base`'s stored names."""
    if fmt in ("bf16", "fp16"):
        return QuantizedWeight(fmt, getattr(module, base))
    return QuantizedWeight(fmt, getattr(module, base + QWEIGHT), getattr(module, base + SCALES),
                           getattr(module, base + ZEROS, None) if fmt == "int4" else None,
                           getattr(module, base + OUTLIER_INDEX, None), getattr(module, base + OUTLIER_VALUE, None))


def dequantize_nodes(graph: fx.Graph, attributes: dict[str, fx.Node], weight: QuantizedWeight) -> list[fx.Node]:
    """Nodes computing the fp32 weight from its stored constants (`attributes`: stored
    name suffix → get_attr node, "" for bf16/fp16), inserted at the graph's insertion
    point; the last node is the weight."""
    nodes: list[fx.Node] = []

    def call(target, *args, **kwargs) -> fx.Node:
        nodes.append(graph.call_function(target, args, kwargs))
        return nodes[-1]

    if weight.format in ("bf16", "fp16"):
        call(aten._to_copy.default, attributes[""], dtype=torch.float32)
        return nodes
    codes = attributes[QWEIGHT]
    if weight.format == "int8":
        call(aten.mul.Tensor, call(aten._to_copy.default, codes, dtype=torch.float32), attributes[SCALES])
    else:
        rows, half = weight.qweight.shape
        groups = weight.scales.shape[1]
        low = call(aten.bitwise_and.Scalar, codes, 0xF)
        high = call(aten.bitwise_right_shift.Tensor_Scalar, codes, 4)
        stacked = call(aten.stack.default, [low, high], -1)
        unpacked = call(aten.view.default, stacked, [rows, groups, 2 * half // groups])
        scales = call(aten.unsqueeze.default, call(aten._to_copy.default, attributes[SCALES], dtype=torch.float32), -1)
        zeros = call(aten.unsqueeze.default, call(aten._to_copy.default, attributes[ZEROS], dtype=torch.float32), -1)
        scaled = call(aten.mul.Tensor, call(aten._to_copy.default, unpacked, dtype=torch.float32), scales)
        call(aten.view.default, call(aten.add.Tensor, scaled, zeros), [rows, 2 * half])
    if weight.outlier_index is not None:
        flat = call(aten.view.default, nodes[-1], [-1])
        index = call(aten._to_copy.default, attributes[OUTLIER_INDEX], dtype=torch.int64)
        kept = call(aten.index_put.default, flat, [index], attributes[OUTLIER_VALUE])
        call(aten.view.default, kept, list(weight.qweight.shape[:1]) + [-1])
    return nodes
