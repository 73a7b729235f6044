"""Quantized programs on the `cpp` backend: the compiled step multiplies by the stored int8,
int4 and bf16 weights through the same kernels as the `aten` backend, so it decodes the same
greedy tokens with logits within float rounding of the `aten` backend's.

One tiny llama holds all three formats (layer 0 int8, layer 1 int4 g32, LM head bf16), so
one compile covers every kernel; its prompt is one token in a cache of exactly the slots the
generate needs (so the prompt is not padded to a length bucket), every forward is a 1-token
step and a generate compiles one package, not two (kept in lmforge's cache afterwards)."""

import pytest
import torch
from tiny_models import tiny_model

from lmforge.api import CompiledModel, _generation_settings
from lmforge.codegen.cpp.quantized import with_quantized_kernels
from lmforge.codegen.cpu_quantized import linear_bf16, linear_int4, linear_int8
from lmforge.compiler.capture import capture
from lmforge.compiler.recipe import parse_recipe
from lmforge.passes import PassContext
from lmforge.passes.calibrate import CalibrationData
from lmforge.passes.quantize import Quantize, QuantizeConfig

NEW_TOKENS = 16
MIXED = (("int8", [1, "lm_head", "embedding"]), ("int4", [0, "lm_head", "embedding"]), ("bf16", [0, 1]))


@pytest.fixture(scope="module")
def mixed():
    model = tiny_model("llama", num_layers=2)
    program = capture(model)
    ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    ctx = PassContext(reference=model, calibration=CalibrationData(ids[:2], ids[2:], model))
    for fmt, skip in MIXED:
        Quantize(QuantizeConfig(weights=fmt, skip=skip))(program, ctx)
    return model, program


def _compiled(model, program, backend: str) -> CompiledModel:
    recipe = parse_recipe(f"codegen: {{backend: {backend}}}\nruntime: {{max_seq_len: {1 + NEW_TOKENS}}}\n")
    return CompiledModel(program, recipe, _generation_settings(model))


def _greedy_with_logits(compiled: CompiledModel, ids: torch.Tensor, new_tokens: int):
    """Greedy tokens and the last-position logits of every step that chose one."""
    engine, logits = compiled.engine, []
    plain_step = engine.step

    def recording_step(*args, **kwargs):
        logits.append(plain_step(*args, **kwargs))
        return logits[-1]

    engine.step = recording_step
    try:
        tokens = compiled.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    finally:
        del engine.step
    return tokens, torch.cat([step[:, -1] if step.dim() == 3 else step for step in logits])


def test_step_module_reads_stored_formats(mixed):
    _, program = mixed
    module = with_quantized_kernels(program.graph_module)
    kernels = [node.target for node in module.graph.nodes if node.op == "call_function"]
    assert (kernels.count(linear_int8), kernels.count(linear_int4), kernels.count(linear_bf16)) == (7, 7, 1)
    dtypes = {tensor.dtype for tensor in module.state_dict().values() if tensor.ndim == 2}
    assert dtypes == {torch.int8, torch.uint8, torch.bfloat16, torch.float32}  # fp32: the embedding table only
    assert sum(tensor.dtype == torch.float32 and tensor.ndim == 2 for tensor in module.state_dict().values()) == 1


def test_cpp_decodes_like_aten(mixed):
    model, program = mixed
    ids = torch.tensor([[17]])
    expected, expected_logits = _greedy_with_logits(_compiled(model, program, "aten"), ids, NEW_TOKENS)
    cpp = _compiled(model, program, "cpp")
    tokens, logits = _greedy_with_logits(cpp, ids, NEW_TOKENS)
    assert [bucket.tokens for bucket in cpp.engine.runner.steps] == [1]
    assert torch.equal(tokens, expected)
    assert (logits - expected_logits).abs().max() <= 1e-3 * expected_logits.abs().max()
