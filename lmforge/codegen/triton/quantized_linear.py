"""Linear layers whose weights the `quantize` pass stores as int8 or int4 codes, multiplied by
one Triton kernel that reads the codes and dequantizes them in registers.

The program graph dequantizes every weight with ATen ops on every call and then multiplies
by the fp32 result (`compiler/quantized.dequantize_nodes`): at batch 1 that reads the codes,
writes and re-reads a full-precision copy of every weight each step, more bytes than the
unquantized model. Here the kernel loads the codes (1 byte or half a byte per weight) and
converts them next to the multiply, accumulating in fp32:

- `int8`, symmetric per output channel: the codes are exact in fp16 and fp32, so the tile is
  the codes converted to the activation dtype and each output's scale multiplies its
  accumulated sum once, after the loop (`w = q * scale` factors out of the sum).
- `int4`, asymmetric per group of input columns: each byte holds two codes (column `2i` in
  the low nibble); a tile of bytes is split into nibbles and interleaved back into column
  order (`tl.join` + `tl.reshape`), and each code becomes `q * scale + zero` with its group's
  fp16 scale and zero point, in fp32, then the activation dtype for `tl.dot`. Any even group
  size the pass allows works: the group of a column is `column // GROUP_SIZE`.

One kernel serves two configurations (`launch_config`):

- up to `GEMV_ROWS` rows (a decode step, a speculative verify forward): a split-K GEMV. Few
  rows give few tiles of outputs, so the input columns are also split into ranges, one
  program per (output block, range); a second kernel adds the ranges' fp32 partial sums in
  range order (`split_k_combine`). The split count and tiles depend on the weight's shape
  only, never on the rows, so a row's result is the same bits at 1 row as at 11:
  speculative decoding checks a draft with several rows and must reproduce the one-row
  greedy tokens. One split writes the answer directly.
- more rows (a prefill): a tiled GEMM, one program per (row block, output block), no split.

fp32 activations multiply in IEEE fp32 (`input_precision="ieee"`: a GPU would otherwise use
tf32, 1e-3 relative); fp16 and bf16 on the tensor cores. bf16 runs on a GPU only: Triton's
interpreter computes bf16 `tl.dot` wrongly (triton-lang/triton#11584).

Weights kept exactly (`outliers`) are corrected after the kernel by an ATen `index_add` of
`(kept value - dequantized code) * input` into their output columns, in fp32. bf16 and fp16
weights are not here: the program's own cast to the activation dtype and a torch matmul
run them. `select_quantized_linears` rewrites a graph to call `dequant_linear`.
"""

from __future__ import annotations

import copy
import functools

import torch
import triton
import triton.language as tl
from torch import fx
from torch.fx.node import map_arg

from lmforge.compiler.quantized import stored_format, stored_weight

aten = torch.ops.aten

GEMV_ROWS = 16
"""Rows up to which the split-K GEMV runs: decode steps and verify forwards of up to 16 tokens."""
TARGET_PROGRAMS = 256
"""GEMV programs to aim for: about two per streaming multiprocessor of a current GPU."""
COMBINE_BLOCK = 1024
"""Outputs a program of the split-K combine adds up."""
_ELEMENT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _int4_tile(packed_ptrs, scales_ptr, zeros_ptr, outs, out_ok, first, K,
               GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 weights `(BLOCK_K, BLOCK_N)` of columns `first ..` (0 outside) for outputs
    `outs`, from the bytes at `packed_ptrs` `(BLOCK_K / 2, BLOCK_N)`."""
    pairs = first // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(packed_ptrs, mask=(pairs < K // 2)[:, None] & out_ok[None, :], other=0)
    nibbles = tl.permute(tl.join(packed & 0xF, packed >> 4), (0, 2, 1))  # (BLOCK_K / 2, 2, BLOCK_N)
    codes = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)).to(tl.float32)
    groups_per_row = K // GROUP_SIZE
    if GROUP_SIZE % BLOCK_K == 0:  # one group per tile: a scale and a zero per output
        where = outs.to(tl.int64) * groups_per_row + first // GROUP_SIZE
        scales = tl.load(scales_ptr + where, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        zeros = tl.load(zeros_ptr + where, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    else:
        columns = first + tl.arange(0, BLOCK_K)
        where = outs.to(tl.int64)[None, :] * groups_per_row + (columns // GROUP_SIZE)[:, None]
        mask = (columns < K)[:, None] & out_ok[None, :]
        scales = tl.load(scales_ptr + where, mask=mask, other=0.0).to(tl.float32)
        zeros = tl.load(zeros_ptr + where, mask=mask, other=0.0).to(tl.float32)
    return codes * scales + zeros


@triton.jit
def dequant_matmul_kernel(
    x_ptr, q_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """`out[split] = x @ dequantized(q)[:, split's columns].T` (+ bias in split 0) for one
    (output block, split, row block). GROUP_SIZE 0: int8 codes `(N, K)` with fp32 scales
    `(N,)`; otherwise int4 bytes `(N, K / 2)` with fp16 scales and zeros `(N, K / GROUP_SIZE)`.
    Weight tiles are loaded as `(BLOCK_K, BLOCK_N)`, the orientation `tl.dot` takes."""
    block_n, split, block_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, out_ok = rows < M, outs < N
    inner = tl.arange(0, BLOCK_K)
    begin = split * k_per_split
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + (begin + inner)[None, :]
    if GROUP_SIZE == 0:
        w_ptrs = q_ptr + outs.to(tl.int64)[None, :] * K + (begin + inner)[:, None]
    else:
        w_ptrs = q_ptr + outs.to(tl.int64)[None, :] * (K // 2) + (begin // 2 + tl.arange(0, BLOCK_K // 2))[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(tl.minimum(K - begin, k_per_split), BLOCK_K)):
        first = begin + step * BLOCK_K
        column_ok = first + inner < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & column_ok[None, :], other=0.0)
        if GROUP_SIZE == 0:
            w = tl.load(w_ptrs, mask=column_ok[:, None] & out_ok[None, :], other=0)
            w_ptrs += BLOCK_K
        else:
            w = _int4_tile(w_ptrs, scales_ptr, zeros_ptr, outs, out_ok, first, K, GROUP_SIZE, BLOCK_N, BLOCK_K)
            w_ptrs += BLOCK_K // 2
        if IEEE:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K
    if GROUP_SIZE == 0:
        acc = acc * tl.load(scales_ptr + outs, mask=out_ok, other=0.0)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
    out = out_ptr + split.to(tl.int64) * M * N + rows.to(tl.int64)[:, None] * N + outs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def split_k_combine(partial_ptr, out_ptr, size, splits, BLOCK: tl.constexpr):
    """`out = sum of the splits' fp32 partials`, added in split order whatever the shape, so a
    row's result does not depend on how many rows came with it (a torch reduction may order
    its additions by the tensor's shape)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(partial_ptr + split * size + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(rows: int, n: int, k: int, dtype: torch.dtype, group_size: int = 0) -> dict[str, int]:
    """Tiles, warps and split count for `rows` rows of a weight `(n, k)` (`group_size` 0:
    int8): the split-K GEMV up to `GEMV_ROWS` rows, its split count from the weight's shape
    alone, and the tiled GEMM beyond. Read by the launcher and by `aot_specs` alike.

    Measured by compiling for sm_80 / sm_90 (`aot_kernel_specs`, N = K = 4096, no bias; none
    spills; registers per thread, sm_80 / sm_90). The GEMV takes 32 outputs a program; int8
    codes 128 columns a step at 16 bits (fp16 56 / 53, bf16 60 / 48) and 32 in fp32
    (118 / 108); int4 32 columns a step, so that a group of a multiple of 32 has one scale
    per tile (45 / 47 at 16 bits, 121 / 124 in fp32; groups of 48: 64 / 56). The GEMM runs
    64 x 64 x 32 tiles on 8 warps at 16 bits (int8 80 / 46, int4 68 / 42, groups of 48
    105 / 48) and 32 x 32 x 32 in fp32 (104-124): fp32 multiplies on CUDA cores (IEEE), whose
    tiles cost more registers. The combine takes 36. Shared memory: 3-21 KB a block."""
    wide = dtype != torch.float32
    if rows > GEMV_ROWS:
        block = 64 if wide else 32
        return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": 32, "splits": 1, "k_per_split": k, "num_warps": 8}
    block_n, block_k = 32, 128 if wide and not group_size else 32
    k_blocks, n_blocks = triton.cdiv(k, block_k), triton.cdiv(n, block_n)
    blocks_per_split = triton.cdiv(k_blocks, max(1, min(k_blocks, TARGET_PROGRAMS // n_blocks)))
    return {"BLOCK_M": GEMV_ROWS, "BLOCK_N": block_n, "BLOCK_K": block_k,
            "splits": triton.cdiv(k_blocks, blocks_per_split), "k_per_split": blocks_per_split * block_k,
            "num_warps": 4}


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear(x, w, bias)` for the int8 (`zeros` None) or int4 weight `w` the codes and
    scales represent, in `x`'s dtype, accumulated in fp32."""
    k = x.shape[-1]
    x2d = x.reshape(-1, k).contiguous()
    rows, n = x2d.shape[0], qweight.shape[0]
    group_size = 0 if zeros is None else k // scales.shape[1]
    config = launch_config(rows, n, k, x.dtype, group_size)
    splits = config["splits"]
    out = torch.empty((splits, rows, n), dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    grid = (triton.cdiv(n, config["BLOCK_N"]), splits, triton.cdiv(rows, config["BLOCK_M"]))
    # int8 has no zero points and a layer may have no bias: those pointers get a tensor the
    # kernel never reads (GROUP_SIZE 0, HAS_BIAS False)
    dequant_matmul_kernel[grid](
        x2d, qweight, scales.reshape(-1) if zeros is None else scales, scales if zeros is None else zeros,
        x2d if bias is None else bias, out, rows, n, k, config["k_per_split"],
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
    )
    if splits > 1:
        partials, out = out, torch.empty((rows, n), dtype=x.dtype, device=x.device)
        split_k_combine[(triton.cdiv(rows * n, COMBINE_BLOCK),)](partials, out, rows * n, splits, BLOCK=COMBINE_BLOCK)
    return out.view(*x.shape[:-1], n)


def dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bias: torch.Tensor | None, outlier_rows: torch.Tensor | None = None,
                   outlier_columns: torch.Tensor | None = None,
                   outlier_deltas: torch.Tensor | None = None) -> torch.Tensor:
    """What a quantized program's linear layer calls on the `triton` backend: the kernel,
    then the outliers' sparse correction as an ATen `index_add` in fp32 (when there are any)."""
    out = dequant_matmul(x, qweight, scales, zeros, bias)
    if outlier_rows is None:
        return out
    correction = x.reshape(-1, x.shape[-1]).float()[:, outlier_columns] * outlier_deltas
    flat = out.reshape(-1, out.shape[-1]).float().index_add(1, outlier_rows, correction)
    return flat.to(out.dtype).view(out.shape)


def aot_specs(dtype: torch.dtype, group_size: int | None, with_bias: bool = False) -> list[tuple]:
    """(kernel, signature, constexprs, num_warps) of the GEMV and the GEMM for one format
    (`group_size` None: int8; otherwise int4 in groups of that many columns) at `dtype`, as
    `launch_config` picks them for a large weight (the GEMV with several splits writes fp32
    partials; the GEMM writes `dtype`)."""
    element = _ELEMENT[dtype]
    codes, params = ("i8", "fp32") if group_size is None else ("u8", "fp16")
    entries = []
    for rows, out in ((GEMV_ROWS, "fp32"), (GEMV_ROWS + 1, element)):
        config = launch_config(rows, 4096, 4096, dtype, group_size or 0)
        signature = {"x_ptr": f"*{element}", "q_ptr": f"*{codes}", "scales_ptr": f"*{params}",
                     "zeros_ptr": f"*{params}", "bias_ptr": f"*{element}", "out_ptr": f"*{out}",
                     **dict.fromkeys(("M", "N", "K", "k_per_split"), "i32")}
        constexprs = {"GROUP_SIZE": group_size or 0, "HAS_BIAS": with_bias, "IEEE": dtype == torch.float32,
                      **{key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}}
        entries.append((dequant_matmul_kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
                        config["num_warps"]))
    return entries


def _constant_expression(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(call nodes in graph order, get_attr leaves) computing `node` from constants alone,
    or None when it reads an input."""
    calls, leaves, pending = set(), set(), [node]
    while pending:
        current = pending.pop()
        if current in calls or current in leaves:
            continue
        if current.op == "get_attr":
            leaves.add(current)
        elif current.op == "call_function":
            calls.add(current)
            pending.extend(current.all_input_nodes)
        else:
            return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(calls, key=order.get), sorted(leaves, key=order.get)


def _attribute(module: fx.GraphModule, name: str, value: torch.Tensor | None, before: fx.Node) -> fx.Node | None:
    if value is None:
        return None
    if not hasattr(module, name):
        module.register_buffer(name, value)
    with module.graph.inserting_before(before):
        return module.graph.get_attr(name)


def _embedding_table(module: fx.GraphModule, calls: list[fx.Node], leaves: list[fx.Node]) -> torch.Tensor:
    env = {leaf: functools.reduce(getattr, leaf.target.split("."), module) for leaf in leaves}
    for call in calls:
        env[call] = call.target(*map_arg(call.args, env.get), **map_arg(call.kwargs, env.get))
    return env[calls[-1]]


def _linear_operands(module: fx.GraphModule, fmt: str, base: str) -> dict[str, torch.Tensor | None]:
    weight = stored_weight(module, fmt, base)
    operands = {"qweight": weight.qweight, "scales": weight.scales, "zeros": weight.zeros}
    if weight.outlier_index is not None:
        index = weight.outlier_index.long()
        columns = weight.qweight.shape[1] * (2 if fmt == "int4" else 1)
        deltas = weight.outlier_value - weight.dequantize_codes().view(-1)[index]
        operands.update(rows=index // columns, columns=index % columns, deltas=deltas)
    return operands


def _stored_weights(module: fx.GraphModule):
    """(node, format, stored name, dequantizing calls, their constant leaves) for every
    linear layer and embedding whose weight the graph dequantizes from int8 or int4 codes."""
    for node in list(module.graph.nodes):
        if node.target not in (aten.linear.default, aten.embedding.default):
            continue
        weight_arg = node.args[1] if node.target is aten.linear.default else node.args[0]
        if not isinstance(weight_arg, fx.Node) or weight_arg.op == "get_attr":
            continue
        expression = _constant_expression(weight_arg)
        if expression is None or not expression[0]:
            continue
        calls, leaves = expression
        found = stored_format(module, [leaf.target for leaf in leaves])
        if found is not None and found[0] in ("int8", "int4"):
            yield node, *found, calls, leaves


def select_quantized_linears(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of `graph_module` in which every linear layer whose weight is stored as int8 or
    int4 calls `dequant_linear` on the stored codes, and every such embedding table is
    dequantized once; the dequantizing nodes are removed. A graph without such weights comes
    back as it is."""
    module = fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph))
    changed = False
    for node, fmt, base, calls, leaves in _stored_weights(module):
        changed = True
        if node.target is aten.embedding.default:
            table = _attribute(module, f"{base}_table", _embedding_table(module, calls, leaves), node)
            node.args = (table, *node.args[1:])
            continue
        operands = {key: _attribute(module, f"{base}_{fmt}_linear_{key}", value, node)
                    for key, value in _linear_operands(module, fmt, base).items()}
        bias = node.args[2] if len(node.args) > 2 else None
        node.target = dequant_linear
        node.args = (node.args[0], operands["qweight"], operands["scales"], operands["zeros"], bias,
                     operands.get("rows"), operands.get("columns"), operands.get("deltas"))
    if not changed:
        return graph_module
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def quantized_linear_formats(graph_module: fx.GraphModule) -> list[dict]:
    """The kernel variants a program's linear layers launch, as JSON for the ahead-of-time
    compile: each distinct (group size, None for int8; bias), and whether any of its layers
    corrects outliers after it."""
    outliers: dict[tuple, bool] = {}
    for node, fmt, base, _, _ in _stored_weights(graph_module):
        if node.target is aten.linear.default:
            weight = stored_weight(graph_module, fmt, base)
            key = (weight.group_size, len(node.args) > 2 and node.args[2] is not None)
            outliers[key] = outliers.get(key, False) or weight.outlier_index is not None
    return [{"group_size": group, "bias": bias, "outliers": outliers[group, bias]}
            for group, bias in sorted(outliers, key=lambda key: (key[0] or 0, key[1]))]


def aot_kernel_specs(dtype: torch.dtype, formats: list[dict]) -> list:
    """A KernelSpec of the GEMV and of the GEMM for each of `formats`
    (`quantized_linear_formats`), named after the format (`dequant_gemv_int4_g32_bias`), and
    of the split-K combine (`dequant_split_k_combine`). Every
    pointer is hinted 16-byte aligned, and so are N, K (as the JIT specialises a model whose
    widths are multiples of 16) and k_per_split (a whole number of 32-column steps). The
    outliers' correction is no kernel of its own: an ATen op after this one, listed in `ops`."""
    from lmforge.codegen.aot import spec_from_aot_tuple

    specs = []
    for entry in formats:
        group = entry["group_size"]
        label = ("int8" if group is None else f"int4_g{group}") + ("_bias" if entry["bias"] else "")
        ops = ("aten.linear",) + (("aten.index_add: outliers' sparse correction, after the kernel",)
                                  if entry["outliers"] else ())
        for kind, aot_entry in zip(("gemv", "gemm"), aot_specs(dtype, group, entry["bias"]), strict=True):
            pointers = tuple(arg for arg, type_name in aot_entry[1].items() if type_name.startswith("*"))
            specs.append(spec_from_aot_tuple(f"dequant_{kind}_{label}", aot_entry, ops=ops,
                                             aligned=(*pointers, "N", "K", "k_per_split")))
    if formats:
        signature = {"partial_ptr": "*fp32", "out_ptr": f"*{_ELEMENT[dtype]}", "size": "i32", "splits": "i32",
                     "BLOCK": "constexpr"}
        combine = (split_k_combine, signature, {"BLOCK": COMBINE_BLOCK}, 4)
        specs.append(spec_from_aot_tuple("dequant_split_k_combine", combine, ops=("aten.linear",)))
    return specs
