"""The `triton` backend's merged (MiniCache) and evicting (kv_evict) attention against the
`aten` backend's kernels: each op over awkward shapes with its cache driven through a
prefill and decode steps, and whole tiny models compiled with a merging and an evicting
recipe generating the same greedy tokens on both backends.

The kernels run in Triton's interpreter (TRITON_INTERPRET must be set before any
`@triton.jit` function is defined, hence before the imports), one program after another,
so shapes and generations are small.
"""

import copy
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import tiny_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import lmforge  # noqa: E402
from lmforge.api import CompiledModel  # noqa: E402
from lmforge.codegen.aten import PYTHON_KERNELS  # noqa: E402
from lmforge.codegen.triton.attention import PYTHON_FALLBACKS, TRITON_KERNELS  # noqa: E402
from lmforge.codegen.triton.decode_attention import _split_count  # noqa: E402
from lmforge.compiler.kv_layout import EvictingSlot, MergedSlot  # noqa: E402
from lmforge.compiler.ops import (  # noqa: E402
    AttentionContext,
    attention_context,
    evicting_attention,
    merged_attention,
)
from lmforge.compiler.recipe import parse_recipe  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def _random(generator, dtype, *shape):
    return torch.randn(*shape, generator=generator).to(dtype)


def test_merged_and_evicting_attention_run_triton_kernels():
    for op in (merged_attention, evicting_attention):
        assert op not in PYTHON_FALLBACKS and TRITON_KERNELS[op] is not PYTHON_KERNELS[op]


def _merged_forward(op, slot, start, tokens, pad, window, softcap):
    """Both members of a merged pair over one forward (member 0 stages, member 1 merges)."""
    outputs = []
    with attention_context(AttentionContext(kv=[slot], start=start, q_len=tokens[0][0].shape[2], pad=pad)):
        for member, (q, k, v) in enumerate(tokens):
            outputs.append(op(q, k, v, 0, member, 0.6, 0.5, q.shape[-1] ** -0.5, window, softcap))
    return outputs


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, prompt, steps, window, softcap, pad, dtype",
    [
        (4, 1, 80, 1, [1, 1], 0, 0.0, None, torch.float32),
        (4, 2, 80, 63, [1, 3, 1], 0, 0.0, [0, 5], torch.float32),  # a 3-token chunk after the prompt
        (2, 2, 64, 65, [1, 1], 16, 30.0, [4, 0], torch.float32),
        (4, 2, 80, 63, [1, 2], 0, 0.0, [0, 3], torch.float16),
        (4, 1, 64, 260, [1], 0, 0.0, None, torch.float16),  # earlier tokens split among programs
    ],
)
def test_merged_attention_matches_aten(heads, kv_heads, head_dim, prompt, steps, window, softcap, pad, dtype):
    """Prefill from slot 0, then forwards that read the merged slot, on two copies of one
    slot: outputs and the slots' contents agree. Some of the earlier token-heads are
    retained exactly, the others restored from direction and norm."""
    generator = torch.Generator().manual_seed(prompt)
    batch = 2 if pad is not None else 1
    length = prompt + sum(steps)
    pad = torch.tensor(pad) if pad is not None else None
    aten_slot = MergedSlot.allocate(batch, kv_heads, length + 4, head_dim, 8, dtype)
    triton_slot = copy.deepcopy(aten_slot)
    start = 0
    for count in [prompt, *steps]:
        tokens = [(_random(generator, dtype, batch, heads, count, head_dim),
                   _random(generator, dtype, batch, kv_heads, count, head_dim),
                   _random(generator, dtype, batch, kv_heads, count, head_dim)) for _ in range(2)]
        expected = _merged_forward(PYTHON_KERNELS[merged_attention], aten_slot, start, tokens, pad, window, softcap)
        actual = _merged_forward(TRITON_KERNELS[merged_attention], triton_slot, start, tokens, pad, window, softcap)
        for out, reference in zip(actual, expected):
            assert out.shape == reference.shape and out.is_contiguous()
            _close(out, reference, dtype)
        start += count
    retained = aten_slot.retained_index[:, :, :prompt] >= 0
    assert retained.any() and (prompt == 1 or not retained.all())
    _close(triton_slot.direction_k, aten_slot.direction_k, dtype)
    assert torch.equal(triton_slot.retained_index, aten_slot.retained_index)
    if prompt >= 260:
        assert _split_count(batch * kv_heads, prompt) > 1


def _evicting_forward(op, slot, start, q, k, v, pad, softcap):
    with attention_context(AttentionContext(kv=[slot], start=start, q_len=q.shape[2], pad=pad)):
        return op(q, k, v, 0, q.shape[-1] ** -0.5, 0, softcap)


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, prompt, capacity, softcap, pad, dtype",
    [
        (4, 1, 80, 1, 63, 0.0, None, torch.float32),      # an almost empty cache
        (4, 2, 80, 63, 24, 0.0, [0, 5], torch.float32),   # evicting from the first step
        (2, 2, 64, 65, 65, 30.0, [3, 0], torch.float32),  # 65 entries: a last block of one
        (4, 2, 80, 63, 48, 0.0, [0, 2], torch.float16),
    ],
)
def test_evicting_attention_matches_aten(heads, kv_heads, head_dim, prompt, capacity, softcap, pad, dtype):
    """A prefill that fills the cache by importance, then decode steps: outputs agree, the
    same entries are kept, and the scores (which take each entry's attention probability
    summed over its query heads) agree."""
    generator = torch.Generator().manual_seed(prompt + capacity)
    batch, steps = (2 if pad is not None else 1), 4
    pad = torch.tensor(pad) if pad is not None else None
    aten_slot = EvictingSlot.allocate(batch, kv_heads, head_dim, capacity, recent=4, decay=0.9, observe=8, dtype=dtype)
    triton_slot = copy.deepcopy(aten_slot)
    length = prompt + steps
    q = _random(generator, dtype, batch, heads, length, head_dim)
    k, v = (_random(generator, dtype, batch, kv_heads, length, head_dim) for _ in range(2))
    for start, end in [(0, prompt), *((step, step + 1) for step in range(prompt, length))]:
        forward = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        expected = _evicting_forward(PYTHON_KERNELS[evicting_attention], aten_slot, start, *forward, pad, softcap)
        actual = _evicting_forward(TRITON_KERNELS[evicting_attention], triton_slot, start, *forward, pad, softcap)
        assert actual.shape == expected.shape and actual.is_contiguous()
        _close(actual, expected, dtype)
        assert torch.equal(triton_slot.slots, aten_slot.slots)
        _close(triton_slot.scores, aten_slot.scores, dtype)
    assert bool((aten_slot.scores > 0).any())
    if prompt + steps > capacity:
        assert int((aten_slot.slots >= 0).sum(-1).max()) == capacity


def test_evicting_attention_refuses_a_multi_token_decode():
    slot = EvictingSlot.allocate(1, 1, 16, 8, recent=2, decay=0.9, observe=4, dtype=torch.float32)
    q, k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    with pytest.raises(LmforgeError, match="one token per forward"):
        _evicting_forward(TRITON_KERNELS[evicting_attention], slot, 5, q, k, v, None, 0.0)


TRITON = "codegen: {backend: triton}\nruntime: {max_seq_len: 96}\n"


@pytest.fixture(scope="module")
def calibrated_llama(ref_tokenizer):
    """A tiny random Llama whose vocabulary is the reference tokenizer's (the recipes
    calibrate on the reference checkpoint's held-out text)."""
    config = tiny_config("llama", num_layers=4)
    config.vocab_size = len(ref_tokenizer)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("passes, op", [
    ("  - {name: kv_share, mode: merge, groups: [[1, 2]], retain_fraction: 0.2}\n  - name: cleanup\n",
     merged_attention),
    ("  - name: cleanup\n  - {name: kv_evict, capacity: 24, recent: 8, seq_len: 32, observe: 8}\n", evicting_attention),
])
def test_recipe_gives_the_aten_backends_greedy_tokens(passes, op, calibrated_llama, ref_path, ref_tokenizer):
    recipe = (f"calibration: {{data: {ref_path / 'heldout.txt'}, samples: 1, eval_samples: 1, seq_len: 32}}\n"
              f"passes:\n{passes}  - name: fuse_projections\n")
    aten = lmforge.optimize(calibrated_llama, recipe + "runtime: {max_seq_len: 96}\n", tokenizer=ref_tokenizer)
    triton = CompiledModel(aten.program, parse_recipe(recipe + TRITON), aten.generation)
    targets = {node.target for node in triton.engine.runner.graph.nodes if node.op == "call_function"}
    assert TRITON_KERNELS[op] in targets
    text = (ref_path / "heldout.txt").read_text()
    prompt = torch.tensor([ref_tokenizer(text[:2000]).input_ids[:28]])  # past the evicting cache's capacity
    tokens = triton.generate(prompt, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(tokens, aten.generate(prompt, max_new_tokens=6, eos_token_id=[]))


def test_ahead_of_time_specs_cover_what_each_op_can_launch():
    """Which attention kernel variants the AOT compile lists for a program's ops, named once
    each, with signatures that name every kernel argument (compiled in test_aot.py)."""
    from lmforge.codegen.aot import launchable_attention_specs

    plain = launchable_attention_specs(["lmforge::attention", "lmforge::last_position"], 80, 4, torch.float16)
    assert [spec.name for spec in plain] == [
        "decode_attention_partial", "decode_attention_partial_captured", "decode_attention_partial_own_keys",
        "decode_attention_combine", "prefill_attention_kernel", "prefill_attention_kernel_captured",
        "prefill_attention_kernel_own_keys"]
    evicting = launchable_attention_specs(["lmforge::attention", "lmforge::evicting_attention"], 80, 4, torch.float16)
    assert [spec.name for spec in evicting][-1] == "evicting_decode_kernel"
    assert "merged_attention_kernel" not in {spec.name for spec in evicting}
    every = launchable_attention_specs([f"lmforge::{op}" for op in ("tree_attention", "streaming_attention",
                                                                    "sparse_attention", "merged_attention")],
                                       80, 4, torch.float32, softcap=True, sparse_block=32, verify_tokens=5)
    names = [spec.name for spec in every]
    assert len(names) == len(set(names)) == 14
    for spec in every:
        assert list(spec.signature) == spec.fn.arg_names
        assert all((kind == "constexpr") == (arg in spec.constexprs) for arg, kind in spec.signature.items())
        assert spec.constexprs.get("HAS_SOFTCAP", True) and spec.constexprs.get("HAS_PAD", True)
        assert ("head_dim" in spec.aligned) == ("head_dim" in spec.signature)  # 80: a multiple of 16
    odd = launchable_attention_specs(["lmforge::merged_attention"], 72, 4, torch.float16)
    assert not any(arg.startswith("stride_") or arg == "head_dim" for spec in odd for arg in spec.aligned)
    by_name = {spec.name: spec for spec in every}
    assert by_name["prefill_attention_kernel_tree"].constexprs["BLOCK_M"] == 16
    assert by_name["prefill_attention_kernel_block_sparse"].constexprs["BLOCK_M"] == 32
    assert by_name["merged_attention_kernel"].constexprs["q_len"] == 1  # one decoded token


@pytest.mark.parametrize("ops, paged", [
    (["lmforge::attention", "lmforge::last_position"], True),
    (["lmforge::tree_attention"], True),
    (["lmforge::attention", "lmforge::merged_attention"], False),  # a merged cache has no block table
    (["lmforge::attention", "lmforge::evicting_attention"], False),
    (["lmforge::attention", "lmforge::ffn_skip_gate"], False),  # per-forward skipping is not served paged
])
def test_an_artifact_compiles_the_paged_kernel_when_its_program_can_be_served_paged(ops, paged):
    """The artifact's AOT job lists, after the attention variants `launchable_attention_specs`
    gives, the paged kernel's decode and chunk configurations exactly when serving pages the
    program (`runtime.paged.paging_unsupported_reason`), soft-capped as the model caps."""
    from lmforge.codegen.aot import launchable_attention_specs
    from lmforge.codegen.triton_artifact import _attention_specs
    from lmforge.runtime.paged import paging_unsupported_reason

    job = {"ops": ops, "head_dim": 64, "group": 2, "dtype": "float16", "softcap": True, "sparse_block": None,
           "verify_tokens": None}
    specs = _attention_specs(job)
    dense = [spec.name for spec in launchable_attention_specs(ops, 64, 2, torch.float16, softcap=True)]
    expected = ["paged_attention_kernel_decode", "paged_attention_kernel_chunk"] if paged else []
    assert [spec.name for spec in specs] == dense + expected
    for spec in specs[len(dense):]:
        assert spec.constexprs["HAS_SOFTCAP"] and spec.ops == ("lmforge::attention", "lmforge::tree_attention")
    graph = torch.fx.Graph()
    for op in ops:
        graph.call_function(getattr(torch.ops.lmforge, op.removeprefix("lmforge::")).default, ())
    served = paging_unsupported_reason(torch.fx.GraphModule(torch.nn.Module(), graph), [], "triton") is None
    assert served == paged
