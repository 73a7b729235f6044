"""Quantized KV cache (`quantize` with `kv_cache:`, KIVI): the codes' round trip, the kernel
against a per-query PyTorch reference, programs on a tiny Llama, bytes, and refusals."""

import json
import math

import pytest
import torch
from tiny_models import tiny_model

import lmforge
import lmforge.codegen.aten.quantized_kv as quantized_kv
from lmforge.api import CompiledModel
from lmforge.compiler.capture import capture
from lmforge.compiler.kv_layout import allocate_kv_buffers, buffer_bytes, kv_cache_bytes
from lmforge.compiler.kv_quantized import (
    KVQuantSpec,
    QuantizedSlot,
    dequantize_groups,
    dequantize_keys,
    fake_quantize,
    quantize_keys,
    quantize_values,
)
from lmforge.compiler.ops import AttentionContext, attention_context, quantized_attention
from lmforge.compiler.recipe import parse_recipe
from lmforge.errors import LmforgeError
from lmforge.passes import PASSES, PassContext
from lmforge.passes.calibrate import CalibrationData, decoded_logits, full_logits
from lmforge.passes.kv_evict import make_evicting
from lmforge.passes.quantize import Quantize, QuantizeConfig
from lmforge.passes.quantize_kv_cache import fp8_unsupported_reason

CODE_FLIP_TOLERANCE = 2e-3  # decoded vs cache-free logits, relative to their largest magnitude
GENERATION = {"eos_token_ids": [], "pad_token_id": 0}
# The quantized cache vs the fp32 program on the tiny random Llama (whose initializer of 0.2
# gives large activations): largest logit difference relative to the largest logit, and the
# least top-1 agreement. Measured: int8 2.3 % and 0.98, fp8 (3 mantissa bits) 12.5 % and 0.92.
FP32_TOLERANCE = {"int8": (0.05, 0.95), "fp8": (0.25, 0.85)}


def random_calibration(model, windows: int = 2, length: int = 16) -> CalibrationData:
    ids = torch.randint(3, model.config.vocab_size, (2 * windows, length), generator=torch.Generator().manual_seed(1))
    return CalibrationData(ids[:windows], ids[windows:], model)


def context(model, data: CalibrationData) -> PassContext:
    return PassContext(reference=model, calibration=data)


def _keys_with_outlier_channel(batch=2, heads=2, length=64, dim=16):
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    keys[..., 3] = keys[..., 3] * 40 + 25  # KIVI: keys have a few large, offset channels
    return keys


def _int8_bound(quantized, stored_step, stored_zero):
    """Half a step, plus what fp16-rounding the step and the zero point can add at the clamp."""
    return stored_step / 2 + (stored_zero.abs() + 255 * stored_step) * 2.0**-10


@pytest.mark.parametrize("granularity", ["kivi", "token"])
def test_int8_round_trip_within_half_a_step(granularity):
    spec = KVQuantSpec("int8", granularity, 16)
    keys = _keys_with_outlier_channel()
    quantized = quantize_keys(keys, spec)
    assert quantized.codes.dtype == torch.int8
    error = (dequantize_keys(quantized, spec, torch.float32) - keys).abs()
    if granularity == "kivi":
        assert quantized.scale.shape == (2, 2, 4, 16)  # one per channel and group of 16 tokens
        step = quantized.scale.float().repeat_interleave(16, dim=2)
        zero = quantized.zero.float().repeat_interleave(16, dim=2)
    else:
        assert quantized.scale.shape == (2, 2, 64, 1)
        step, zero = quantized.scale.float(), quantized.zero.float()
    assert (error <= _int8_bound(quantized, step, zero)).all()
    values = quantize_values(keys, spec)
    value_error = (dequantize_groups(values) - keys).abs()
    assert (value_error <= _int8_bound(values, values.scale.float(), values.zero.float())).all()


@pytest.mark.parametrize("granularity", ["kivi", "token"])
def test_fp8_round_trip_within_e4m3_precision(granularity):
    assert fp8_unsupported_reason(torch.device("cpu")) is None
    spec = KVQuantSpec("fp8", granularity, 16)
    keys = _keys_with_outlier_channel()
    quantized = quantize_keys(keys, spec)
    assert quantized.codes.dtype == torch.float8_e4m3fn and quantized.zero is None
    scale = quantized.scale.float()
    scale = scale.repeat_interleave(16, dim=2) if granularity == "kivi" else scale
    error = (dequantize_keys(quantized, spec, torch.float32) - keys).abs()
    assert (error <= keys.abs() * 2.0**-4 + scale * 2.0**-9).all()  # 3 mantissa bits; subnormal spacing


def test_keys_per_channel_keep_ordinary_channels_precise_beside_an_outlier_channel():
    keys = _keys_with_outlier_channel()
    errors = {}
    for granularity in ("kivi", "token"):
        spec = KVQuantSpec("int8", granularity, 16)
        restored = dequantize_keys(quantize_keys(keys, spec), spec, torch.float32)
        errors[granularity] = (restored - keys)[..., [0, 1, 2, 4, 5]].abs().mean().item()
    assert errors["kivi"] < errors["token"] / 10


def test_left_padding_does_not_widen_a_groups_key_range():
    spec = KVQuantSpec("int8", "kivi", 16)
    keys = _keys_with_outlier_channel(batch=1, length=16)
    keys[:, :, :5] = 1e4  # garbage at padding slots
    valid = (torch.arange(16) >= 5)[None, None]
    restored = dequantize_keys(quantize_keys(keys, spec, valid), spec, torch.float32)
    step = (keys[:, :, 5:].amax(2) - keys[:, :, 5:].amin(2)) / 255
    assert ((restored - keys)[:, :, 5:].abs() <= step[:, :, None] * 0.51 + 0.05).all()


def _reference(q, keys, values, spec, scale, window, pad, softcap=0.0):
    """Per query at slot p: every complete group before p's read back from its codes, p's own
    group exact; causal, window and padding as the dense attention op applies them."""
    batch, heads, length, dim = q.shape
    out = torch.empty_like(q)
    valid = None if pad is None else (torch.arange(keys.shape[2])[None] >= pad[:, None])[:, None]
    for p in range(length):
        first = p // spec.group * spec.group
        read_back = fake_quantize(keys[:, :, :first], values[:, :, :first], spec,
                                  None if valid is None else valid[..., :first])
        k = torch.cat([read_back[0], keys[:, :, first : p + 1]], dim=2)
        v = torch.cat([read_back[1], values[:, :, first : p + 1]], dim=2)
        slots = torch.arange(p + 1)
        allowed = torch.ones(batch, 1, 1, p + 1, dtype=torch.bool)
        if window > 0:
            allowed &= slots > p - window
        if pad is not None:
            allowed = allowed & (slots[None, :] >= pad[:, None])[:, None, None]
            allowed[..., p] = True  # a padding query sees itself
        k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // v.shape[1], 1)
        scores = q[:, :, p : p + 1] @ k.transpose(-1, -2) * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        out[:, :, p : p + 1] = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v
    return out


FORWARDS = [(0, 70), (70, 1), (71, 1), (72, 6), (74, 1), (75, 5), (80, 3), (83, 1), (84, 1)]
"""(start, tokens) of each forward: a prefill longer than BLOCKED_QUERIES, decode steps, and
verifications of drafts that are then partly rejected (the next forward restarts inside)."""


@pytest.mark.parametrize("dtype,granularity,window,softcap,padded", [
    ("int8", "kivi", 0, 0.0, False), ("int8", "token", 0, 0.0, True), ("fp8", "kivi", 0, 0.0, False),
    ("int8", "kivi", 20, 30.0, True),
])
def test_kernel_matches_the_reference_over_prefill_decode_and_rolled_back_verification(
        monkeypatch, dtype, granularity, window, softcap, padded):
    monkeypatch.setattr(quantized_kv, "DEQUANTIZE_BLOCK", 16)  # several blocks per step
    spec, slack = KVQuantSpec(dtype, granularity, 8), 6
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, heads, 86, 16, generator=generator) for heads in (4, 2, 2))
    pad = torch.tensor([0, 9]) if padded else None
    expected = _reference(q, k, v, spec, 0.25, window, pad, softcap)
    slot = QuantizedSlot.allocate(2, 2, 96, 16, spec, slack, torch.float32)
    for start, tokens in FORWARDS:
        ctx = AttentionContext(kv=[slot], start=start, q_len=tokens, pad=pad)
        with attention_context(ctx):
            out = quantized_attention(q[:, :, start : start + tokens], k[:, :, start : start + tokens],
                                      v[:, :, start : start + tokens], 0, 0.25, window, softcap, dtype,
                                      granularity, 8, False)
        torch.testing.assert_close(out.transpose(1, 2), expected[:, :, start : start + tokens], rtol=1e-4, atol=1e-4)
        exact_keys, exact_values = slot.exact(slot.frontier, slot.end)
        assert torch.equal(exact_keys, k[:, :, slot.frontier : slot.end])  # the window is exact
        assert torch.equal(exact_values, v[:, :, slot.frontier : slot.end])
        assert slot.frontier % 8 == 0 and slot.end - slot.frontier < 8 + slack
    assert slot.frontier == 80  # committed: every group before the last forward's start


def test_a_rollback_past_the_slack_is_refused():
    spec = KVQuantSpec("int8", "kivi", 8)
    slot = QuantizedSlot.allocate(1, 1, 64, 8, spec, 2, torch.float32)
    q = k = v = torch.randn(1, 1, 40, 8)
    with attention_context(AttentionContext(kv=[slot], start=0, q_len=40)):
        quantized_attention(q, k, v, 0, 1.0, 0, 0.0, "int8", "kivi", 8, False)
    with pytest.raises(LmforgeError, match="slack"), \
            attention_context(AttentionContext(kv=[slot], start=30, q_len=1)):
        quantized_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], 0, 1.0, 0, 0.0, "int8", "kivi", 8, False)


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model("llama", num_layers=2)


@pytest.fixture(scope="module")
def tiny_programs(tiny_llama):
    """The fp32 program and its int8 / fp8 KV-cache versions (groups of 8 tokens)."""
    fp32 = capture(tiny_llama)
    data = random_calibration(tiny_llama, windows=2, length=16)
    programs = {"fp32": fp32}
    for dtype in ("int8", "fp8"):
        program = fp32.clone()
        config = QuantizeConfig.model_validate({"kv_cache": {"dtype": dtype, "residual": 8}})
        result = Quantize(config)(program, context(tiny_llama, data))
        assert result.rewrites == 2 and "KV cache of 2 layers" in result.notes[0]
        programs[dtype] = program
    return programs


def test_the_pass_swaps_every_attention_and_leaves_the_weights(tiny_programs):
    program = tiny_programs["int8"]
    targets = [node.target for node in program.graph_module.graph.nodes if node.op == "call_function"]
    assert targets.count(quantized_attention) == 2
    assert {entry["kind"] for entry in program.meta["kv_cache"]} == {"quantized"}
    assert "quantize" not in program.meta  # kv_cache alone: the weights stay fp32
    assert program.state_dict().keys() == tiny_programs["fp32"].state_dict().keys()


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_decoding_matches_the_cache_free_forward_and_stays_close_to_fp32(tiny_programs, dtype):
    ids = torch.randint(3, 256, (2, 44), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache_free = full_logits(tiny_programs[dtype], ids)
        decoded = decoded_logits(tiny_programs[dtype], ids, 20)
        fp32 = full_logits(tiny_programs["fp32"], ids)
    torch.testing.assert_close(decoded[:, :20], cache_free[:, :20], rtol=1e-4, atol=1e-4)  # the prefill
    # Decoded keys come from one-token matrix products, whose last bits differ from the
    # full-sequence ones; a value on a rounding boundary then takes the neighbouring code.
    assert (decoded - cache_free).abs().max() <= CODE_FLIP_TOLERANCE * cache_free.abs().max()
    assert (decoded.argmax(-1) == cache_free.argmax(-1)).float().mean() >= 0.99
    largest, top1 = FP32_TOLERANCE[dtype]
    assert (cache_free - fp32).abs().max() <= largest * fp32.abs().max()
    assert (cache_free.argmax(-1) == fp32.argmax(-1)).float().mean() >= top1


def test_speculative_decoding_with_prompt_lookup_equals_plain_decoding(tiny_llama, tiny_programs):
    data = random_calibration(tiny_llama, windows=2, length=16)
    drafting = tiny_programs["int8"].clone()
    PASSES["prompt_lookup"](PASSES["prompt_lookup"].Config())(drafting, context(tiny_llama, data))
    recipe = parse_recipe("runtime:\n  max_seq_len: 128\n")
    base = torch.randint(3, 256, (1, 15), generator=torch.Generator().manual_seed(3))
    prompt = torch.cat([base, base, base[:, :2]], dim=1)  # repeats itself: lookup finds drafts
    speculative = CompiledModel(drafting, recipe, GENERATION)
    tokens = speculative.generate(prompt, max_new_tokens=28)
    assert speculative.engine.speculation_stats["drafted"] > 0
    plain = CompiledModel(tiny_programs["int8"].clone(), recipe, GENERATION)
    assert torch.equal(tokens, plain.generate(prompt, max_new_tokens=28))


def test_cache_bytes_are_the_allocated_bytes_and_under_three_tenths_of_fp32():
    """ref-llama-py's shape (8 layers, 4 KV heads of 32) at its 4,096-token context."""
    fp32 = [{"layer": i, "cache": i, "kv_heads": 4, "head_dim": 32} for i in range(8)]
    quantized = [{**entry, "kind": "quantized", "dtype": "int8", "granularity": "kivi", "residual": 32, "slack": 8}
                 for entry in fp32]
    counted = kv_cache_bytes(quantized, 4096)
    assert counted == sum(buffer_bytes(buffer) for buffer in allocate_kv_buffers(quantized, 1, 4096, torch.float32))
    assert counted < 0.3 * kv_cache_bytes(fp32, 4096)


def test_a_bad_quantized_layout_entry_is_one_error():
    entry = {"layer": 0, "cache": 0, "kv_heads": 1, "head_dim": 8, "kind": "quantized", "dtype": "int3",
             "granularity": "kivi", "residual": 8, "slack": 0}
    with pytest.raises(LmforgeError, match="dtype 'int3'"):
        kv_cache_bytes([entry], 64)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_backends_without_the_kernel_refuse_at_compile(tiny_programs, backend):
    recipe = parse_recipe(f"codegen:\n  backend: {backend}\n")
    with pytest.raises(LmforgeError, match=f"backend {backend} has no kernel for lmforge::quantized_attention"):
        CompiledModel(tiny_programs["int8"].clone(), recipe, GENERATION)


def test_recipe_errors_name_the_file_and_line():
    with pytest.raises(LmforgeError, match=r"r\.yaml:4: passes\[0\]\.kv_cache\.dtype: .*'int8' or 'fp8'"):
        parse_recipe("passes:\n  - name: quantize\n    kv_cache:\n      dtype: int4\n", "r.yaml")
    with pytest.raises(LmforgeError, match=r"r\.yaml:3: .*unknown option 'residul' in kv_cache of pass 'quantize'; "
                                           r"did you mean 'residual'\? Valid options: dtype, granularity"):
        parse_recipe("passes:\n  - name: quantize\n    kv_cache: {residul: 8}\n", "r.yaml")


def test_layers_another_pass_rewrote_and_too_little_slack_are_refused(tiny_llama, tiny_programs):
    data = random_calibration(tiny_llama, windows=2, length=16)
    evicting = tiny_programs["fp32"].clone()
    make_evicting(evicting, [1], 32, 8, 0.9, 8)
    with pytest.raises(LmforgeError, match="cannot quantize layer 1's cache: its attention is lmforge::evicting"):
        Quantize(QuantizeConfig.model_validate({"kv_cache": {}}))(evicting, context(tiny_llama, data))
    drafting = tiny_programs["fp32"].clone()
    PASSES["prompt_lookup"](PASSES["prompt_lookup"].Config(num_draft=12))(drafting, context(tiny_llama, data))
    with pytest.raises(LmforgeError, match="drafts 12 tokens .* slack >= 12"):
        Quantize(QuantizeConfig.model_validate({"kv_cache": {"slack": 8}}))(drafting, context(tiny_llama, data))


def test_a_draft_source_after_the_quantized_cache_respects_its_slack(tiny_llama, tiny_programs):
    """The same rule from the other side: lookup added after quantize is refused at compile
    rather than stopping generation at its first long rollback."""
    data = random_calibration(tiny_llama, windows=2, length=16)
    with pytest.raises(LmforgeError, match="drafts of 12 tokens need a quantized KV cache slack of 12.*has 8"):
        PASSES["prompt_lookup"](PASSES["prompt_lookup"].Config(num_draft=12))(tiny_programs["int8"].clone(),
                                                                             context(tiny_llama, data))


def test_an_artifact_round_trip_decodes_the_same_tokens(tiny_programs, tmp_path):
    compiled = CompiledModel(tiny_programs["int8"].clone(), parse_recipe("runtime:\n  max_seq_len: 96\n"), GENERATION)
    prompt = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    tokens = compiled.generate(prompt, max_new_tokens=20)
    compiled.save(tmp_path / "artifact")
    layout = json.loads((tmp_path / "artifact" / "manifest.json").read_text())["meta"]["kv_cache"]
    assert kv_cache_bytes(layout, 96) == compiled.engine.cache.nbytes()  # what `lmforge info` reports is allocated
    assert torch.equal(lmforge.load(tmp_path / "artifact").generate(prompt, max_new_tokens=20), tokens)


def test_weights_and_cache_quantized_in_one_pass(tiny_llama, tiny_programs):
    program = tiny_programs["fp32"].clone()
    config = QuantizeConfig.model_validate({"weights": "int8", "kv_cache": {"residual": 8}})
    result = Quantize(config)(program, context(tiny_llama, random_calibration(tiny_llama)))
    assert program.meta["quantize"]["weights"] == "int8" and program.meta["quantize_kv_cache"]["layers"] == 2
    assert any(note.startswith("KV cache of 2 layers") for note in result.notes)
    targets = [node.target for node in program.graph_module.graph.nodes if node.op == "call_function"]
    assert targets.count(quantized_attention) == 2
