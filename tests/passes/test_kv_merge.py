"""`kv_share` mode `merge` (MiniCache): merged slots, retention, decoding, artifacts."""

import pytest
import torch
from lossy_helpers import context, random_calibration
from tiny_models import tiny_model

import lmforge
from lmforge.compiler.capture import capture
from lmforge.compiler.kv_layout import MergedSlot, kv_cache_bytes
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import decoded_logits, full_logits
from lmforge.passes.kv_merge import merge_pairs, retain_thresholds
from lmforge.passes.kv_share import KVShare, KVShareConfig
from lmforge.runtime.kv_cache import StaticKVCache


def test_retaining_every_token_is_exact_and_merging_changes_only_decoding():
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(3, 256, (2, 20))
    reference = full_logits(capture(model), ids)
    exact = capture(model)
    merge_pairs(exact, [[1, 2]], 0.6, 1.0, [-1.0])  # every token-head above angle -1: all retained
    torch.testing.assert_close(decoded_logits(exact, ids, 8), reference, atol=1e-4, rtol=1e-5)
    merged = capture(model)
    merge_pairs(merged, [[1, 2]], 0.6, 0.0, retain_thresholds(merged, ids, [[1, 2]], 0.0, 0.6))
    torch.testing.assert_close(full_logits(merged, ids), reference)  # a prefill / cache-free forward is exact
    decoded = decoded_logits(merged, ids, 8)
    torch.testing.assert_close(decoded[:, :8], reference[:, :8], atol=1e-4, rtol=1e-5)
    assert (decoded[:, 8:] - reference[:, 8:]).abs().max() > 1e-3


def test_merged_slots_store_fewer_bytes_and_retention_respects_capacity():
    model = tiny_model("llama", num_layers=4)
    program = capture(model)
    plain_bytes = kv_cache_bytes(program.meta["kv_cache"], 512)
    merge_pairs(program, [[0, 1], [2, 3]], 0.6, 0.1, [0.0, 0.0])  # every token-head wants to be retained
    layout = program.meta["kv_cache"]
    assert [entry["cache"] for entry in layout] == [0, 0, 2, 2] and layout[1]["member"] == 1
    merged_bytes = kv_cache_bytes(layout, 512)
    assert merged_bytes < 0.7 * plain_bytes
    cache = StaticKVCache(layout, 1, 64, torch.float32)
    assert cache.nbytes() == kv_cache_bytes(layout, 64) and isinstance(cache.buffers[0], MergedSlot)
    ids = torch.randint(3, 256, (1, 64))
    # capacity is ceil(0.1 * 64) = 7 rows per head, and no more are used however many tokens want one
    buffers = cache.buffers
    with attention_context(AttentionContext(kv=buffers, start=0, q_len=64)):
        program(ids, torch.arange(64)[None])
    assert int(buffers[0].retained_count.max()) == 7 and int((buffers[0].retained_index >= 0).sum(-1).max()) == 7


def test_generation_matches_teacher_forced_decoding_and_survives_an_artifact(tmp_path, ref_path):
    recipe = (
        f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 2, eval_samples: 2, seq_len: 64}}\n"
        "passes:\n  - name: kv_share\n    mode: merge\n    groups: [[5, 6]]\n  - name: cleanup\n  - name: fuse_projections\n"
        "runtime: {max_seq_len: 128}\n"
    )
    compiled = lmforge.optimize(ref_path, recipe)
    assert compiled.program.meta["kv_share"]["groups"] == [[5, 6]]
    prompt = torch.tensor([[40, 41, 42, 10, 11, 12, 40, 41, 9, 9]])
    tokens = compiled.generate(prompt, max_new_tokens=16, eos_token_id=[])
    forced = decoded_logits(compiled.program, tokens, prompt.shape[1]).argmax(-1)
    assert torch.equal(forced[:, prompt.shape[1] - 1 : -1], tokens[:, prompt.shape[1] :])
    compiled.save(tmp_path / "merged")
    loaded = lmforge.load(tmp_path / "merged")
    assert torch.equal(loaded.generate(prompt, max_new_tokens=16, eos_token_id=[]), tokens)


def test_merge_pairs_are_validated():
    model = tiny_model("llama", num_layers=4)
    data = random_calibration(model)
    for groups, message in [([[0, 2]], "two adjacent layers"), ([[0, 1], [1, 2]], "two groups"), ([[3, 4]], "does not exist")]:
        with pytest.raises(LmforgeError, match=message):
            KVShare(KVShareConfig(mode="merge", groups=groups))(capture(model), context(model, data))


def test_rewriting_positions_frees_their_retained_rows():
    from lmforge.compiler.kv_layout import merge_into

    slot = MergedSlot.allocate(1, 2, 16, 4, capacity=8, dtype=torch.float32)
    keys = [torch.randn(1, 2, 6, 4) for _ in range(2)]
    values = [torch.randn(1, 2, 6, 4) for _ in range(2)]
    merge_into(slot, 0, keys, values, 0.6, -1.0)  # every token-head retained: 6 of 8 rows
    assert slot.retained_count.tolist() == [[6, 6]]
    merge_into(slot, 4, [k[:, :, :2] for k in keys], [v[:, :, :2] for v in values], 0.6, -1.0)  # positions 4, 5 again
    assert slot.retained_count.tolist() == [[6, 6]] and slot.retained_index[0, 0, :6].tolist() == [0, 1, 2, 3, 4, 5]
