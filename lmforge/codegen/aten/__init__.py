"""The `aten` backend's kernels for lmforge's ops: PyTorch code calling ATen, one module per
op (`attention.py` holds `attention` and `tree_attention`, which share their kernel), beside
the `triton` backend's in `codegen/triton/`.

The ops are declared in `compiler/ops.py` (schema and fake kernel); importing this package
registers these kernels as the ops' implementations for every device, so a graph calling the
ops runs eagerly anywhere (`compiler/ops.py` imports it last). `PYTHON_KERNELS` maps each op
to its kernel for code generators that call the kernels without the dispatcher.
"""

import torch

from lmforge.codegen.aten.attention import aten_attention, aten_tree_attention
from lmforge.codegen.aten.evicting import aten_evicting_attention
from lmforge.codegen.aten.ffn_skip_gate import aten_ffn_skip_gate
from lmforge.codegen.aten.last_position import aten_last_position
from lmforge.codegen.aten.merged import aten_merged_attention
from lmforge.codegen.aten.quantized_kv import aten_quantized_attention
from lmforge.codegen.aten.sparse import aten_sparse_attention
from lmforge.codegen.aten.streaming import aten_streaming_attention
from lmforge.compiler.ops import (
    attention,
    evicting_attention,
    ffn_skip_gate,
    last_position,
    merged_attention,
    quantized_attention,
    sparse_attention,
    streaming_attention,
    tree_attention,
)

PYTHON_KERNELS = {
    attention: aten_attention,
    tree_attention: aten_tree_attention,
    ffn_skip_gate: aten_ffn_skip_gate,
    merged_attention: aten_merged_attention,
    streaming_attention: aten_streaming_attention,
    sparse_attention: aten_sparse_attention,
    evicting_attention: aten_evicting_attention,
    quantized_attention: aten_quantized_attention,
    last_position: aten_last_position,
}
"""Each op's kernel on the `aten` backend, keyed by op."""

_implementations = torch.library.Library("lmforge", "IMPL")
for _op, _kernel in PYTHON_KERNELS.items():
    _implementations.impl(_op._schema.name.removeprefix("lmforge::"), _kernel, "CompositeExplicitAutograd")
