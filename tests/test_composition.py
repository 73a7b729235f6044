"""Lossy passes, draft heads and prompt lookup in one recipe: it compiles, survives an
artifact, and speculative greedy output equals plain greedy output of the same program."""

import torch

import lmforge
from lmforge.draft_heads import save_heads, train_heads
from lmforge.passes.calibrate import token_windows


def test_kv_share_ffn_skip_heads_and_lookup_compose(tmp_path, ref_path, ref_hf, ref_tokenizer):
    windows = token_windows(ref_path / "heldout.txt", ref_tokenizer, 64)
    heads, _ = train_heads(ref_hf, windows[:64], count=2, kind="medusa", steps=3, batch=4)
    save_heads(tmp_path / "heads", heads, ref_hf, {})
    lossy = (
        f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 4, eval_samples: 4, seq_len: 64}}\n"
        "passes:\n  - name: cleanup\n  - name: kv_share\n    mode: explicit\n    groups: [[1, 2]]\n"
        "  - name: ffn_skip\n    mode: static\n    layers: [3]\n"
    )
    tail = "  - name: fuse_projections\n  - name: verify\nruntime: {max_seq_len: 256}\n"
    speculative = lossy + f"  - name: draft_heads\n    path: {tmp_path / 'heads'}\n    tree: [2, 1]\n  - name: prompt_lookup\n" + tail
    composed, plain = lmforge.optimize(ref_path, speculative), lmforge.optimize(ref_path, lossy + tail)
    passes = [entry["pass"] for entry in composed.program.history]
    assert passes == ["cleanup", "kv_share", "ffn_skip", "draft_heads", "prompt_lookup", "fuse_projections", "verify"]
    assert composed.program.meta["ffn_skip"]["layers"] == [3] and composed.program.meta["kv_share"]["groups"][1] == [1, 2]
    prompt = windows[-1:, :48]
    tokens = composed.generate(prompt, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(tokens, plain.generate(prompt, max_new_tokens=40, eos_token_id=[]))
    assert composed.engine.speculation_stats["drafted"] > 0
    composed.save(tmp_path / "artifact")
    assert torch.equal(lmforge.load(tmp_path / "artifact").generate(prompt, max_new_tokens=40, eos_token_id=[]), tokens)


def test_sparse_attention_composes_with_kv_share_ffn_skip_and_lookup(tmp_path, ref_path):
    head = (f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 2, eval_samples: 2, seq_len: 64}}\n"
            "passes:\n  - name: cleanup\n  - name: kv_share\n    mode: explicit\n    groups: [[1, 2]]\n"
            "  - name: streaming_heads\n    method: attention_mass\n    streaming_fraction: 0.5\n    window: 32\n"
            "    seq_len: 320\n    samples: 2\n    eval_samples: 2\n"
            "  - name: sparse_prefill\n    min_length: 256\n    block: 32\n    budget: 4\n    seq_len: 320\n"
            "    samples: 1\n    eval_samples: 1\n"
            "  - name: ffn_skip\n    mode: static\n    layers: [3]\n")
    tail = "  - name: fuse_projections\n  - name: verify\nruntime: {max_seq_len: 512}\n"
    composed = lmforge.optimize(ref_path, head + "  - name: prompt_lookup\n" + tail)
    plain = lmforge.optimize(ref_path, head + tail)
    meta = composed.program.meta
    assert meta["kv_cache"][2]["cache"] == 1 and "streaming" not in meta["kv_cache"][1]  # shared layers stay whole
    assert sum(1 for entry in meta["kv_cache"] if "streaming" in entry) >= 3
    text = (ref_path / "heldout.txt").read_text()
    prompt = torch.tensor([composed.tokenizer(text[:20000]).input_ids[:300]])  # long enough for a sparse prefill
    tokens = composed.generate(prompt, max_new_tokens=60, eos_token_id=[])
    assert torch.equal(tokens, plain.generate(prompt, max_new_tokens=60, eos_token_id=[]))
    assert composed.engine.speculation_stats["accepted"] > 0
    composed.save(tmp_path / "artifact")
    assert torch.equal(lmforge.load(tmp_path / "artifact").generate(prompt, max_new_tokens=60, eos_token_id=[]), tokens)
