"""`quantize` with calibration: GPTQ and AWQ on single layers against round to nearest,
AWQ's folding as exact algebra, outliers kept exactly (format, kernel, program), skip by
position, recipe errors, and mixed precision under a quality budget."""

import pytest
import torch
from lossy_helpers import assert_quantized_program_runs, context, random_calibration
from tiny_models import tiny_model

from lmforge.codegen.cpu_quantized import kernel_operands
from lmforge.compiler.artifact import load_artifact, save_artifact
from lmforge.compiler.awq import fold_input_scales, search_scales
from lmforge.compiler.capture import capture
from lmforge.compiler.gptq import gptq_quantize, hessian
from lmforge.compiler.quantized import OUTLIER_INDEX, SCALES, quantize_int4, quantize_int8
from lmforge.compiler.recipe import parse_recipe
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import full_logits
from lmforge.passes.quantize import Quantize, QuantizeConfig, linear_readers, outlier_mask, round_to_nearest


def _correlated_layer(seed: int = 0, rows: int = 512, columns: int = 128, outputs: int = 48):
    """Inputs whose channels are correlated and unevenly scaled, as a transformer's are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) * 0.3 + torch.eye(columns)
    inputs = torch.randn(rows, columns, generator=generator) @ mixing * torch.logspace(-1, 0.5, columns)
    return inputs, torch.randn(outputs, columns, generator=generator) * 0.05


def _output_error(inputs: torch.Tensor, weight: torch.Tensor, effective: torch.Tensor) -> float:
    return (inputs @ effective.T - inputs @ weight.T).pow(2).mean().item()


@pytest.mark.parametrize("fmt,act_order", [("int4", False), ("int4", True), ("int8", False), ("int8", True)])
def test_gptq_has_less_output_error_than_round_to_nearest(fmt, act_order):
    inputs, weight = _correlated_layer()
    rtn = quantize_int4(weight, 32) if fmt == "int4" else quantize_int8(weight)
    gptq = gptq_quantize(weight, hessian(inputs), fmt, 32, act_order=act_order)
    assert (gptq.format, gptq.qweight.shape, gptq.scales.shape) == (rtn.format, rtn.qweight.shape, rtn.scales.shape)
    assert _output_error(inputs, weight, gptq.dequantize()) < 0.9 * _output_error(inputs, weight, rtn.dequantize())


def test_gptq_with_an_identity_hessian_rounds_to_nearest():
    """Uncorrelated unit inputs leave nothing to compensate: GPTQ's codes are RTN's."""
    _, weight = _correlated_layer()
    gptq = gptq_quantize(weight, torch.eye(weight.shape[1]), "int8", damp=1e-6)
    assert torch.equal(gptq.qweight, quantize_int8(weight).qweight)


def test_awq_search_finds_a_scale_that_beats_round_to_nearest_on_salient_channels():
    inputs, weight = _correlated_layer(columns=64)
    inputs[:, :4] *= 20  # a few channels with large activations
    magnitude = inputs.abs().mean(0)
    scales, alpha, error, rtn_error = search_scales(
        [weight], inputs.T @ inputs / len(inputs), magnitude, lambda w: quantize_int4(w, 32).dequantize())
    assert 0 < alpha <= 1 and error < rtn_error
    effective = quantize_int4(weight * scales, 32).dequantize() / scales
    assert _output_error(inputs, weight, effective) == pytest.approx(error, rel=1e-3)


def test_awq_folding_equals_the_unfolded_computation_before_rounding():
    """Scaling weight columns by s and dividing the input by s (in the norm or as a constant)
    is exact algebra: the program's logits do not change."""
    model = tiny_model("llama", num_layers=2)
    program = capture(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = full_logits(program, ids)
    readers = linear_readers(program, {node.target for node in program.graph_module.graph.nodes
                                       if node.op == "get_attr" and "layers" in node.target})
    groups: dict = {}
    for linears in readers.values():
        for linear in linears:
            groups.setdefault(linear.args[0], []).append(linear)
    generator = torch.Generator().manual_seed(1)
    places = []
    for source, linears in groups.items():
        width = getattr(program.graph_module, linears[0].args[1].target).shape[1]
        places.append(fold_input_scales(program, source, linears, torch.rand(width, generator=generator) * 3 + 0.2))
    program.refresh()
    assert sorted(set(places)) == ["input", "norm"]  # q/k/v and gate/up into norms; o and down as constants
    torch.testing.assert_close(full_logits(program, ids), expected, rtol=1e-4, atol=1e-5)


def test_outliers_are_kept_exactly_and_do_not_widen_the_range():
    _, weight = _correlated_layer()
    weight[3, 7] = 5.0  # one huge weight would stretch its group's step
    for fmt in ("int8", "int4"):
        quantized = round_to_nearest(weight, fmt, 32, outliers=0.5)
        mask = outlier_mask(weight, 0.5)
        assert mask[3, 7] and len(quantized.outlier_index) == mask.sum() == round(weight.numel() * 0.005)
        restored = quantized.dequantize()
        assert torch.equal(restored[mask], weight[mask])
        plain = round_to_nearest(weight, fmt, 32)
        assert (restored - weight)[~mask].abs().max() < (plain.dequantize() - weight)[~mask].abs().max()
    exact = outlier_mask(weight, 1.0)
    gptq = gptq_quantize(weight, torch.eye(weight.shape[1]) + 0.1, "int4", 32, exact=exact)
    assert torch.equal(gptq.dequantize()[exact], gptq.outlier_value)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g16"])
@pytest.mark.parametrize("rows", [1, 5])
def test_cpu_kernel_adds_the_outlier_correction(fmt, rows):
    weight = torch.randn(96, 64) * 0.05
    weight[::7, ::5] *= 40
    quantized = round_to_nearest(weight, fmt.split("-")[0], 16 if fmt.endswith("g16") else 32, outliers=2.0)
    holder = torch.nn.Module()
    for name, tensor in quantized.tensors("w").items():
        holder.register_buffer(name, tensor)
    kernel, operands = kernel_operands(holder, fmt.split("-")[0], "w")
    x, bias = torch.randn(1, rows, 64), torch.randn(96)
    expected = torch.nn.functional.linear(x, quantized.dequantize(), bias)
    without = torch.nn.functional.linear(x, quantized.dequantize_codes(), bias)
    tolerance = 1e-2 * expected.abs().max().item()
    torch.testing.assert_close(kernel(x, *operands, bias), expected, rtol=0, atol=tolerance)
    assert (without - expected).abs().max() > 5 * tolerance  # the correction matters at this size


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", num_layers=2)
    return model, random_calibration(model, windows=2, length=16)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_program_with_outliers_decodes_like_its_lowering(tiny, method, tmp_path):
    model, data = tiny
    program = capture(model)
    options = {"act_order": True} if method == "gptq" else {}
    config = QuantizeConfig(weights="int4", method=method, outliers=1.0, **options)
    result = Quantize(config)(program, context(model, data))
    assert result.rewrites == 16 and program.meta["quantize"]["method"] == method
    assert sum(name.endswith(OUTLIER_INDEX) for name in program.state_dict()) == 16
    if method == "awq":
        assert {entry["folded_into"] for entry in result.measurements["awq"]} <= {"norm", "input", "none"}
    ids = data.ids("heldout")[:, :12]
    expected = assert_quantized_program_runs(program, ids)
    if method == "gptq":
        return  # the artifact round trip runs once, for awq: its program also multiplies by input-scale constants
    saved = save_artifact(tmp_path / "artifact", program, recipe_yaml="passes: []\n",
                          generation={"eos_token_ids": [], "pad_token_id": None})
    loaded = load_artifact(saved)[0]
    outliers = {name: tensor for name, tensor in program.state_dict().items() if OUTLIER_INDEX in name}
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in outliers.items())
    torch.testing.assert_close(full_logits(loaded, ids), expected, rtol=0, atol=0)


def test_skip_first_and_last_layers(tiny):
    model, data = tiny
    program = capture(model)
    Quantize(QuantizeConfig(weights="int8", skip=["first"]))(program, context(model, data))
    kept = {name for name, tensor in program.state_dict().items()
            if tensor.ndim == 2 and tensor.dtype == torch.float32 and not name.endswith(SCALES)}
    assert kept and all("layers__0__" in name for name in kept)
    assert program.meta["quantize"]["kept"] == sorted(kept, key=program.meta["quantize"]["kept"].index)
    program = capture(model)
    Quantize(QuantizeConfig(weights="int8", skip=["last", "lm_head"]))(program, context(model, data))
    assert any("layers__1__" in name for name in program.meta["quantize"]["kept"])
    assert not any("layers__0__" in name for name in program.meta["quantize"]["kept"])


@pytest.mark.parametrize("option,message", [
    ("method: awq2", "<recipe>:3: passes\\[0\\].method: Input should be 'rtn', 'awq' or 'gptq'"),
    ("outliers: 20", "<recipe>:3: passes\\[0\\].outliers: Input should be less than or equal to 10"),
    ("weights: bf16\n    outliers: 0.5", "<recipe>:2: .*outliers applies to weights: int8 or int4, not bf16"),
    ("weights: fp16\n    method: gptq", "<recipe>:2: .*method applies to weights: int8 or int4, not fp16"),
    ("skip: [norms]", "unknown role 'norms' in skip; valid: embedding, lm_head, attention, ffn, first, last"),
])
def test_bad_options_name_line_and_choices(option, message):
    with pytest.raises(LmforgeError, match=message):
        parse_recipe(f"passes:\n  - name: quantize\n    {option}\n")


def test_mixed_precision_chooses_per_layer_within_the_budget(tiny):
    model, data = tiny
    all_int4 = capture(model)
    Quantize(QuantizeConfig(weights="int4"))(all_int4, context(model, data))
    int4_kl = all_int4.meta["quantize"]["heldout_quality"]["kl"]
    program = capture(model)
    budget = int4_kl / 4
    result = Quantize(QuantizeConfig(weights="int4", mixed_precision=True))(
        program, context(model, data, max_kl=budget, best_effort=False))
    chosen = program.meta["quantize"]["layers"]
    assert set(chosen) == {"0", "1", "embedding", "lm_head"} and set(chosen.values()) <= {"int4", "int8", "fp32"}
    assert set(chosen.values()) != {"int4"} and set(chosen.values()) != {"fp32"}
    assert program.meta["quantize"]["heldout_quality"]["kl"] <= budget
    assert set(result.measurements["sensitivity"]) == set(chosen) and result.measurements["steps"]
    assert any(note.startswith("mixed precision per layer") for note in result.notes)


def test_mixed_precision_refuses_without_a_budget_or_when_everything_would_stay_fp32(tiny):
    model, data = tiny
    with pytest.raises(LmforgeError, match="mixed_precision chooses formats under a quality budget"):
        Quantize(QuantizeConfig(weights="int4", mixed_precision=True))(capture(model), context(model, data))
    with pytest.raises(LmforgeError, match="keeps every layer in fp32"):
        Quantize(QuantizeConfig(weights="int8", mixed_precision=True))(capture(model), context(model, data, max_kl=0.0))
