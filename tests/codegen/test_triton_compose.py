"""Whole models through the `triton` backend's kernels, with what the rest of lmforge puts
around them: speculative verification (a prompt-lookup chain, a tree of draft-head
guesses), a sparse recipe (streaming heads' ring, block-sparse prefill), a left-padded
batch on gemma2 (window + soft-cap), the reference checkpoint, and an fp16 program.

The kernels run in Triton's interpreter (TRITON_INTERPRET must be set before any
`@triton.jit` function is defined, hence before the imports), one program instance after
another, so prompts and generations are short.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from cache_checks import assert_cache_holds_only_accepted_tokens  # noqa: E402
from tiny_models import tiny_config, tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import lmforge  # noqa: E402
from lmforge.api import CompiledModel  # noqa: E402
from lmforge.codegen.triton.attention import TRITON_KERNELS  # noqa: E402
from lmforge.compiler.ops import sparse_attention, streaming_attention, tree_attention  # noqa: E402
from lmforge.compiler.recipe import parse_recipe  # noqa: E402
from lmforge.draft_heads import save_heads, train_heads  # noqa: E402

TRITON = "codegen: {backend: triton}\nruntime: {max_seq_len: 128}\n"
PLAIN = "passes: [{name: cleanup}, {name: fuse_projections}]\n"


def _runs_triton_kernels(compiled, *ops) -> bool:
    """Whether the lowered graph calls the Triton implementation of each of `ops`."""
    targets = {node.target for node in compiled.engine.runner.graph.nodes if node.op == "call_function"}
    return all(TRITON_KERNELS[op] in targets for op in ops)


def _hf_greedy(model, ids, new_tokens, attention_mask=None):
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, eos_token_id=None)


def test_prompt_lookup_chain_is_greedy_exact():
    model = tiny_model("llama")
    compiled = lmforge.optimize(model, "passes: [{name: cleanup}, {name: fuse_projections}, "
                                       "{name: prompt_lookup, num_draft: 4}]\n" + TRITON)
    generator = torch.Generator().manual_seed(2)
    phrase, noise = torch.randint(3, 256, (6,), generator=generator), torch.randint(3, 256, (6,), generator=generator)
    prompt = torch.cat([noise, phrase, noise[:3], phrase, phrase[:3]])[None]  # the phrase repeats: lookup hits
    tokens = compiled.generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(tokens, _hf_greedy(model, prompt, 12))
    stats = compiled.engine.speculation_stats
    assert 0 < stats["accepted"] < stats["drafted"]  # drafts were accepted and rejected


def test_draft_tree_is_greedy_exact_and_compacts_the_cache(tmp_path):
    model = tiny_model("llama")
    prompts = torch.randint(3, 256, (8, 8), generator=torch.Generator().manual_seed(0))
    continued = _hf_greedy(model, prompts, 24)
    # heads fitted to the model's own continuations, so some tree paths are accepted
    heads, _ = train_heads(model, continued, count=2, kind="medusa", steps=20, lr=0.01)
    save_heads(tmp_path, heads, model, {})
    compiled = lmforge.optimize(model, f"passes: [{{name: cleanup}}, {{name: draft_heads, path: {tmp_path}, "
                                       "tree: [2, 2]}, {name: fuse_projections}]\n" + TRITON)
    assert _runs_triton_kernels(compiled, tree_attention)
    prompt = continued[:1, :10]
    tokens = compiled.generate(prompt, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(tokens, _hf_greedy(model, prompt, 10))
    assert compiled.engine.speculation_stats["accepted"] > 0  # trees of 2 + 4 candidates, some paths taken
    assert_cache_holds_only_accepted_tokens(compiled.engine, tokens)


def test_sparse_recipe_gives_the_aten_backends_tokens_and_logits(ref_path, ref_tokenizer):
    config = tiny_config("llama")
    config.vocab_size = len(ref_tokenizer)  # calibrated on the reference checkpoint's text
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    recipe = (f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 1, eval_samples: 1, seq_len: 32}}\n"
              "passes:\n  - name: cleanup\n"
              "  - {name: streaming_heads, method: attention_mass, streaming_fraction: 0.5, sink: 2, window: 8,"
              " slack: 4, seq_len: 144, samples: 1, eval_samples: 1}\n"
              "  - {name: sparse_prefill, min_length: 32, block: 8, budget: 2, seq_len: 144, samples: 1,"
              " eval_samples: 1}\n"
              "  - name: fuse_projections\n")
    aten = lmforge.optimize(model, recipe + "runtime: {max_seq_len: 128}\n", tokenizer=ref_tokenizer)
    triton = CompiledModel(aten.program, parse_recipe(recipe + TRITON), aten.generation)
    assert _runs_triton_kernels(triton, streaming_attention, sparse_attention)
    text = (ref_path / "heldout.txt").read_text()
    prompt = torch.tensor([ref_tokenizer(text[:2000]).input_ids[:40]])  # past sink + window, one sparse prefill
    torch.testing.assert_close(triton(prompt).logits, aten(prompt).logits, atol=1e-4, rtol=0)
    tokens = triton.generate(prompt, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(tokens, aten.generate(prompt, max_new_tokens=8, eos_token_id=[]))


def test_left_padded_gemma2_batch_equals_hugging_face():
    model = tiny_model("gemma2")
    compiled = lmforge.optimize(model, PLAIN + TRITON)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))  # longer than the window (12)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    tokens = compiled.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(tokens, _hf_greedy(model, ids, 8, mask))


def test_reference_checkpoint_equals_hugging_face(ref_path, ref_hf, heldout_prompts):
    """Logits of a 25-token prompt, then 8 greedy tokens: each interpreted decode step of the
    8-layer model costs seconds, and more steps would run no other kernel (a decode scans
    one split below decode_attention.MIN_KEYS_PER_SPLIT = 256 keys)."""
    compiled = lmforge.optimize(ref_path, PLAIN + TRITON)
    prompt = torch.tensor([heldout_prompts[1]])
    with torch.no_grad():
        expected = ref_hf(prompt).logits
    torch.testing.assert_close(compiled(prompt).logits, expected, atol=1e-4, rtol=0)
    tokens = compiled.generate(prompt, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(tokens, _hf_greedy(ref_hf, prompt, 8))


def test_fp16_program_agrees_with_the_fp32_model():
    model = tiny_model("llama")
    compiled = lmforge.optimize(tiny_model("llama").half(), PLAIN + TRITON)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(ids).logits.argmax(-1)
    logits = compiled(ids).logits
    assert logits.dtype == torch.float16
    assert (logits.argmax(-1) == expected).float().mean() >= 0.95
