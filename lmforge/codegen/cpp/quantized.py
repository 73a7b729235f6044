"""Weights stored in a low precision, in the compiled step of the `cpp` backend.

Why. A quantized program dequantizes each weight with ATen ops on constants; with frozen
weights Inductor folds that arithmetic into an fp32 weight at compile time, so the compiled
step would read four bytes per weight whatever the format. Here, before export, every such
linear calls the kernel the `aten` backend calls (`codegen/cpu_quantized.py`), written as
ATen ops Inductor keeps as extern kernels on frozen constants that stay in their stored
format:

- `int8`: `aten._weight_int8pack_mm` on the int8 codes, bf16 activations;
- `int4`: `aten._weight_int4pack_mm_for_cpu` on torch's packed layout (groups of 32 to 256;
  others run as a dequantized bf16 weight);
- `bf16`: `aten.linear` with bf16 activations on the bf16 weight, which freezing packs for
  oneDNN (the packed tensor itself cannot be exported); `fp16`: the weight widened to fp32.

The same kernels on the same operands, so a compiled step rounds as the `aten` backend's
lowering does; the other ops of the step are Inductor's fused C++ (float rounding apart).
The packages hold them as extern calls (ref-llama-py int8: `_weight_int8pack_mm` in the
generated wrapper; bf16: oneDNN's packed linear).

Measured (benchmarks/quantize.py --speed, ref-llama-py, batch 1, 2 threads, 64 tokens after
a 1-token prompt, medians of 5 alternating rounds) on a machine loaded to ~16 on its 2
cores, where a step ran ~100x slower than quiet: only the ratios mean anything, and even
they are rough. Decode tokens/s relative to fp32 `aten`: fp32 cpp 2.97, bf16 aten 1.30 /
cpp 3.57, int8 aten 2.12 / cpp 7.07, int4 g32 aten 3.11 / cpp 6.57 (relative to fp32 cpp:
bf16 1.2, int8 2.38, int4 2.21); cpp's greedy tokens equal aten's in every format. Not yet
measured: 1 thread, the >= 100 M model (`--big`), and Inductor's C++ weight-only GEMM
templates (`max_autotune`: `CppWoqInt4GemmTemplate`, the int8 `CppGemmTemplate`), which
need an autotuning compile per bucket.
"""

from __future__ import annotations

import copy

from torch import fx

from lmforge.codegen.cpu_quantized import select_quantized_kernels


def with_quantized_kernels(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of `graph_module` whose linears over stored low-precision weights call their
    format's kernel on the stored (packed) constants; the same graph when it has none."""
    graph = copy.deepcopy(graph_module.graph)
    selected = fx.GraphModule(graph_module, graph)
    select_quantized_kernels(selected, onednn=False)
    graph.eliminate_dead_code()
    # built again so the module holds only the constants the graph still reads: the codes a
    # kernel replaced would otherwise be exported and frozen into every package
    return fx.GraphModule(selected, graph)
