"""streaming_heads: the head split decodes exactly like recomputation under the streaming
masks with a fixed-size ring cache, and the pass chooses, reports and saves head kinds."""

import json

import pytest
import torch
import yaml
from lossy_helpers import context, text_calibration
from tiny_models import tiny_model

import lmforge
from lmforge.codegen.cpu import lower
from lmforge.compiler.attention_patterns import FILENAME, load_patterns
from lmforge.compiler.capture import capture
from lmforge.compiler.kv_layout import RingSlot, kv_cache_bytes
from lmforge.compiler.ops import streaming_attention
from lmforge.compiler.recipe import CodegenConfig
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import full_logits, greedy_extend
from lmforge.passes.streaming_heads import StreamingHeads, split_heads
from lmforge.runtime.engine import Engine

SINK, WINDOW, SLACK = 2, 12, 6


def _engine(program, speculation=None):
    return Engine(lower(program, CodegenConfig()), program.meta["kv_cache"], max_seq_len=200, speculation=speculation)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_split_heads_decode_equals_recomputation_with_a_fixed_ring(arch):
    model = tiny_model(arch)
    program = capture(model)
    kv_heads = program.meta["kv_cache"][0]["kv_heads"]
    kinds = {0: [True] * kv_heads, 1: [head % 2 == 0 for head in range(kv_heads)]}
    assert split_heads(program, kinds, SINK, WINDOW, SLACK) == 2
    assert sum(node.target is streaming_attention for node in program.graph_module.graph.nodes) == 2
    engine = _engine(program)
    prompt = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    steps = 3 * WINDOW + 5
    tokens = engine.generate(prompt, max_new_tokens=steps)
    rings = [buffer for buffer in engine.cache.buffers if isinstance(buffer, RingSlot)]
    capacities = [entry["streaming"]["capacity"] for entry in program.meta["kv_cache"]]
    assert [ring.keys.shape[2] for ring in rings] == capacities  # sink + window + slack (no sinks on gemma2's
    assert max(capacities) == SINK + WINDOW + SLACK               # sliding-window layers), after 3x the window
    expected = greedy_extend(lambda ids: full_logits(program, ids), prompt, steps)
    assert torch.equal(tokens, expected)
    # the cache no longer grows with the context for streaming heads
    grows = kv_cache_bytes(program.meta["kv_cache"], 2000) - kv_cache_bytes(program.meta["kv_cache"], 1000)
    dense = capture(model).meta["kv_cache"]
    assert grows < kv_cache_bytes(dense, 2000) - kv_cache_bytes(dense, 1000)


def test_streaming_heads_with_padding_and_prompt_lookup_equal_plain_decoding(ref_program, heldout_prompts):
    program = ref_program.clone()
    split_heads(program, {layer: [True, False, True, layer % 2 == 0] for layer in range(8)}, SINK, WINDOW, SLACK)
    first, second = heldout_prompts[0], heldout_prompts[2]
    prompts = torch.zeros(2, len(second), dtype=torch.long)
    mask = torch.zeros_like(prompts)
    prompts[0, -len(first):], prompts[1] = torch.tensor(first), torch.tensor(second)
    mask[0, -len(first):], mask[1] = 1, 1
    plain = _engine(program).generate(prompts, mask, max_new_tokens=60)
    lookup = _engine(program, {"prompt_lookup": {"num_draft": 5, "max_ngram": 3, "min_ngram": 1}})
    assert torch.equal(lookup.generate(prompts, mask, max_new_tokens=60), plain)
    stats = lookup.speculation_stats
    assert 0 < stats["accepted"] < stats["drafted"]  # drafts were accepted and rejected across the ring


@pytest.fixture(scope="module")
def ref_data(ref_path, ref_tokenizer, ref_hf):
    return text_calibration(ref_path, ref_tokenizer, ref_hf, samples=2, seq_len=128)


def test_attention_mass_pass_reports_saves_and_reloads_head_kinds(ref_hf, ref_program, ref_data, ref_path, tmp_path):
    config = StreamingHeads.Config(method="attention_mass", streaming_fraction=0.5, window=64, seq_len=320,
                                   samples=2, eval_samples=2)
    recipe = {"passes": [{"name": "streaming_heads", **config.model_dump(exclude_none=True)}],
              "calibration": {"data": str(ref_path / "heldout.txt"), "samples": 2, "eval_samples": 2, "seq_len": 128}}
    artifact = lmforge.optimize(ref_path, yaml.safe_dump(recipe))  # the pass runs once, inside the pipeline
    entry = next(entry for entry in artifact.program.history if entry["pass"] == "streaming_heads")
    decision = artifact.program.meta["streaming_heads"]
    assert sum(sum(kinds) for kinds in decision["kinds"].values()) == 16  # half of 8 layers x 4 KV heads
    assert set(decision["copy_accuracy"]) == {"dense", "dense_without_source", "streaming"} and "copy task accuracy" in entry["notes"][-1]
    assert decision["heldout_quality"]["top1"] < 1.0  # streaming really changed predictions past the window
    saved = artifact.save(tmp_path / "artifact")
    document = json.loads((saved / FILENAME).read_text())
    assert document["model"]["name"] == "ref-llama-py" and document["streaming_heads"]["kinds"]
    reloaded = lmforge.load(saved)
    ids = torch.arange(3, 403)[None] % 4000
    torch.testing.assert_close(reloaded(ids).logits, artifact(ids).logits)
    reused = ref_program.clone()
    StreamingHeads(StreamingHeads.Config(patterns=str(saved), window=64, seq_len=320, samples=2, eval_samples=2))(
        reused, context(ref_hf, ref_data))
    assert reused.meta["streaming_heads"]["kinds"] == document["streaming_heads"]["kinds"]
    with pytest.raises(LmforgeError, match="was made for model 'ref-llama-py'.*not for 'llama'"):
        load_patterns(saved, capture(tiny_model("llama")).meta, tiny_model("llama").config)


def test_gates_train_resume_and_rank_heads(ref_hf, ref_program, ref_data, tmp_path):
    options = dict(method="gates", streaming_fraction=0.25, window=64, seq_len=320, samples=2, eval_samples=2,
                   gate_steps=3, checkpoint=str(tmp_path / "gates.safetensors"))  # mechanics, not a trained ranking
    program = ref_program.clone()
    result = StreamingHeads(StreamingHeads.Config(**options))(program, context(ref_hf, ref_data))
    gates = [value for values in program.meta["streaming_heads"]["scores"].values() for value in values]
    assert min(gates) < 1.0 and len(result.measurements["gate_losses"]) > 0  # trained away from the init
    again = ref_program.clone()
    resumed = StreamingHeads(StreamingHeads.Config(**options))(again, context(ref_hf, ref_data))
    assert resumed.measurements["gate_losses"] == []  # the checkpoint already holds every step
    assert again.meta["streaming_heads"]["scores"] == program.meta["streaming_heads"]["scores"]


def test_a_budget_that_streaming_cannot_meet_is_a_clear_error(ref_hf, ref_program, ref_data):
    config = StreamingHeads.Config(method="attention_mass", streaming_fraction=1.0, sink=0, window=4, seq_len=320,
                                   samples=2, eval_samples=2)
    with pytest.raises(LmforgeError, match="streaming_heads: streaming 100% of the KV heads misses the quality budget"):
        StreamingHeads(config)(ref_program.clone(), context(ref_hf, ref_data, max_ppl_increase=0.01))
