"""Triton source for fusion groups: one `@triton.jit` kernel and its launcher per group.

Layout of every kernel: each program owns a tile of BLOCK_R rows × BLOCK_C columns of its
outputs (the last dimension is the column). Rows of every output are numbered row-major
over the other dimensions; the kernel recovers their indices (`i0_1 = row // seq % 4`),
and every value is computed at the index it is needed by walking the graph backwards:
pointwise ops combine their operands at broadcast indices, index ops (views, transposes,
slices, split parts, concatenations) rewrite the index with sympy, a row reduction sums
over the columns, and anything outside the group is loaded from its tensor. Values are
computed in fp32 and rounded to each node's dtype, as PyTorch's CPU kernels do.

The source depends only on the graph (node names, shapes in symbolic sizes, constants), so
emitting twice gives the same bytes. Sizes are kernel arguments (int32), so one kernel
serves every batch and sequence length.
"""

from __future__ import annotations

import linecache
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from sympy.printing.str import StrPrinter
from torch import fx

from lmforge.codegen.fusion import (
    ROW_REDUCTIONS,
    FusionGroup,
    Ranges,
    Shapes,
    TensorInfo,
    broadcast_index,
    is_index_op,
    keeps_dim,
    linear_offset,
    reshape_index,
    size_symbols,
)
from lmforge.compiler.layermap import role_of
from lmforge.errors import LmforgeError

aten = torch.ops.aten

COL = sympy.Symbol("col", integer=True, nonnegative=True)
MAX_TILE = 2048  # elements per program: BLOCK_R * BLOCK_C (a reduction over a wider row takes the whole row)
MAX_BLOCK_C = 1024  # columns per program when no reduction needs the whole row
ELEMENTS_PER_THREAD = 4  # of a tile, per thread: num_warps = tile / (32 * ELEMENTS_PER_THREAD), within 4..32
MIN_WARPS, MAX_WARPS = 4, 32

TL_DTYPE = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.int64: "tl.int64", torch.int32: "tl.int32", torch.bool: "tl.int1",
}
POINTER_TYPE = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1",
}


@dataclass
class EmittedKernel:
    """A generated kernel: its source (kept in artifacts under `kernels/<name>.py`), what it
    replaces, and what an ahead-of-time compiler needs: the jit function, the argument
    signature (`*fp32`, `i32`, `constexpr`) and the constexpr values known from the graph
    (`BLOCK_C` when the row width is static; `BLOCK_R` and `num_warps` are picked per launch
    from the row count, by `launch_config`)."""

    name: str
    source: str
    ops: list[str]
    group: FusionGroup
    signature: dict[str, str]
    constexprs: dict[str, int | None]
    launcher: Callable = field(repr=False)
    fn: Any = field(repr=False)


class _IndexPrinter(StrPrinter):
    """Prints index expressions as Python: `//` and `%` bind as tightly as `*`, so every
    operand that is not a single name or number is parenthesised (`(col + 64*i0_0) // (64*seq)`)."""

    def _operand(self, expr) -> str:
        text = self._print(expr)
        return text if expr.is_Atom else f"({text})"

    def _print_FloorDiv(self, expr) -> str:
        return f"({self._operand(expr.args[0])} // {self._operand(expr.args[1])})"

    def _print_Modulo(self, expr) -> str:
        return f"({self._operand(expr.args[0])} % {self._operand(expr.args[1])})"


def show(expr) -> str:
    return _IndexPrinter().doprint(sympy.sympify(expr))


def literal(value) -> str:
    if isinstance(value, bool):
        return repr(value)
    return repr(float(value))


@dataclass(frozen=True)
class _Context:
    """Where a value is computed: the extent of the column index, the mask naming it, the
    concatenation branches it sits in (for load masks) and the bounds of every index atom."""

    col_extent: sympy.Expr
    col_mask: str
    conditions: tuple = ()
    ranges: tuple = ()

    def range_map(self) -> Ranges:
        return dict(self.ranges)

    def narrowed(self, expr: sympy.Expr, low: sympy.Expr, high: sympy.Expr) -> _Context:
        """Inside a concatenation branch: `low <= expr < high`."""
        ranges = self.range_map()
        if expr in ranges:
            old_low, old_high = ranges[expr]
            ranges[expr] = (sympy.Max(old_low, low), sympy.Min(old_high, high - 1))
        return _Context(self.col_extent, self.col_mask, (*self.conditions, (expr, low, high)),
                        tuple(sorted(ranges.items(), key=lambda item: str(item[0]))))


def _tanh(value: str) -> str:
    """tanh from exp, with the sign split off so it cannot overflow: the same formula on
    every target (the interpreter has no `libdevice.tanh`)."""
    decay = f"tl.exp(-2.0 * tl.abs({value}))"
    return f"tl.where({value} >= 0, 1.0, -1.0) * (1.0 - {decay}) / (1.0 + {decay})"


def _pointwise_formula(node: fx.Node, operands: list[str], assign: Callable[[str], str]) -> str:
    """Triton expression of a pointwise op on fp32 operands (variable names or literals);
    `assign` names a subexpression used more than once."""
    target, a = node.target, operands
    if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        sign = "+" if target in (aten.add.Tensor, aten.add.Scalar) else "-"
        alpha = node.kwargs.get("alpha", 1)
        return f"{a[0]} {sign} {a[1]}" if alpha == 1 else f"{a[0]} {sign} {literal(alpha)} * {a[1]}"
    if target is aten.rsub.Scalar:
        return f"{a[1]} - {a[0]}"
    if target in (aten.mul.Tensor, aten.mul.Scalar):
        return f"{a[0]} * {a[1]}"
    if target in (aten.div.Tensor, aten.div.Scalar):
        return f"{a[0]} / {a[1]}"
    if target is aten.pow.Tensor_Scalar:
        exponent = float(node.args[1])
        if exponent.is_integer() and 1 <= exponent <= 4:
            return " * ".join([a[0]] * int(exponent))
        if exponent == 0.5:
            return f"tl.sqrt({a[0]})"
        if exponent == -1:
            return f"1.0 / {a[0]}"
        return f"tl.exp({literal(exponent)} * tl.log({a[0]}))"
    if target is aten.gelu.default:
        if node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh":
            inner = assign(f"0.7978845608028654 * ({a[0]} + 0.044715 * {a[0]} * {a[0]} * {a[0]})")
            return f"0.5 * {a[0]} * (1.0 + {_tanh(inner)})"
        return f"0.5 * {a[0]} * (1.0 + tl.erf({a[0]} * 0.7071067811865476))"
    unary = {
        aten.neg.default: "-{0}", aten.rsqrt.default: "tl.rsqrt({0})", aten.sqrt.default: "tl.sqrt({0})",
        aten.exp.default: "tl.exp({0})", aten.log.default: "tl.log({0})",
        aten.sigmoid.default: "tl.sigmoid({0})", aten.silu.default: "{0} * tl.sigmoid({0})",
        aten.relu.default: "tl.maximum({0}, 0.0)", aten.cos.default: "tl.cos({0})", aten.sin.default: "tl.sin({0})",
        aten.abs.default: "tl.abs({0})", aten.reciprocal.default: "1.0 / {0}",
        aten.to.dtype: "{0}", aten._to_copy.default: "{0}",
    }
    if target is aten.tanh.default:
        return _tanh(a[0])
    return unary[target].format(a[0])


class _KernelWriter:
    """Writes the body of one kernel: index atoms, loads, arithmetic and stores."""

    def __init__(self, group: FusionGroup, shapes: Shapes) -> None:
        self.group, self.shapes = group, shapes
        self.members = set(group.nodes)
        self.lines: list[str] = []
        self.memo: dict = {}
        self.loads: dict[str, str] = {}
        self.col_masks: dict[sympy.Expr, str] = {}
        self.row_atoms: dict[tuple, tuple] = {}
        self.count = 0

    def info(self, node: fx.Node) -> TensorInfo:
        info = self.shapes.get(node)
        if info is None:
            raise LmforgeError(f"triton codegen: no shape known for node {node.name}")
        return info

    def assign(self, expression: str) -> str:
        self.count += 1
        name = f"v{self.count}"
        self.lines.append(f"{name} = {expression}")
        return name

    def col_mask(self, extent: sympy.Expr) -> str:
        if extent not in self.col_masks:
            name = f"col_mask{len(self.col_masks)}"
            self.col_masks[extent] = name
            self.lines.append(f"{name} = col < {show(extent)}")
        return self.col_masks[extent]

    def atoms_for(self, lead: tuple) -> tuple:
        """Index atoms of the rows of an output whose leading dimensions are `lead`."""
        if lead not in self.row_atoms:
            number = len(self.row_atoms)
            atoms = []
            for k, size in enumerate(lead):
                if size == 1:
                    atoms.append(sympy.Integer(0))
                    continue
                atom = sympy.Symbol(f"i{number}_{k}", integer=True, nonnegative=True)
                inner = sympy.Mul(*lead[k + 1:])
                quotient = "row" if inner == 1 else f"row // ({show(inner)})"
                self.lines.append(f"{atom} = {quotient} % ({show(size)})")
                atoms.append(atom)
            self.row_atoms[lead] = tuple(atoms)
        return self.row_atoms[lead]

    # -- values ---------------------------------------------------------------------------

    def value(self, node: fx.Node, index: tuple, ctx: _Context) -> str:
        key = (node, index, ctx)
        if key not in self.memo:
            if node in self.members:
                self.memo[key] = self.compute(node, index, ctx)
            elif is_index_op(node, self.shapes):
                self.memo[key] = self.through_index(node, index, ctx)
            else:
                self.memo[key] = self.load(node, index, ctx)
        return self.memo[key]

    def as_fp32(self, node: fx.Node, index: tuple, ctx: _Context) -> str:
        value = self.value(node, index, ctx)
        return value if self.info(node).dtype == torch.float32 else f"{value}.to(tl.float32)"

    def rounded(self, expression: str, dtype: torch.dtype) -> str:
        return expression if dtype == torch.float32 else f"({expression}).to({TL_DTYPE[dtype]})"

    def compute(self, node: fx.Node, index: tuple, ctx: _Context) -> str:
        info = self.info(node)
        if node.target in ROW_REDUCTIONS:
            return self.reduce(node, index, ctx)
        operands = []
        for arg in node.args[:2] if node.target is not aten.gelu.default else node.args[:1]:
            if isinstance(arg, fx.Node):
                arg_shape = self.info(arg).shape
                operands.append(self.as_fp32(arg, broadcast_index(index, info.shape, arg_shape), ctx))
            elif isinstance(arg, (int, float, bool)):
                operands.append(literal(arg))
        return self.assign(self.rounded(_pointwise_formula(node, operands, self.assign), info.dtype))

    def reduce(self, node: fx.Node, index: tuple, ctx: _Context) -> str:
        source = node.args[0]
        width = self.info(source).shape[-1]
        outer = index[:-1] if keeps_dim(node) else index
        if COL in sympy.Tuple(*outer).free_symbols:
            raise LmforgeError(f"triton codegen: reduction {node.name} is read along its own row")
        ranges = ctx.range_map()
        ranges[COL] = (sympy.Integer(0), width - 1)
        inner = _Context(width, self.col_mask(width), _row_conditions(node, ctx.conditions),
                         tuple(sorted(ranges.items(), key=lambda item: str(item[0]))))
        values = self.as_fp32(source, (*outer, COL), inner)
        if node.target is aten.amax.default:
            total = f"tl.max(tl.where({inner.col_mask}, {values}, float('-inf')), axis=1, keep_dims=True)"
        else:
            total = f"tl.sum(tl.where({inner.col_mask}, {values}, 0.0), axis=1, keep_dims=True)"
            if node.target is aten.mean.dim:
                total = f"{total} / {show(width)}"
        return self.assign(self.rounded(total, self.info(node).dtype))

    def through_index(self, node: fx.Node, index: tuple, ctx: _Context) -> str:
        """The value of an index op at `index`: the value of what it views, re-indexed."""
        target, out_shape = node.target, self.info(node).shape
        if target is aten.cat.default:
            return self.concatenation(node, index, ctx)
        source = node.args[0]
        if target is operator.getitem:
            split = source
            source = split.args[0]
            in_shape = self.info(source).shape
            dim = (split.args[2] if len(split.args) > 2 else 0) % len(in_shape)
            start = sum((self.shapes.info[split][k].shape[dim] for k in range(node.args[1])), sympy.Integer(0))
            return self.value(source, _shifted(index, dim, start), ctx)
        in_shape = self.info(source).shape
        ranges = ctx.range_map()
        if target in (aten.transpose.int, aten.t.default):
            first, second = (node.args[1], node.args[2]) if target is aten.transpose.int else (0, 1)
            first, second = first % len(out_shape), second % len(out_shape)
            mapped = list(index)
            mapped[first], mapped[second] = index[second], index[first]
            return self.value(source, tuple(mapped), ctx)
        if target is aten.permute.default:
            mapped = [sympy.Integer(0)] * len(index)
            for position, dim in enumerate(node.args[1]):
                mapped[dim % len(index)] = index[position]
            return self.value(source, tuple(mapped), ctx)
        if target is aten.slice.Tensor:
            dim = (node.args[1] if len(node.args) > 1 else 0) % len(in_shape)
            start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
            start = start + in_shape[dim] if start < 0 else start
            return self.value(source, _shifted(index, dim, start), ctx)
        if target is aten.select.int:
            dim = node.args[1] % len(in_shape)
            position = node.args[2] + in_shape[dim] if node.args[2] < 0 else node.args[2]
            return self.value(source, (*index[:dim], sympy.sympify(position), *index[dim:]), ctx)
        if target is aten.expand.default:
            return self.value(source, broadcast_index(index, out_shape, in_shape), ctx)
        if tuple(in_shape) == tuple(out_shape):
            return self.value(source, index, ctx)
        return self.value(source, reshape_index(index, out_shape, in_shape, ranges), ctx)

    def concatenation(self, node: fx.Node, index: tuple, ctx: _Context) -> str:
        parts = [part for part in node.args[0] if self.info(part).shape]
        rank = len(self.info(node).shape)
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        position = index[dim]
        branches, start = [], sympy.Integer(0)
        for part in parts:
            size = self.info(part).shape[dim]
            if size == 0:
                continue
            inner = ctx.narrowed(position, start, start + size)
            branches.append((start + size, self.value(part, _shifted(index, dim, -start), inner)))
            start = start + size
        result = branches[-1][1]
        for end, branch in reversed(branches[:-1]):
            result = self.assign(f"tl.where({show(position)} < {show(end)}, {branch}, {result})")
        return result

    def load(self, node: fx.Node, index: tuple, ctx: _Context) -> str:
        info = self.info(node)
        offset = linear_offset(index, info.shape)
        symbols = offset.free_symbols
        mask = [ctx.col_mask] if COL in symbols else []
        for expr, low, high in ctx.conditions:
            if expr.free_symbols & symbols:
                mask.append(f"({show(expr)} >= {show(low)})" if low != 0 else "")
                mask.append(f"({show(expr)} < {show(high)})")
        mask = [part for part in mask if part]
        pointer = f"in_{node.name} + {show(offset)}" if offset != 0 else f"in_{node.name}"
        if mask:
            other = "0" if info.dtype in (torch.int64, torch.int32, torch.bool) else "0.0"
            expression = f"tl.load({pointer}, mask={' & '.join(mask)}, other={other})"
        else:
            expression = f"tl.load({pointer})"
        if expression not in self.loads:  # the same element read under another context
            self.loads[expression] = self.assign(expression)
        return self.loads[expression]

    # -- outputs --------------------------------------------------------------------------

    def store(self, node: fx.Node) -> None:
        shape = self.info(node).shape
        lead, width = shape[:-1], shape[-1]
        atoms = self.atoms_for(tuple(lead))
        col_mask = self.col_mask(width)
        ranges = {atom: (sympy.Integer(0), size - 1) for atom, size in zip(atoms, lead) if atom != 0}
        ranges[COL] = (sympy.Integer(0), width - 1)
        ctx = _Context(width, col_mask, (), tuple(sorted(ranges.items(), key=lambda item: str(item[0]))))
        last = COL if width != 1 else sympy.Integer(0)
        value = self.value(node, (*atoms, last), ctx)
        rows = sympy.Mul(*lead)
        self.lines.append(
            f"tl.store(out_{node.name} + row * {show(width)} + col, {value}, mask=(row < {show(rows)}) & {col_mask})"
        )


def _row_conditions(node: fx.Node, conditions: tuple) -> tuple:
    """The concatenation branches a row reduction's loads stay inside. A branch over the
    reader's columns only (RoPE's rotated halves reading a per-head norm) is dropped: the
    reduction's row does not depend on the reader's column, and inside the reduction `col`
    runs over the reduced row instead. A branch mixing the column with row indices would
    say which rows exist, so it cannot be dropped."""
    kept = []
    for condition in conditions:
        symbols = condition[0].free_symbols
        if COL not in symbols:
            kept.append(condition)
        elif symbols != {COL}:
            raise LmforgeError(f"triton codegen: reduction {node.name} is read in a branch over its row and column")
    return tuple(kept)


def _shifted(index: tuple, dim: int, amount) -> tuple:
    return (*index[:dim], sympy.expand(index[dim] + amount), *index[dim + 1:])


def _header(name: str, group: FusionGroup) -> list[str]:
    rows = [f"# {name}: one kernel for {len(group.nodes)} graph nodes"
            f"{f' (and {len(group.absorbed)} index ops it reads through)' if group.absorbed else ''}",
            "#   layer  role              node                 op"]
    for node in group.nodes:
        layer, role = role_of(node)
        rows.append(f"#   {'-' if layer is None else layer:<5}  {role or '-':<16}  {node.name:<19}  {_op_name(node)}")
    if group.absorbed:
        rows.append("# index ops read through: " + ", ".join(node.name for node in group.absorbed))
    return rows


def _op_name(node: fx.Node) -> str:
    return str(node.target) if not callable(node.target) or hasattr(node.target, "_schema") else node.target.__name__


def replaced_ops(group: FusionGroup) -> list[str]:
    """`node (op)` for every graph node a kernel replaces, compute nodes first."""
    return [f"{node.name} ({_op_name(node)})" for node in (*group.nodes, *group.absorbed)]


def emit_source(name: str, group: FusionGroup, shapes: Shapes) -> tuple[str, dict[str, str], dict[str, int | None]]:
    """Source of one kernel module, its argument signature and its known constexprs."""
    writer = _KernelWriter(group, shapes)
    for node in group.outputs:
        writer.lines.append(f"# {node.name}: {tuple(show(s) for s in writer.info(node).shape)}".replace("'", ""))
        writer.store(node)
    symbols = size_symbols(group, shapes)
    inputs = [f"in_{node.name}" for node in group.inputs]
    outputs = [f"out_{node.name}" for node in group.outputs]
    parameters = [*inputs, *outputs, *(s.name for s in symbols), "BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"]
    reduces = group.reductions > 0
    widths = [writer.info(node).shape[-1] for node in group.outputs]
    widths += [writer.info(node.args[0]).shape[-1] for node in group.nodes if node.target in ROW_REDUCTIONS]
    widest = sympy.Max(*widths) if len(widths) > 1 else widths[0]
    rows = [sympy.Mul(*writer.info(node).shape[:-1]) for node in group.outputs]
    signature = {arg: POINTER_TYPE[writer.info(node).dtype] for arg, node in zip(inputs, group.inputs)}
    signature.update({arg: POINTER_TYPE[writer.info(node).dtype] for arg, node in zip(outputs, group.outputs)})
    signature.update({s.name: "i32" for s in symbols})
    signature.update({"BLOCK_R": "constexpr", "BLOCK_C": "constexpr"})
    block_c = None
    if widest.is_number:
        block_c = _next_power_of_2(int(widest))
        block_c = block_c if reduces else min(block_c, MAX_BLOCK_C)
    source = [*_header(name, group), "import torch", "import triton", "import triton.language as tl", "", "", "@triton.jit",
              f"def {name}_kernel({', '.join(parameters)}):",
              "    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
              "    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]"]
    source += [f"    {line}" for line in writer.lines]
    source += ["", "", *_launcher(name, group, writer, symbols, widest, rows, block_c, reduces)]
    return "\n".join(source) + "\n", signature, {"BLOCK_C": block_c, "BLOCK_R": None}


def _launcher(name, group, writer, symbols, widest, rows, block_c, reduces) -> list[str]:
    arguments = [f"in_{node.name}" for node in group.inputs]
    size_arguments = [f"sizes_{node.name}" for node in group.size_inputs]
    lines = [f"def {name}({', '.join([*arguments, *size_arguments])}):",
             f'    """Launch {name}_kernel; returns ({", ".join(node.name for node in group.outputs)})."""']
    for symbol in symbols:
        found = next(((argument, dim) for argument, node in zip([*arguments, *size_arguments], group.launch_arguments)
                      for dim, size in enumerate(writer.info(node).shape) if size == symbol), None)
        if found is None:
            raise LmforgeError(f"triton codegen: size {symbol} of kernel {name} is not the size of any input")
        lines.append(f"    {symbol.name} = {found[0]}.shape[{found[1]}]")
    for argument in arguments:
        lines.append(f"    {argument} = {argument}.contiguous()")
    device = f"in_{group.inputs[0].name}.device"
    for node in group.outputs:
        info = writer.info(node)
        shape = ", ".join(show(size) for size in info.shape)
        lines.append(f"    out_{node.name} = torch.empty(({shape},), dtype={info.dtype}, device={device})")
    row_count = show(sympy.Max(*rows)) if len(rows) > 1 else show(rows[0])
    lines.append(f"    rows = {row_count}")
    # an empty launch (a step whose logits nobody needs) runs no program: a program would
    # divide by the zero sizes recovering its row's indices
    empty = ["rows == 0"] + ([f"{show(widest)} == 0"] if not widest.is_number or widest == 0 else [])
    lines.append(f"    if {' or '.join(empty)}:")
    lines.append(f"        return ({''.join(f'out_{node.name}, ' for node in group.outputs)})")
    if block_c is not None:
        lines.append(f"    BLOCK_C = {block_c}")
    else:
        cap = "" if reduces else f", {MAX_BLOCK_C}"
        lines.append(f"    BLOCK_C = min(triton.next_power_of_2({show(widest)}){cap})" if cap
                     else f"    BLOCK_C = triton.next_power_of_2({show(widest)})")
    lines.append(f"    BLOCK_R = min(triton.next_power_of_2(rows), max(1, {MAX_TILE} // BLOCK_C))")
    lines.append(f"    num_warps = min({MAX_WARPS}, max({MIN_WARPS}, BLOCK_R * BLOCK_C // {32 * ELEMENTS_PER_THREAD}))")
    lines.append(f"    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv({show(widest)}, BLOCK_C))")
    call = [*arguments, *(f"out_{node.name}" for node in group.outputs), *(s.name for s in symbols)]
    lines.append(f"    {name}_kernel[grid]({', '.join(call)}, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps)")
    lines.append(f"    return ({''.join(f'out_{node.name}, ' for node in group.outputs)})")
    return lines


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def launch_config(rows: int, block_c: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps) of a launch over `rows` rows of `block_c` columns, as every
    generated launcher picks them: as many rows as fit a tile of MAX_TILE elements, and
    warps enough that each thread holds ELEMENTS_PER_THREAD elements of the tile.

    Why: every value a kernel keeps live costs each thread one register per element it
    holds, and a fused kernel keeps several (RoPE: the input, its rotated half, cos and
    sin, in fp32). On sm_80, ref-llama-py's RoPE on a 4096-element tile and 4 warps (32
    elements per thread) took 253 registers; 2048 elements on 8 warps (8 per thread), 106.
    Above 128 registers per thread a streaming multiprocessor holds at most 16 warps, too
    few to hide memory latency in kernels that only stream memory. 4 elements per thread,
    not 8: a tiny fp16 Llama's RoPE (head_dim 16) at 8 per thread spilled on sm_80 (80
    registers and 4 bytes of spills, whatever the tile); at 4 it took 56-60. The launcher's
    source spells out the same arithmetic (`_launcher`); `codegen/aot.py` compiles with
    this function's answer."""
    block_r = min(_next_power_of_2(max(rows, 1)), max(1, MAX_TILE // block_c))
    return block_r, min(MAX_WARPS, max(MIN_WARPS, block_r * block_c // (32 * ELEMENTS_PER_THREAD)))


def load_source(name: str, source: str) -> dict:
    """Execute a kernel module's source. The source is registered with `linecache` first,
    because `triton.jit` reads a kernel's source through `inspect`."""
    filename = f"<lmforge-triton:{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": f"lmforge_triton_{name}"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def kernel_name(group: FusionGroup) -> str:
    return f"{group.kind}_l{group.layer}" if group.layer is not None else group.kind


def emit_group(name: str, group: FusionGroup, shapes: Shapes) -> EmittedKernel:
    source, signature, constexprs = emit_source(name, group, shapes)
    namespace = load_source(name, source)
    return EmittedKernel(name, source, replaced_ops(group), group, signature, constexprs,
                         namespace[name], namespace[f"{name}_kernel"])
