"""The `cpp` backend on the reference checkpoint: greedy tokens identical to Hugging Face's
at batch 1, from a generate that compiles exactly two buckets (any length, 1 token).

Kept apart from test_cpp_backend.py: its two buckets of an 8-layer model are the costliest
compiles of the `cpp` tests, and pytest-xdist (`--dist loadfile`) runs a file on one worker,
so in one file with the tiny models' six buckets they made the suite's longest pole."""

import torch

import lmforge

RECIPE = "passes: [{name: cleanup}, {name: fuse_projections}]\ncodegen: {backend: cpp}\nruntime: {max_seq_len: 64}\n"


def test_reference_checkpoint_greedy_matches_hf(ref_path, ref_hf, heldout_prompts):
    compiled = lmforge.optimize(ref_path, RECIPE)
    ids = torch.tensor([heldout_prompts[0]])
    expected = ref_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=16, eos_token_id=[]), expected)
    runner = compiled.engine.runner
    assert set(runner.compile_seconds) == {f"batch=1 tokens={tokens} threads={torch.get_num_threads()}"
                                           for tokens in ("any", 1)}
