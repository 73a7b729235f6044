"""Every tiny architecture through the `triton` backend: each pointwise op and row
reduction on floating-point values runs inside a generated kernel (none is left to torch),
prefill logits match Hugging Face's and greedy tokens are identical.

Where the architectures differ for the fusion partitioner: per-head q/k RMSNorm read back by
RoPE's rotated halves (qwen3, olmo2), matrix products on `[batch*seq, n]` rows viewed back
to `[batch, seq, n]` (gpt2's Conv1D, opt's fc layers: a kernel that needs `batch` alone),
partial rotary (stablelm, phi, gpt_neox), soft-caps (gemma2), scaled embeddings and
residuals (gemma, granite).

The kernels run in Triton's interpreter (TRITON_INTERPRET must be set before any
`@triton.jit` function is defined, hence before the imports), so prompts and generations
are short and the models have one layer (what differs between architectures is inside a
layer; two layers are covered for llama, qwen2 and gemma2 in test_triton_backend.py and
test_triton_compose.py).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import ARCHITECTURES, tiny_model  # noqa: E402

import lmforge  # noqa: E402
from lmforge.codegen.fusion import POINTWISE, ROW_REDUCTIONS  # noqa: E402

RECIPE = ("passes: [{name: cleanup}, {name: fuse_projections}]\n"
          "codegen: {backend: triton}\nruntime: {max_seq_len: 32}\n")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_equal_hugging_face(arch):
    model = tiny_model(arch, num_layers=1)
    compiled = lmforge.optimize(model, RECIPE)
    left_to_torch = [node.name for node in compiled.engine.runner.graph.nodes
                     if node.op == "call_function" and node.target in POINTWISE | ROW_REDUCTIONS
                     and node.meta["val"].dtype.is_floating_point]  # integer position arithmetic stays
    assert not left_to_torch
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=0)
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    assert torch.equal(compiled.generate(ids, max_new_tokens=3, eos_token_id=[]), greedy)
