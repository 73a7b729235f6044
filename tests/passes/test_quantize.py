"""`quantize`: stored formats, the CPU kernels that read them, quality under a budget,
artifacts and speculation."""

import json

import pytest
import torch
from lossy_helpers import assert_quantized_program_runs, context, random_calibration, text_calibration
from tiny_models import tiny_model

import lmforge
from lmforge.api import CompiledModel
from lmforge.codegen.cpu_quantized import kernel_operands
from lmforge.compiler.capture import capture
from lmforge.compiler.quantized import (
    QWEIGHT,
    SCALES,
    cast_weight,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from lmforge.compiler.recipe import parse_recipe
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import full_logits, greedy_extend
from lmforge.passes.quantize import Quantize, QuantizeConfig

BUDGET = {"max_ppl_increase": 0.005, "min_top1": 0.97}


def test_int8_dequantized_weights_are_within_half_a_scale_of_the_originals():
    weight = torch.randn(48, 80) * torch.logspace(-3, 0, 48)[:, None]
    quantized = quantize_int8(weight)
    assert quantized.qweight.dtype == torch.int8 and quantized.scales.shape == (48, 1)
    error = (quantized.dequantize() - weight).abs()
    assert (error <= quantized.scales / 2 * (1 + 1e-5)).all()
    assert quantized.qweight.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range


def test_int4_pack_unpack_is_exact_and_groups_round_to_nearest():
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert torch.equal(unpack_int4(packed), codes)
    weight = torch.randn(12, 96)
    quantized = quantize_int4(weight, 32)
    assert quantized.group_size == 32 and quantized.scales.shape == (12, 3)
    step = quantized.scales.float().repeat_interleave(32, dim=1)
    # half a step, plus the fp16 rounding of the group's minimum and step
    assert ((quantized.dequantize() - weight).abs() <= step / 2 + 2e-3 * weight.abs().amax()).all()


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8", "int4", "int4-g16"])
@pytest.mark.parametrize("rows", [1, 4, 11])
def test_cpu_kernel_matches_the_dequantized_weight(fmt, rows):
    weight = torch.randn(96, 64) * 0.05
    formats = {"int8": quantize_int8, "int4": lambda w: quantize_int4(w, 32), "int4-g16": lambda w: quantize_int4(w, 16)}
    quantized = formats.get(fmt, lambda w: cast_weight(w, fmt))(weight)
    fmt = fmt.split("-")[0]
    holder = torch.nn.Module()
    for name, tensor in quantized.tensors("w").items():
        holder.register_buffer(name, tensor)
    kernel, operands = kernel_operands(holder, fmt, "w")
    x, bias = torch.randn(1, rows, 64), torch.randn(96)
    expected = torch.nn.functional.linear(x, quantized.dequantize(), bias)
    torch.testing.assert_close(kernel(x, *operands, bias), expected, rtol=0, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_tiny_program_stores_codes_and_its_lowering_decodes_like_it(arch, fmt):
    model = tiny_model(arch, num_layers=2)
    program = capture(model)
    data = random_calibration(model, windows=2, length=16)
    result = Quantize(QuantizeConfig(weights=fmt))(program, context(model, data))
    weights = program.state_dict()
    assert result.rewrites > 0
    assert not [name for name, tensor in weights.items()
                if tensor.ndim == 2 and tensor.dtype == torch.float32 and not name.endswith(SCALES)]
    assert all(weights[name].dtype == (torch.int8 if fmt == "int8" else torch.uint8)
               for name in weights if name.endswith(QWEIGHT))
    ids = data.ids("heldout")[:, :12]
    assert_quantized_program_runs(program, ids)


def test_skip_keeps_roles_and_layers_and_bad_options_are_refused():
    model = tiny_model("llama", num_layers=2)
    program = capture(model)
    data = random_calibration(model, windows=2, length=16)
    Quantize(QuantizeConfig(weights="int8", skip=["lm_head", "embedding", 1]))(program, context(model, data))
    weights = program.state_dict()
    kept = {name for name, tensor in weights.items()
            if tensor.ndim == 2 and tensor.dtype == torch.float32 and not name.endswith(SCALES)}
    assert any("lm_head" in name for name in kept) and any("embed" in name for name in kept)
    assert any("layers__1__" in name for name in kept) and not any("layers__0__" in name for name in kept)
    for option, message in ((("method", "hqq"), "'rtn', 'awq' or 'gptq'"), (("skip", "[norms]"), "unknown role"),
                            (("group_size", "33"), "even")):
        with pytest.raises(LmforgeError, match=message):
            parse_recipe(f"passes:\n  - name: quantize\n    {option[0]}: {option[1]}\n")
    with pytest.raises(LmforgeError, match="layer 5"):
        Quantize(QuantizeConfig(skip=[5]))(capture(model), context(model, data))


def test_a_budget_the_format_misses_is_refused():
    model = tiny_model("llama", num_layers=2)
    data = random_calibration(model, windows=2, length=16)
    with pytest.raises(LmforgeError, match="misses the quality budget"):
        Quantize(QuantizeConfig(weights="int4", group_size=64))(capture(model), context(model, data, max_kl=0.0))


@pytest.fixture(scope="module")
def ref_int8_lookup(ref_path):
    """ref-llama-py stored in int8, with prompt-lookup drafts and the lowered checks of `verify`."""
    recipe = (
        f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 2, eval_samples: 4, seq_len: 128}}\n"
        f"quality_budget: {json.dumps(BUDGET)}\n"
        "passes:\n  - name: cleanup\n  - name: quantize\n    weights: int8\n  - name: prompt_lookup\n"
        # the int8 kernels take bf16 activations: logits differ from the program graph's by bf16 rounding
        "  - name: verify\n    max_logit_error: 0.25\nruntime: {max_seq_len: 256}\n"
    )
    return lmforge.optimize(ref_path, recipe)


def _agreement(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    return (tokens == expected).float().mean().item()


def test_ref_int8_meets_the_budget_and_is_3_9x_smaller(ref_int8_lookup, ref_hf, heldout_prompts, tmp_path):
    quality = ref_int8_lookup.program.meta["quantize"]["heldout_quality"]
    assert quality["ppl_increase"] <= BUDGET["max_ppl_increase"] and quality["top1"] >= BUDGET["min_top1"]
    prompt = torch.tensor([heldout_prompts[0]])
    tokens = ref_int8_lookup.generate(prompt, max_new_tokens=24, eos_token_id=[])
    expected = ref_hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None)
    print(f"int8 greedy agreement with fp32 HF: {_agreement(tokens[0, 40:], expected[0, 40:]):.3f}")
    ref_int8_lookup.save(tmp_path / "artifact")
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    fp32_bytes = sum(tensor.nbytes for tensor in ref_hf.state_dict().values())
    assert fp32_bytes / manifest["weight_bytes"] >= 3.9
    loaded = lmforge.load(tmp_path / "artifact")
    assert torch.equal(loaded.generate(prompt, max_new_tokens=24, eos_token_id=[]), tokens)


def test_ref_int8_with_prompt_lookup_equals_its_own_plain_greedy(ref_int8_lookup, heldout_prompts):
    plain_program = ref_int8_lookup.program.clone()
    plain_program.meta.pop("speculation")
    plain = CompiledModel(plain_program, ref_int8_lookup.recipe, ref_int8_lookup.generation)
    text = heldout_prompts[2]
    prompt = torch.tensor([text + text[:20]])  # repeats itself, so lookup finds drafts
    tokens = ref_int8_lookup.generate(prompt, max_new_tokens=40, eos_token_id=[])
    assert ref_int8_lookup.engine.speculation_stats["drafted"] > 0
    assert torch.equal(tokens, plain.generate(prompt, max_new_tokens=40, eos_token_id=[]))


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_ref_program_greedy_tokens_against_fp32(fmt, ref_path, ref_hf, ref_tokenizer, heldout_prompts):
    budget = {"max_ppl_increase": 0.03} if fmt == "int4" else BUDGET
    data = text_calibration(ref_path, ref_tokenizer, ref_hf, samples=2, seq_len=64)
    program = capture(ref_hf)
    Quantize(QuantizeConfig(weights=fmt))(program, context(ref_hf, data, **budget))
    quality = program.meta["quantize"]["heldout_quality"]
    assert quality["ppl_increase"] <= budget["max_ppl_increase"] and quality["top1"] >= budget.get("min_top1", 0)
    prompt = torch.tensor([heldout_prompts[1]])
    with torch.no_grad():
        tokens = greedy_extend(lambda ids: full_logits(program, ids), prompt, 16)
        expected = ref_hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
    print(f"{fmt} greedy agreement with fp32 HF: {_agreement(tokens[0, 25:], expected[0, 25:]):.3f}")
