"""`ffn_skip`: static removal and per-token dynamic skipping of FFN blocks."""

import copy

import pytest
import torch
from lossy_helpers import context, random_calibration, text_calibration
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import lmforge
from lmforge.codegen.cpu import compile_aten
from lmforge.compiler.capture import capture
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import decoded_logits, full_logits
from lmforge.passes.ffn_skip import FFNSkip, FFNSkipConfig, find_ffn_block, make_dynamic
from lmforge.runtime.kv_cache import StaticKVCache

aten = torch.ops.aten
MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default}


class _WeightReads(TorchDispatchMode):
    """Records the data pointers of every tensor that reaches a matmul."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.pointers: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.higher_order.cond:
            predicate, on_true, on_false, operands = args
            with self:  # the mode is off while it handles an op; the branch's ops count too
                return (on_true if predicate else on_false)(*operands)
        if func in MATMULS:
            self.pointers += [arg.data_ptr() for arg in args if isinstance(arg, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def _ffn_weights(model, layer: int) -> set[int]:
    mlp = model.model.layers[layer].mlp
    return {p.data_ptr() for p in mlp.parameters()}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt", "olmo2"])
def test_static_removal_equals_the_model_with_that_ffn_zeroed(arch):
    model = tiny_model(arch, num_layers=3)
    program = capture(model)
    linears = sum(node.target is aten.linear.default or node.target is aten.addmm.default
                  for node in program.graph_module.graph.nodes)
    result = FFNSkip(FFNSkipConfig(mode="static", layers=[1]))(program, context(model, random_calibration(model)))
    assert result.measurements["layers"] == [1] and program.meta["ffn_skip"]["mode"] == "static"
    after = sum(node.target is aten.linear.default or node.target is aten.addmm.default
                for node in program.graph_module.graph.nodes)
    assert after == linears - 2 - (arch in ("llama", "gemma2", "olmo2"))
    assert not any(".1.mlp" in name.replace("__", ".") or ".1.fc" in name.replace("__", ".")
                   for name in program.state_dict())
    zeroed = copy.deepcopy(model)
    blocks = zeroed.transformer.h if arch == "gpt2" else zeroed.model.decoder.layers if arch == "opt" else zeroed.model.layers
    block = blocks[1]
    last = block.mlp.c_proj if arch == "gpt2" else block.fc2 if arch == "opt" else block.mlp.down_proj
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    ids = torch.randint(3, 256, (2, 14))
    with torch.no_grad():
        expected = zeroed(ids).logits
    torch.testing.assert_close(full_logits(program, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt_neox", "phi"])
def test_parallel_attention_and_ffn_is_refused_with_the_reason(arch):
    program = capture(tiny_model(arch))
    with pytest.raises(LmforgeError, match="no sequential FFN block.*in parallel"):
        find_ffn_block(program, 1)


def _decode_step_reads(runner, program, model, prompt_len: int, steps: int, generated_offset: int = 0):
    """Per decode step: did the step read layer 2's FFN weights, and how many matmuls ran."""
    ids = torch.randint(3, 256, (1, prompt_len + steps))
    cache = StaticKVCache(program.meta["kv_cache"], 1, prompt_len + steps, torch.float32)
    positions = torch.arange(prompt_len + steps)[None]
    with attention_context(AttentionContext(kv=cache.buffers, start=0, q_len=prompt_len)):
        runner(ids[:, :prompt_len], positions[:, :prompt_len])
    reads, counts = [], {}
    for step in range(prompt_len, prompt_len + steps):
        context_ = AttentionContext(kv=cache.buffers, start=step, q_len=1, generated=step - prompt_len, skip_counts=counts)
        recorder = _WeightReads()
        with attention_context(context_), recorder:
            runner(ids[:, step : step + 1], positions[:, step : step + 1])
        reads.append((bool(_ffn_weights(model, 2) & set(recorder.pointers)), len(recorder.pointers)))
    return reads, counts


@pytest.mark.parametrize("backend", ["fx", "aten"])
def test_dynamic_skips_read_no_ffn_weights_after_warmup(backend):
    model = tiny_model("llama", num_layers=4)
    program = capture(model)
    make_dynamic(program, [2, 3], threshold=-1.0, warmup=3)  # every gate opens once warm-up is over
    assert not any(node.target is aten.linear.default for node in program.layers[2].ffn)
    runner = program.graph_module if backend == "fx" else compile_aten(program.graph_module)
    reads, counts = _decode_step_reads(runner, program, model, prompt_len=6, steps=7)
    assert [read for read, _ in reads] == [True] * 3 + [False] * 4
    full, skipping = reads[0][1], reads[-1][1]
    assert full - skipping == 2 * 2 * 3  # two layers x three FFN linears x (input, weight)
    assert counts == {2: 4, 3: 4}


def test_dynamic_never_skips_when_the_stream_keeps_turning_and_matches_the_model():
    model = tiny_model("llama", num_layers=4)
    program = capture(model)
    make_dynamic(program, [1, 2, 3], threshold=1.0, warmup=0)
    ids = torch.randint(3, 256, (2, 16))
    counts: dict[int, int] = {}
    torch.testing.assert_close(decoded_logits(program, ids, 6, counts), full_logits(capture(model), ids),
                               atol=1e-4, rtol=1e-5)
    assert counts == {}


def test_kv_share_and_dynamic_ffn_skip_compose_save_load_and_generate(tmp_path, ref_path):
    recipe = (
        f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 4, eval_samples: 4, seq_len: 64}}\n"
        "passes:\n  - name: cleanup\n  - name: kv_share\n    mode: explicit\n    groups: [[1, 2]]\n"
        "  - name: ffn_skip\n    mode: dynamic\n    threshold: 0.99\n    warmup: 2\n"
        "  - name: fuse_projections\n  - name: verify\nruntime: {max_seq_len: 256}\n"
    )
    compiled = lmforge.optimize(ref_path, recipe)
    passes = [entry["pass"] for entry in compiled.program.history]
    assert passes == ["cleanup", "kv_share", "ffn_skip", "fuse_projections", "verify"]
    assert 0 < compiled.program.history[2]["measurements"]["heldout_skipped"] < 1
    assert compiled.program.history[-1]["measurements"]["lossy_passes"] == ["kv_share", "ffn_skip"]
    assert len({entry["cache"] for entry in compiled.program.meta["kv_cache"]}) == 7
    prompt = torch.tensor([[40, 41, 42, 10, 11, 12, 40, 41]])
    compiled.engine.skip_counts = {}
    tokens = compiled.generate(prompt, max_new_tokens=24)
    assert sum(compiled.engine.skip_counts.values()) > 0
    forced = decoded_logits(compiled.program, tokens, prompt.shape[1]).argmax(-1)  # what the pass measured
    assert torch.equal(forced[:, prompt.shape[1] - 1 : -1], tokens[:, prompt.shape[1] :])
    compiled.save(tmp_path / "artifact")
    loaded = lmforge.load(tmp_path / "artifact")
    assert loaded.program.meta["ffn_skip"]["threshold"] == 0.99 and loaded.program.meta["kv_share"]["groups"][1] == [1, 2]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=24), tokens)


def test_static_auto_and_dynamic_respect_the_budget_on_heldout_text(ref_path, ref_tokenizer, ref_hf, ref_program):
    data = text_calibration(ref_path, ref_tokenizer, ref_hf, samples=4, seq_len=128)
    static = ref_program.clone()
    FFNSkip(FFNSkipConfig(mode="static"))(static, context(ref_hf, data, max_ppl_increase=0.06))
    assert 1 <= len(static.meta["ffn_skip"]["layers"]) and data.program_quality(static).ppl_increase <= 0.06
    dynamic = ref_program.clone()
    config = FFNSkipConfig(mode="dynamic", thresholds=[0.999, 0.995, 0.99, 0.98])
    result = FFNSkip(config)(dynamic, context(ref_hf, data, max_ppl_increase=0.05))
    measured = data.program_quality(dynamic)  # decodes, since the program now decides per token
    assert measured.ppl_increase <= 0.05 and result.measurements["threshold"] in config.thresholds
    with pytest.raises(LmforgeError, match=r"ffn_skip: .*costs perplexity \+\d+\.\d\d%"):
        FFNSkip(FFNSkipConfig(mode="static"))(ref_program.clone(), context(ref_hf, data, max_ppl_increase=0.0001))
