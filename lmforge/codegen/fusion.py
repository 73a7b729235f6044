"""Fusion partitioner: which graph nodes run together as one generated kernel.

A decode step at small batch is bound by launches and memory traffic, not arithmetic: each
pointwise op left alone reads and writes a whole activation. The partitioner groups the
pointwise ops between the matrix products and lmforge's attention ops into kernels:
maximal connected groups with at most one row reduction (RMSNorm with its scale, a residual
add with the next norm, RoPE of q and k together, SiLU·mul of the fused gate/up output,
a logit soft-cap). Matrix products, attention ops and anything else stay where they are.

Views, reshapes, transposes, slices, splits and concatenations are *index ops*: they belong
to no group; a kernel reads through them with index arithmetic (`index_of` below), so they
cost nothing inside a kernel and stay plain torch views for any other reader.

Shapes are sympy expressions in the program's symbolic sizes (`batch`, `seq`, taken from
torch.export's SymInts in `node.meta["val"]`), so one kernel serves every length. The
partition is deterministic: groups are formed in graph order and listed in graph order.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
from torch import fx

from lmforge.compiler.layermap import role_of
from lmforge.compiler.ops import last_position

aten = torch.ops.aten

POINTWISE = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default,
    aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.log.default,
    aten.tanh.default, aten.sigmoid.default, aten.silu.default, aten.gelu.default, aten.relu.default,
    aten.cos.default, aten.sin.default, aten.abs.default, aten.reciprocal.default,
    aten.to.dtype, aten._to_copy.default,
})
ROW_REDUCTIONS = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.amax.default})
_RESHAPES = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
})
_IDENTITIES = frozenset({aten.clone.default, aten.alias.default, aten.contiguous.default})
INDEX_OPS = _RESHAPES | _IDENTITIES | frozenset({
    aten.transpose.int, aten.permute.default, aten.t.default, aten.slice.Tensor, aten.select.int,
    aten.expand.default, aten.cat.default, aten.split_with_sizes.default, aten.split.Tensor,
})
_SPLITS = frozenset({aten.split_with_sizes.default, aten.split.Tensor})
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Shape = tuple[sympy.Expr, ...]


@dataclass(frozen=True)
class TensorInfo:
    shape: Shape
    dtype: torch.dtype


class FloorDiv(sympy.Function):
    """Integer division of non-negative index expressions (kept unevaluated for printing)."""

    is_integer = True
    is_nonnegative = True


class Modulo(sympy.Function):
    """Remainder of a non-negative index expression (kept unevaluated for printing)."""

    is_integer = True
    is_nonnegative = True


def size_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


class Shapes:
    """Symbolic shape and dtype of every tensor node, with export's size symbols renamed
    after the inputs they come from (`batch`, `seq`), so generated code reads well and does
    not depend on the numbering of one export."""

    def __init__(self, graph: fx.Graph) -> None:
        self.renames: dict[sympy.Symbol, sympy.Symbol] = {}
        self.info: dict[fx.Node, TensorInfo | tuple[TensorInfo, ...]] = {}
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        for node in placeholders[:1]:
            for name, size in zip(("batch", "seq"), _raw_shape(node)):
                if isinstance(size, sympy.Symbol):
                    self.renames[size] = size_symbol(name)
        for node in graph.nodes:
            info = self._infer(node)
            if info is not None:
                self.info[node] = info

    def _expr(self, size) -> sympy.Expr:
        expr = sympy.sympify(size.node.expr if isinstance(size, torch.SymInt) else int(size))
        for symbol in sorted(expr.free_symbols - set(self.renames), key=str):
            self.renames[symbol] = size_symbol(f"size{len(self.renames)}")
        return expr.xreplace(self.renames)

    def _from_value(self, value) -> TensorInfo | None:
        if isinstance(value, torch.Tensor):
            return TensorInfo(tuple(self._expr(size) for size in value.shape), value.dtype)
        return None

    def _infer(self, node: fx.Node):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return self._from_value(value)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return tuple(self._from_value(v) for v in value)
        if node.op == "get_attr":
            return None
        # nodes created by passes without fake values: the few kinds fuse_projections adds
        if node.target is aten.linear.default:
            source, weight = self.get(node.args[0]), self.get(node.args[1])
            if source is not None and weight is not None:
                return TensorInfo((*source.shape[:-1], weight.shape[0]), source.dtype)
        if node.target in _SPLITS:
            source = self.get(node.args[0])
            if source is None:
                return None
            dim = node.args[2] if len(node.args) > 2 else 0
            dim = dim % len(source.shape)
            sizes = _split_sizes(node, source.shape[dim])
            return tuple(TensorInfo(_replace(source.shape, dim, size), source.dtype) for size in sizes)
        if node.target is operator.getitem and isinstance(self.info.get(node.args[0]), tuple):
            return self.info[node.args[0]][node.args[1]]
        if node.target is last_position and isinstance(self.info.get(node.args[0]), TensorInfo):
            return self.info[node.args[0]]
        return None

    def get(self, node) -> TensorInfo | None:
        if not isinstance(node, fx.Node):
            return None
        info = self.info.get(node)
        if info is None and node.op == "get_attr":
            value = getattr(node.graph.owning_module, node.target, None)
            info = self._from_value(value)
            if info is not None:
                self.info[node] = info
        return info if isinstance(info, TensorInfo) else None


def _raw_shape(node: fx.Node) -> list:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return []
    return [sympy.sympify(s.node.expr) if isinstance(s, torch.SymInt) else int(s) for s in value.shape]


def _replace(shape: Shape, dim: int, size) -> Shape:
    return (*shape[:dim], sympy.sympify(size), *shape[dim + 1:])


def _split_sizes(node: fx.Node, total: sympy.Expr) -> list:
    if node.target is aten.split_with_sizes.default:
        return list(node.args[1])
    step = node.args[1]
    count = int(sympy.ceiling(total / step))
    return [step] * (count - 1) + [total - step * (count - 1)]


def is_size(node: fx.Node) -> bool:
    """A symbolic size (`sym_size` and arithmetic on it): kernels take sizes from the shapes
    of their tensors instead."""
    return isinstance(node.meta.get("val"), (torch.SymInt, int)) or node.target is aten.sym_size.int


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensors a node reads, in argument order (lists flattened, as for cat)."""
    found: list[fx.Node] = []
    for arg in (*node.args, *node.kwargs.values()):
        for item in (arg if isinstance(arg, (list, tuple)) else (arg,)):
            if isinstance(item, fx.Node) and not is_size(item) and item not in found:
                found.append(item)
    return found


def is_index_op(node: fx.Node, shapes: Shapes) -> bool:
    """A view-like node a kernel can read through with index arithmetic."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and source.target in _SPLITS and is_index_op(source, shapes)
    if node.target not in INDEX_OPS:
        return False
    if node.target in _SPLITS:
        return isinstance(shapes.info.get(node), tuple) and shapes.get(node.args[0]) is not None
    if node.target in (aten.slice.Tensor, aten.select.int) and not all(
            arg is None or isinstance(arg, int) for arg in node.args[1:]):
        return False  # symbolic bounds: left to torch
    if node.target is aten.slice.Tensor and (len(node.args) > 4 and node.args[4] != 1):
        return False
    return shapes.get(node) is not None and all(shapes.get(arg) is not None for arg in tensor_args(node))


def is_compute(node: fx.Node, shapes: Shapes) -> bool:
    """A pointwise op or a reduction over the last dimension, on floating-point values."""
    if node.op != "call_function" or not (node.target in POINTWISE or node.target in ROW_REDUCTIONS):
        return False
    info = shapes.get(node)
    if info is None or info.dtype not in FLOAT_DTYPES or not info.shape:
        return False
    if node.target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
        return False
    if node.target in ROW_REDUCTIONS:
        return reduced_dim(node, shapes) is not None
    return all(shapes.get(arg) is not None for arg in tensor_args(node))


def reduced_dim(node: fx.Node, shapes: Shapes) -> int | None:
    """The dimension a row reduction runs over when it is the last one alone, else None."""
    source = shapes.get(node.args[0])
    if source is None or not source.shape:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    rank = len(source.shape)
    if len(dims) != 1 or dims[0] % rank != rank - 1:
        return None
    return rank - 1


def keeps_dim(node: fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


@dataclass
class FusionGroup:
    """One kernel: its compute nodes, the tensors it reads and the values it writes."""

    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    absorbed: list[fx.Node] = field(default_factory=list)  # index ops only this group reads
    layer: int | None = None
    kind: str = "pointwise"
    size_inputs: list[fx.Node] = field(default_factory=list)  # placeholders read only for their sizes

    @property
    def reductions(self) -> int:
        return sum(node.target in ROW_REDUCTIONS for node in self.nodes)

    @property
    def launch_arguments(self) -> list[fx.Node]:
        """What the group's launcher is called with: its inputs, then the size inputs."""
        return [*self.inputs, *self.size_inputs]


@dataclass
class Partition:
    groups: list[FusionGroup]
    shapes: Shapes
    graph: nx.DiGraph  # the data-flow graph the groups were checked against (index ops contracted)


def sources(node: fx.Node, shapes: Shapes) -> list[fx.Node]:
    """What `node` reads, looking through index ops to the tensors they view."""
    found: list[fx.Node] = []
    for arg in tensor_args(node):
        for source in (sources(arg, shapes) if is_index_op(arg, shapes) else [arg]):
            if source not in found:
                found.append(source)
    return found


def dataflow_graph(graph: fx.Graph, shapes: Shapes) -> nx.DiGraph:
    """DiGraph of the non-index nodes, an edge wherever one reads the other directly or
    through index ops: the graph in which a group must not close a cycle."""
    flow = nx.DiGraph()
    for position, node in enumerate(graph.nodes):
        if is_index_op(node, shapes):
            continue
        flow.add_node(node, position=position)
        for source in sources(node, shapes):
            flow.add_edge(source, node)
    return flow


class _Grouping:
    """Union of compute nodes into groups, with the checks every merge must pass."""

    def __init__(self, flow: nx.DiGraph, compute: list[fx.Node]) -> None:
        self.flow = flow
        self.position = {node: flow.nodes[node]["position"] for node in flow.nodes}
        self.group_of = {node: index for index, node in enumerate(compute)}
        self.members = {index: [node] for index, node in enumerate(compute)}

    def reductions(self, group: int) -> int:
        return sum(node.target in ROW_REDUCTIONS for node in self.members[group])

    def layer(self, group: int) -> int | None:
        layers = [role_of(node)[0] for node in self.members[group] if role_of(node)[0] is not None]
        return max(layers) if layers else None

    def closes_cycle(self, merged: set[fx.Node]) -> bool:
        """True when some node outside `merged` is reachable from it and reaches it: the
        group could then not run as one kernel. Searches only nodes placed before the
        group's last member (edges go forward in graph order), jumping through other groups
        as wholes, since each of them runs as one kernel too."""
        last = max(self.position[node] for node in merged)
        seen: set = set()
        frontier = deque(succ for node in merged for succ in self.flow.successors(node) if succ not in merged)
        while frontier:
            node = frontier.popleft()
            if node in seen:
                continue
            group = self.group_of.get(node)
            members = self.members[group] if group is not None else [node]
            if min(self.position[member] for member in members) > last:
                continue
            seen.update(members)
            for member in members:
                for succ in self.flow.successors(member):
                    if succ in merged:
                        return True
                    if succ not in seen:
                        frontier.append(succ)
        return False

    def try_merge(self, a: int, b: int) -> bool:
        if a == b or self.reductions(a) + self.reductions(b) > 1:
            return False
        if self.closes_cycle(set(self.members[a]) | set(self.members[b])):
            return False
        keep, drop = min(a, b), max(a, b)
        dropped = self.members.pop(drop)
        for node in dropped:
            self.group_of[node] = keep
        self.members[keep] = sorted([*self.members[keep], *dropped], key=self.position.__getitem__)
        return True


def partition(graph_module: fx.GraphModule) -> Partition:
    """Group the graph's pointwise ops and row reductions into kernels."""
    graph = graph_module.graph
    shapes = Shapes(graph)
    flow = dataflow_graph(graph, shapes)
    compute = [node for node in graph.nodes if is_compute(node, shapes)]
    grouping = _Grouping(flow, compute)
    # vertical: a compute node joins the groups of the compute nodes it reads
    for node in compute:
        for source in sources(node, shapes):
            if source in grouping.group_of:
                grouping.try_merge(grouping.group_of[node], grouping.group_of[source])
    # horizontal: groups of one layer reading the same tensor run as one kernel (q and k RoPE)
    for node in flow.nodes:
        readers = sorted({grouping.group_of[user] for user in flow.successors(node) if user in grouping.group_of})
        for other in readers[1:]:
            if grouping.layer(readers[0]) == grouping.layer(other):
                grouping.try_merge(readers[0], other)
    groups = [_describe(grouping.members[key], shapes, flow) for key in sorted(grouping.members)]
    groups.sort(key=lambda group: grouping.position[group.nodes[0]])
    return Partition(groups, shapes, flow)


def _describe(members: list[fx.Node], shapes: Shapes, flow: nx.DiGraph) -> FusionGroup:
    inside = set(members)
    inputs: list[fx.Node] = []
    for node in members:
        for source in sources(node, shapes):
            if source not in inside and source not in inputs:
                inputs.append(source)
    absorbed = _absorbed_index_ops(members, shapes)
    outputs = [node for node in members if any(user not in inside and user not in absorbed for user in node.users)]
    layers = [role_of(node)[0] for node in members if role_of(node)[0] is not None]
    group = FusionGroup(members, inputs, outputs, absorbed, max(layers) if layers else None)
    group.kind = kernel_kind(group)
    group.size_inputs = _size_inputs(group, shapes)
    return group


def size_symbols(group: FusionGroup, shapes: Shapes) -> list[sympy.Symbol]:
    """The symbolic sizes in the shapes a group reads, computes or reads through (`batch`
    and `seq` first): the size arguments of its kernel."""
    found: set = set()
    for node in (*group.inputs, *group.nodes, *group.absorbed):
        info = shapes.info.get(node)
        for item in (info if isinstance(info, tuple) else (info,)):
            if isinstance(item, TensorInfo):
                for size in item.shape:
                    found |= sympy.sympify(size).free_symbols
    order = {"batch": 0, "seq": 1}
    return sorted(found, key=lambda symbol: (order.get(symbol.name, 2), symbol.name))


def _size_inputs(group: FusionGroup, shapes: Shapes) -> list[fx.Node]:
    """Graph inputs a group's launcher needs only for a size that none of its tensors has as
    a whole dimension: a kernel reading the `[batch*seq, n]` output of a matrix product and
    writing `[batch, seq, n]` learns `batch` from `input_ids`. Empty for most groups."""
    carried = {size for node in group.inputs if shapes.get(node) is not None for size in shapes.get(node).shape}
    placeholders = [node for node in group.nodes[0].graph.nodes if node.op == "placeholder"]
    needed: list[fx.Node] = []
    for symbol in size_symbols(group, shapes):
        if symbol in carried:
            continue
        source = next((node for node in placeholders if shapes.get(node) is not None
                       and symbol in shapes.get(node).shape), None)
        if source is not None and source not in needed:
            needed.append(source)
    return needed


def _absorbed_index_ops(members: list[fx.Node], shapes: Shapes) -> list[fx.Node]:
    """Index ops every reader of which is in the group (directly or through such ops):
    they disappear with the group. Decided readers first (reverse graph order)."""
    reachable: set[fx.Node] = set()
    frontier = [arg for node in members for arg in tensor_args(node) if is_index_op(arg, shapes)]
    while frontier:
        node = frontier.pop()
        if node not in reachable:
            reachable.add(node)
            frontier.extend(arg for arg in tensor_args(node) if is_index_op(arg, shapes))
    order = {node: i for i, node in enumerate(members[0].graph.nodes)}
    inside, absorbed = set(members), set()
    for node in sorted(reachable, key=order.__getitem__, reverse=True):
        if all(user in inside or user in absorbed for user in node.users):
            absorbed.add(node)
    return sorted(absorbed, key=order.__getitem__)


def kernel_kind(group: FusionGroup) -> str:
    """What a group computes, in words for its kernel's name: `rmsnorm_residual`, `rope`,
    `silu_mul`, `gelu_tanh`, `softcap`, ... (parts in a fixed order)."""
    targets = {node.target for node in group.nodes}
    roles = {role_of(node)[1] for node in group.nodes}
    parts = []
    if aten.rsqrt.default in targets and targets & ROW_REDUCTIONS:
        parts.append("rmsnorm")
    elif targets & ROW_REDUCTIONS:
        parts.append("reduce")
    if "residual_add" in roles:
        parts.append("residual")
    if targets & ROW_REDUCTIONS:
        parts.extend(_norm_label(group))
    if aten.neg.default in targets and (aten.cos.default in targets or "attention_other" in roles):
        parts.append("rope")
    elif aten.cos.default in targets:
        parts.append("rotary_table")
    if aten.silu.default in targets:
        parts.append("silu_mul" if aten.mul.Tensor in targets else "silu")
    if aten.gelu.default in targets:
        parts.append("gelu_mul" if aten.mul.Tensor in targets else "gelu")
    if aten.tanh.default in targets and aten.pow.Tensor_Scalar in targets and not parts:
        parts.append("gelu_tanh")  # GPT-2's gelu_new written out: 0.5·x·(1 + tanh(c·(x + 0.044715·x³)))
    elif aten.tanh.default in targets and not parts:
        parts.append("softcap")
    return "_".join(parts) or "pointwise"


def computes_final_norm(group: FusionGroup) -> bool:
    """Whether the group's row reduction is the model's final norm, the one after the last
    layer: captured inside a module (the graph still says where it came from) that is none
    of the decoder layers."""
    reduction = next((node for node in group.nodes if node.target in ROW_REDUCTIONS), None)
    return reduction is not None and bool(reduction.meta.get("nn_module_stack")) and role_of(reduction)[0] is None


def _norm_label(group: FusionGroup) -> list[str]:
    """Which norm a group's reduction belongs to, from its module name in the captured model:
    `input` (input_layernorm), `post_attention`, `pre_feedforward`, ...; `final` for the
    norm after the last layer; nothing when the graph no longer says."""
    reduction = next(node for node in group.nodes if node.target in ROW_REDUCTIONS)
    stack = reduction.meta.get("nn_module_stack")
    if not stack:
        return []
    if computes_final_norm(group):
        return ["final"]
    leaf = list(stack.values())[-1][0].rsplit(".", 1)[-1]
    label = leaf.replace("layernorm", "").replace("layer_norm", "").replace("norm", "").strip("_")
    return [label] if label.isidentifier() else []


# ---- index arithmetic ---------------------------------------------------------------

Ranges = dict  # atom symbol -> (low, high) inclusive bounds


def bounds(expr: sympy.Expr, ranges: Ranges) -> tuple[sympy.Expr, sympy.Expr] | None:
    """Inclusive bounds of an index expression that is a sum of non-negative multiples of
    atoms, or None when that shape of expression is not recognised."""
    expr = sympy.expand(expr)
    low, high = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(expr):
        coefficient, atoms = sympy.Integer(1), []
        for factor in sympy.Mul.make_args(term):
            if factor in ranges or isinstance(factor, (FloorDiv, Modulo)):
                atoms.append(factor)
            else:
                coefficient *= factor
        if len(atoms) > 1 or (coefficient.is_nonnegative is not True and atoms):
            return None
        if not atoms:
            low, high = low + coefficient, high + coefficient
            continue
        (atom,) = atoms
        if isinstance(atom, Modulo):
            atom_low, atom_high = sympy.Integer(0), atom.args[1] - 1
        elif isinstance(atom, FloorDiv):
            inner = bounds(atom.args[0], ranges)
            if inner is None or not (inner[1].is_number and atom.args[1].is_number):
                return None
            atom_low, atom_high = sympy.Integer(0), sympy.floor(inner[1] / atom.args[1])
        else:
            atom_low, atom_high = ranges[atom]
        low, high = low + coefficient * atom_low, high + coefficient * atom_high
    return low, high


def _split_multiples(expr: sympy.Expr, divisor: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    quotient, rest = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(sympy.expand(expr)):
        ratio = sympy.cancel(term / divisor)
        if ratio.is_integer:
            quotient += ratio
        else:
            rest += term
    return quotient, rest


def _provably_below(expr_bounds, limit: sympy.Expr) -> bool:
    if expr_bounds is None:
        return False
    low, high = expr_bounds
    return bool(sympy.expand(low).is_nonnegative) and bool(sympy.expand(limit - 1 - high).is_nonnegative)


def floordiv(expr: sympy.Expr, divisor: sympy.Expr, ranges: Ranges) -> sympy.Expr:
    if divisor == 1:
        return expr
    quotient, rest = _split_multiples(expr, divisor)
    if rest == 0 or _provably_below(bounds(rest, ranges), divisor):
        return quotient
    return quotient + FloorDiv(rest, divisor)


def modulo(expr: sympy.Expr, divisor: sympy.Expr, ranges: Ranges) -> sympy.Expr:
    if divisor == 1:
        return sympy.Integer(0)
    _, rest = _split_multiples(expr, divisor)
    if _provably_below(bounds(rest, ranges), divisor):
        return rest
    return Modulo(rest, divisor)


def contiguous_strides(shape: Shape) -> Shape:
    strides, running = [], sympy.Integer(1)
    for size in reversed(shape):
        strides.append(running)
        running = running * size
    return tuple(reversed(strides))


def linear_offset(index: tuple, shape: Shape) -> sympy.Expr:
    return sympy.expand(sum((i * s for i, s in zip(index, contiguous_strides(shape))), sympy.Integer(0)))


def reshape_index(index: tuple, out_shape: Shape, in_shape: Shape, ranges: Ranges) -> tuple:
    """Index into a tensor from the index into a reshape of it (row-major order)."""
    flat = linear_offset(index, out_shape)
    return tuple(modulo(floordiv(flat, stride, ranges), size, ranges) if size != 1 else sympy.Integer(0)
                 for stride, size in zip(contiguous_strides(in_shape), in_shape))


def broadcast_index(index: tuple, out_shape: Shape, in_shape: Shape) -> tuple:
    """Index into an operand broadcast to `out_shape`."""
    lead = len(out_shape) - len(in_shape)
    return tuple(sympy.Integer(0) if size == 1 and out_shape[lead + k] != 1 else index[lead + k]
                 for k, size in enumerate(in_shape))
