"""The `cpp` backend under passes that rewrite the graph around attention: one program with
kv_share, a static ffn_skip, Medusa draft heads verified as a tree and prompt lookup (chains),
compiled by the cpp backend, decodes the aten backend's greedy tokens (what it cannot
compile is refused naming the pass: test_cpp_refused.py).

One module fixture compiles the program's buckets once (any length, 1 token, and the verify
widths 2 and 4 that chains of up to 3 drafts and a 3-node tree need: few, as each compile
takes minutes on a busy machine); the packages stay in lmforge's cache for later runs. Its
products call oneDNN (`cpp_products: onednn`, a third of the template's compile time): what
is checked here is the passes around attention, and the template's products are checked by
test_cpp_backend.py and test_cpp_reference.py."""

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

import lmforge
from lmforge.api import CompiledModel
from lmforge.compiler.recipe import parse_recipe
from lmforge.draft_heads import save_heads, train_heads


def _recipe(ref_path, heads) -> str:
    return (f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 1, eval_samples: 1, seq_len: 32}}\n"
            "passes:\n  - name: cleanup\n  - {name: kv_share, mode: explicit, groups: [[1, 2]]}\n"
            "  - {name: ffn_skip, mode: static, layers: [1]}\n"
            f"  - {{name: draft_heads, path: {heads}, tree: [1, 1]}}\n  - {{name: prompt_lookup, num_draft: 3}}\n"
            "  - name: fuse_projections\nruntime: {max_seq_len: 96}\n")


@pytest.fixture(scope="module")
def composed(ref_path, ref_tokenizer, tmp_path_factory):
    """(aten model, cpp model) of one program, and a prompt made of the model's own greedy
    continuation (so the heads, fitted to such continuations, have drafts accepted)."""
    config = tiny_config("llama", num_layers=3)
    config.vocab_size = len(ref_tokenizer)  # calibrated on the reference checkpoint's text
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    prompts = torch.randint(3, config.vocab_size, (8, 8), generator=torch.Generator().manual_seed(0))
    continued = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=24, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    heads, _ = train_heads(model, continued, count=2, kind="medusa", steps=20, lr=0.01)
    directory = tmp_path_factory.mktemp("heads")
    save_heads(directory, heads, model, {})
    recipe = _recipe(ref_path, directory)
    aten = lmforge.optimize(model, recipe, tokenizer=ref_tokenizer)
    cpp_recipe = parse_recipe(recipe + "codegen: {backend: cpp, cpp_products: onednn}\n")
    cpp = CompiledModel(aten.program, cpp_recipe, aten.generation)
    return aten, cpp, continued


def test_passes_are_in_the_compiled_program(composed):
    aten, cpp, _ = composed
    passes = [entry["pass"] for entry in aten.program.history]
    assert passes == ["cleanup", "kv_share", "ffn_skip", "draft_heads", "prompt_lookup", "fuse_projections"]
    assert cpp.engine.runner.tree  # the draft tree's attention is compiled, with its ancestor mask as an input


def test_prompt_lookup_chains_give_the_aten_tokens(composed):
    aten, cpp, continued = composed
    phrase = continued[1, 8:14]
    prompt = torch.cat([continued[0, :10], phrase, continued[0, 10:14], phrase[:3]])[None]  # the phrase repeats
    tokens = cpp.generate(prompt, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(tokens, aten.generate(prompt, max_new_tokens=16, eos_token_id=[]))
    assert cpp.engine.speculation_stats["drafted"] > 0


def test_draft_trees_give_the_aten_tokens(composed):
    aten, cpp, continued = composed
    prompt = continued[2:3, :12]
    trees, plain_step = [], cpp.engine.step

    def recording_step(*args, **kwargs):
        trees.append(kwargs.get("tree") is not None)
        return plain_step(*args, **kwargs)

    cpp.engine.step = recording_step
    try:
        tokens = cpp.generate(prompt, max_new_tokens=12, eos_token_id=[])
    finally:
        del cpp.engine.step
    assert torch.equal(tokens, aten.generate(prompt, max_new_tokens=12, eos_token_id=[]))
    assert any(trees)  # some forwards verified a tree (the last token and one guess per head: 4-token bucket)
    stats = cpp.engine.speculation_stats
    assert stats["drafted"] > 0 and stats == aten.engine.speculation_stats  # the same trees, the same acceptances
