"""The ops the `triton` backend has no kernel for, each with the reason, and the check that
refuses a program calling one when it is lowered (`codegen.lower`): the program fails at
compile with that reason instead of at its first launch. `TRITON_KERNELS` and this table
together cover `aten.PYTHON_KERNELS` (a test holds them to it), so no op is left out silently.

This module imports no Triton, so the check runs before the backend is loaded.
"""

import torch

from lmforge.compiler.ops import quantized_attention
from lmforge.errors import LmforgeError

TRITON_REFUSED = {
    quantized_attention: "its cache slots hold integer codes, scales and a ring of exact tokens (quantize "
                         "kv_cache), while the Triton attention kernels read a dense cache in the model's dtype",
}
"""Each op with no `triton` kernel, and why."""


def refuse_on_triton(graph_module: torch.fx.GraphModule) -> None:
    """One LmforgeError naming the first op of the graph the `triton` backend has no kernel
    for, and why (`TRITON_REFUSED`)."""
    for node in graph_module.graph.nodes:
        reason = TRITON_REFUSED.get(node.target)
        if reason is not None:
            raise LmforgeError(f"codegen backend triton has no kernel for {node.target._schema.name}: {reason}; "
                               "use backend aten for this recipe")
