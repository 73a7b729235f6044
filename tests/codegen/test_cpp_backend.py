"""The `cpp` backend (the whole step compiled by Inductor per shape bucket) decodes greedy
tokens identical to Hugging Face, keeps cached and cache-free logits equal, never recompiles
a bucket inside the decoding loop, and refuses the ops it cannot compile.

Each model compiles once per module (a prefill, a decode, a verify and a cache-free bucket);
Inductor's C++ cache makes a second run of this file faster."""

import pytest
import torch
import torch._dynamo.utils
from tiny_models import tiny_model

import lmforge
from lmforge.codegen.cpu import lower
from lmforge.compiler.capture import capture
from lmforge.compiler.pipeline import Provenance
from lmforge.compiler.recipe import CodegenConfig
from lmforge.errors import LmforgeError
from lmforge.passes.kv_evict import make_evicting

RECIPE = "passes: [{name: cleanup}, {name: fuse_projections}]\ncodegen: {backend: cpp}\nruntime: {max_seq_len: 64}\n"


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tiny(request):
    model = tiny_model(request.param)
    return model, lmforge.optimize(model, RECIPE)


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 12 tokens, the first left-padded by 4."""
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask


def test_greedy_tokens_match_hf_on_a_left_padded_batch(tiny):
    model, compiled = tiny
    ids, mask = _left_padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=12, eos_token_id=[]), expected[:, : ids.shape[1] + 12])


def test_cached_logits_equal_cache_free_logits(tiny):
    """Prefill and decode steps, then a 3-token verify forward (run padded to a 4-token
    bucket) over the last slots again, against one cache-free forward of the whole text."""
    _, compiled = tiny
    ids, mask = _left_padded_batch()
    engine, step_logits = compiled.engine, []
    plain_step = engine.step

    def recording_step(*args, **kwargs):
        logits = plain_step(*args, **kwargs)
        step_logits.append(logits if logits.dim() == 2 else logits[:, 0])
        return logits

    engine.step = recording_step
    try:
        tokens = compiled.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    finally:
        del engine.step
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], dim=1)
    free = compiled(tokens[:, :-1], full_mask[:, :-1]).logits
    prompt = ids.shape[1]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), free[:, prompt - 1 :], atol=1e-4, rtol=1e-4)
    added = engine.prompt_padding  # cache slots the prompt was padded by, before its own left padding
    pad = added + (1 - mask).sum(dim=1)
    slots = torch.arange(prompt + 2, prompt + 5) + added
    with torch.no_grad():
        verified = engine.step(tokens[:, prompt + 2 : prompt + 5], slots - pad[:, None], int(slots[0]), pad,
                               every_position=True)
    torch.testing.assert_close(verified, free[:, prompt + 2 : prompt + 5], atol=1e-4, rtol=1e-4)


def test_no_bucket_recompiles_inside_the_decoding_loop(tiny):
    """After one generate has compiled its buckets, another of different lengths (same
    buckets) compiles nothing: the in-loop step is the compiled one, not a recompile."""
    _, compiled = tiny
    ids, mask = _left_padded_batch()
    compiled.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled.generate(ids[:, 1:], mask[:, 1:], max_new_tokens=10, eos_token_id=[])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_reference_checkpoint_greedy_matches_hf(ref_path, ref_hf, heldout_prompts):
    compiled = lmforge.optimize(ref_path, RECIPE)
    ids = torch.tensor([heldout_prompts[0]])
    expected = ref_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=16, eos_token_id=[]), expected)
    runner = compiled.engine.runner
    assert set(runner.compile_seconds) == {f"batch=1 tokens={tokens} {rows} threads={torch.get_num_threads()}"
                                           for tokens, rows in ((48, "last"), (1, "all"))}


def test_unsupported_attention_is_refused_naming_the_pass():
    program = capture(tiny_model("qwen2"))
    provenance = Provenance()
    provenance.before_pass(0, None, program)
    make_evicting(program, [0, 1], capacity=32, recent=8, decay=0.9, observe=8)
    provenance.after_pass(0, type("KVEvictStandIn", (), {"name": "kv_evict"})(), program, None)
    with pytest.raises(LmforgeError, match=r"^codegen backend cpp cannot compile lmforge::evicting_attention from pass "
                                           r"kv_evict: .*use backend aten"):
        lower(program, CodegenConfig(backend="cpp"))
