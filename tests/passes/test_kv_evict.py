"""kv_evict: a fixed cache per head that evicts by accumulated attention; exact while
everything fits, equal to attention over exactly the kept tokens when it does not."""

import pytest
import torch
from lossy_helpers import context, text_calibration
from tiny_models import tiny_model

from lmforge.codegen.aten.attention import attention_reference
from lmforge.codegen.cpu import lower
from lmforge.compiler.capture import capture
from lmforge.compiler.kv_layout import EvictingSlot, kv_cache_bytes
from lmforge.compiler.ops import AttentionContext, attention_context, evicting_attention
from lmforge.compiler.recipe import CodegenConfig
from lmforge.errors import LmforgeError
from lmforge.passes.kv_evict import KVEvict, make_evicting
from lmforge.passes.prompt_lookup import PromptLookupPass
from lmforge.runtime.engine import Engine


def test_evicting_cache_that_holds_everything_decodes_exactly():
    model = tiny_model("qwen2")
    program, plain = capture(model), capture(model)
    make_evicting(program, [0, 1], capacity=200, recent=8, decay=0.9, observe=8)
    prompt = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens = Engine(lower(program, CodegenConfig()), program.meta["kv_cache"], max_seq_len=128).generate(prompt, max_new_tokens=40)
    expected = Engine(lower(plain, CodegenConfig()), plain.meta["kv_cache"], max_seq_len=128).generate(prompt, max_new_tokens=40)
    assert torch.equal(tokens, expected)


def test_decoding_attends_to_exactly_the_kept_tokens_and_the_cache_stays_fixed():
    generator = torch.Generator().manual_seed(0)
    length, prompt, capacity, recent = 120, 50, 24, 6
    q, k, v = (torch.randn(1, heads, length, 16, generator=generator) for heads in (4, 2, 2))
    slot = EvictingSlot.allocate(1, 2, 16, capacity, recent, decay=0.9, observe=8, dtype=torch.float32)
    with attention_context(AttentionContext(kv=[slot], start=0, q_len=prompt)):
        evicting_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], 0, 0.25, 0, 0.0)
    for step in range(prompt, length):
        kept = slot.slots.clone()
        with attention_context(AttentionContext(kv=[slot], start=step, q_len=1)):
            out = evicting_attention(q[:, :, step:step + 1], k[:, :, step:step + 1], v[:, :, step:step + 1], 0, 0.25, 0, 0.0)
        visible = torch.zeros(1, 2, 1, step + 1, dtype=torch.bool)
        for head in range(2):
            visible[0, head, 0, kept[0, head][kept[0, head] >= 0]] = True
        visible[..., step] = True
        mask = visible.repeat_interleave(2, dim=1)
        expected = attention_reference(q[:, :, step:step + 1], k[:, :, : step + 1], v[:, :, : step + 1], mask, 0.25, 0.0)
        torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)
        assert slot.keys.shape[2] == capacity and int((slot.slots >= 0).sum(-1).max()) <= capacity
        for head in range(2):  # the last `recent` tokens are never evicted
            assert set(range(step + 1 - recent, step + 1)) <= set(slot.slots[0, head].tolist())


@pytest.fixture(scope="module")
def ref_data(ref_path, ref_tokenizer, ref_hf):
    return text_calibration(ref_path, ref_tokenizer, ref_hf, samples=2, seq_len=128)


def test_pass_measures_by_decoding_and_refuses_draft_sources(ref_hf, ref_data):
    program = capture(ref_hf)
    config = KVEvict.Config(capacity=96, recent=32, seq_len=256, samples=1, eval_samples=1)
    result = KVEvict(config)(program, context(ref_hf, ref_data))
    assert program.meta["kv_evict"]["capacity"] == 96 and "teacher-forced decoding" in result.notes[-1]
    assert program.meta["kv_evict"]["heldout_quality"]["top1"] < 1.0  # eviction changed decoded predictions
    assert kv_cache_bytes(program.meta["kv_cache"], 2048) < kv_cache_bytes(capture(ref_hf).meta["kv_cache"], 2048) / 10
    with pytest.raises(LmforgeError, match="kv_evict caches decode one token per forward"):
        PromptLookupPass()(program, context(ref_hf, ref_data))
    drafting = capture(ref_hf)
    PromptLookupPass()(drafting, context(ref_hf, ref_data))
    with pytest.raises(LmforgeError, match="kv_evict: the program drafts tokens"):
        KVEvict(config)(drafting, context(ref_hf, ref_data))


def test_evicting_program_survives_an_artifact(tmp_path, ref_path):
    import lmforge

    recipe = (f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 2, eval_samples: 2, seq_len: 64}}\n"
              "passes:\n  - name: cleanup\n  - name: kv_evict\n    capacity: 48\n    recent: 16\n    seq_len: 160\n"
              "    samples: 1\n    eval_samples: 1\n  - name: fuse_projections\nruntime: {max_seq_len: 256}\n")
    compiled = lmforge.optimize(ref_path, recipe)
    prompt = torch.arange(5, 105)[None]
    tokens = compiled.generate(prompt, max_new_tokens=30, eos_token_id=[])
    compiled.save(tmp_path / "artifact")
    reloaded = lmforge.load(tmp_path / "artifact")
    assert reloaded.program.meta["kv_cache"][0]["kind"] == "evict"
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=30, eos_token_id=[]), tokens)
