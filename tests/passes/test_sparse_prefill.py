"""sparse_prefill: exact with every block, per-head patterns chosen and honoured, short
prompts untouched, and a budget that drops too much is refused with a clear message."""

import pytest
import torch
from lossy_helpers import context, text_calibration

from lmforge.codegen.cpu import lower
from lmforge.compiler.capture import capture
from lmforge.compiler.ops import sparse_attention
from lmforge.compiler.recipe import CodegenConfig
from lmforge.compiler.sparse_patterns import PATTERNS
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import full_logits
from lmforge.passes.sparse_prefill import SparsePrefill, make_sparse
from lmforge.runtime.engine import Engine

OPTIONS = dict(min_length=256, block=32, seq_len=512, samples=1, eval_samples=1)


@pytest.fixture(scope="module")
def ref_data(ref_path, ref_tokenizer, ref_hf):
    return text_calibration(ref_path, ref_tokenizer, ref_hf, samples=2, seq_len=128)


@pytest.fixture(scope="module")
def long_ids(ref_data):
    return ref_data.at_length(600, 1, 1).ids("heldout")


def test_every_block_selected_is_exactly_dense(ref_hf, long_ids):
    program, dense = capture(ref_hf), capture(ref_hf)
    patterns = {layer: [layer % len(PATTERNS)] * 8 for layer in range(8)}
    make_sparse(program, patterns, budget=1000, block=32, min_length=256)
    torch.testing.assert_close(full_logits(program, long_ids), full_logits(dense, long_ids), atol=1e-4, rtol=0)


def test_pass_chooses_patterns_and_only_long_prefills_are_sparse(ref_hf, ref_data, long_ids):
    program, dense = capture(ref_hf), capture(ref_hf)
    result = SparsePrefill(SparsePrefill.Config(budget=4, **OPTIONS))(program, context(ref_hf, ref_data))
    decision = program.meta["sparse_prefill"]
    assert sum(node.target is sparse_attention for node in program.graph_module.graph.nodes) == 8
    assert all(len(heads) == 8 and set(heads) <= set(PATTERNS) for heads in decision["patterns"].values())
    assert "copy task accuracy" in result.notes[-1] and result.measurements["density"] < 0.5
    # each head got the pattern with the best measured recall
    for layer, heads in decision["patterns"].items():
        recall = torch.tensor(decision["recall"][layer])
        assert [PATTERNS[i] for i in recall.argmax(0).tolist()] == heads
    sparse_logits, dense_logits = full_logits(program, long_ids), full_logits(dense, long_ids)
    assert not torch.allclose(sparse_logits, dense_logits, atol=1e-3)  # blocks were really left out
    short = long_ids[:, :200]
    torch.testing.assert_close(full_logits(program, short), full_logits(dense, short), atol=1e-4, rtol=0)
    engine = Engine(lower(program, CodegenConfig()), program.meta["kv_cache"], max_seq_len=700)
    tokens = engine.generate(long_ids[:, :300], max_new_tokens=1)
    assert int(tokens[0, -1]) == int(full_logits(program, long_ids[:, :300])[0, -1].argmax())


def test_a_budget_that_drops_too_much_is_refused_by_the_quality_check(ref_hf, ref_data):
    with pytest.raises(LmforgeError, match="sparse_prefill: a budget of 2 blocks .* misses the quality budget"):
        SparsePrefill(SparsePrefill.Config(budget=2, **OPTIONS))(capture(ref_hf),
                                                                   context(ref_hf, ref_data, max_kl=1e-4))


def test_nothing_left_to_make_sparse_is_a_note_not_an_error(ref_hf, ref_data):
    from lmforge.passes.streaming_heads import split_heads

    program = capture(ref_hf)
    split_heads(program, {layer: [True] * 4 for layer in range(8)}, 4, 64, 8)
    result = SparsePrefill(SparsePrefill.Config(budget=4, **OPTIONS))(program, context(ref_hf, ref_data))
    assert result.rewrites == 0 and "no layer left to make sparse" in result.notes[0]
    assert "sparse_prefill" not in program.meta
