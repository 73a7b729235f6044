"""Capture of every supported architecture: logits, greedy tokens and cache consistency."""

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

import lmforge
from lmforge.compiler.capture import capture
from lmforge.compiler.ops import attention
from lmforge.errors import LmforgeError


def _ids(batch=2, length=20, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_pair(request):
    model = tiny_model(request.param)
    return request.param, model, lmforge.optimize(model)


def test_prefill_logits_match_hf_eager(arch_pair):
    _, model, compiled = arch_pair
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_equal_hf_generate(arch_pair):
    _, model, compiled = arch_pair
    ids = _ids(batch=1, length=16, seed=2)
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=24), expected)


def test_decode_with_cache_equals_full_sequence(arch_pair):
    _, _, compiled = arch_pair
    ids = _ids(batch=2, length=30, seed=3)
    full = compiled(ids).logits
    engine = compiled.engine
    engine._ensure_cache(2, 30)
    prefix = 18
    positions = torch.arange(30).expand(2, 30)
    steps = [engine.step(ids[:, :prefix], positions[:, :prefix], 0, None)]
    for t in range(prefix, 30):
        steps.append(engine.step(ids[:, t : t + 1], positions[:, t : t + 1], t, None))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prefix - 1 :], atol=1e-5, rtol=1e-5)


def test_every_layer_has_its_parts(arch_pair):
    _, model, compiled = arch_pair
    layers = compiled.program.layers
    assert len(layers) == model.config.num_hidden_layers
    for entry in layers:
        assert entry.attention is not None and entry.attention.target == attention
        assert "o" in entry.projections
        assert {"q", "k", "v"} <= set(entry.projections) or "qkv" in entry.projections
        assert entry.ffn and entry.norms


def test_sliding_window_and_softcap_reach_the_op():
    model = tiny_model("gemma2")
    program = capture(model)
    args = [entry.attention.args for entry in program.layers]
    windows = {a[5] for a in args}
    assert 12 in windows and all(a[6] == 30.0 for a in args)


def test_unsupported_architecture_is_named():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("falcon", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(LmforgeError, match="unsupported architecture 'falcon'.*Supported model types: gemma"):
        lmforge.optimize(model)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_checkpoint_is_read_straight_into_the_runtime_dtype(tmp_path, dtype):
    """No float32 copy on the way: every parameter arrives in the dtype asked for, equal to
    the float32 weights cast, and without a dtype transformers' default stays."""
    from lmforge.compiler.capture import load_reference

    model = tiny_model("llama", num_layers=1)
    model.save_pretrained(tmp_path)
    loaded = load_reference(tmp_path, dtype)
    assert {parameter.dtype for parameter in loaded.parameters()} == {getattr(torch, dtype)}
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, model.get_parameter(name).to(getattr(torch, dtype)))
    assert {parameter.dtype for parameter in load_reference(tmp_path).parameters()} == {torch.float32}
