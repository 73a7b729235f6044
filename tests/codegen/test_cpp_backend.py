"""The `cpp` backend (the whole step compiled ahead of time per shape bucket) decodes greedy
tokens identical to Hugging Face on a batch padded to its bucket, keeps cached and cache-free
logits equal, never compiles inside the decoding loop, reloads an artifact in a fresh process
without compiling, and lists the ops it compiles and refuses (the refusals: test_cpp_refused.py).
The reference checkpoint's test is test_cpp_reference.py.

Each model compiles three buckets per module (batch 4: any length, 1 token, a 4-token
verify); the packages are kept in lmforge's cache, so a second run of this file loads them."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model

import lmforge
from lmforge.codegen.cpp.package_cache import program_digest
from lmforge.codegen.cpp_backend import cached_compile_records, op_placement
from lmforge.compiler.capture import capture
from lmforge.passes.kv_evict import make_evicting

RECIPE = "passes: [{name: cleanup}, {name: fuse_projections}]\ncodegen: {backend: cpp}\nruntime: {max_seq_len: 64}\n"


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tiny(request):
    model = tiny_model(request.param)
    return model, lmforge.optimize(model, RECIPE)


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 12 tokens (run in the batch-4 bucket), the first left-padded by 4."""
    ids = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask


def test_greedy_tokens_match_hf_on_a_left_padded_batch(tiny):
    model, compiled = tiny
    ids, mask = _left_padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=12, eos_token_id=[]), expected[:, : ids.shape[1] + 12])
    assert {bucket.batch for bucket in compiled.engine.runner.steps} == {4}


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
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1)
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


def test_nothing_compiles_inside_the_decoding_loop(tiny):
    """After one generate has compiled its buckets, another of different lengths (same
    buckets) neither compiles nor loads a step: the in-loop step is the compiled one."""
    _, compiled = tiny
    ids, mask = _left_padded_batch()
    runner = compiled.engine.runner
    compiled.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    steps, packages = dict(runner.steps), (runner.packages.compiled, runner.packages.loaded)
    compiled.generate(ids[:, 1:], mask[:, 1:], max_new_tokens=10, eos_token_id=[])
    assert runner.steps == steps and (runner.packages.compiled, runner.packages.loaded) == packages


_RELOAD = """
import json, sys, torch
import torch._inductor

def refuse(*args, **kwargs):
    raise AssertionError("compiled in a process that should have loaded every step from the cache")

torch._inductor.aoti_compile_and_package = refuse
import lmforge
path, threads, ids, mask = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(threads)
model = lmforge.load(path)
tokens = model.generate(torch.tensor(ids), torch.tensor(mask), max_new_tokens=6, eos_token_id=[])
runner = model.engine.runner
print(json.dumps({"tokens": tokens.tolist(), "compiled": runner.packages.compiled,
                  "sources": sorted(record["source"] for record in runner.compile_records.values())}))
"""


def test_loading_the_saved_artifact_in_a_fresh_process_compiles_nothing(tiny, tmp_path):
    """The artifact of a program whose buckets this process compiled, loaded in another
    process where compiling raises, finds every step in this machine's cache: the saved and
    loaded program has the same digest (`package_cache.graph_text`) as the one compiled."""
    _, compiled = tiny
    ids, mask = _left_padded_batch()
    expected = compiled.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    compiled.save(tmp_path / "artifact")
    arguments = [str(tmp_path / "artifact"), str(torch.get_num_threads()), json.dumps(ids.tolist()),
                 json.dumps(mask.tolist())]
    result = subprocess.run([sys.executable, "-c", _RELOAD, *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["compiled"] == 0 and loaded["sources"] == ["cache", "cache"]
    assert loaded["tokens"] == expected.tolist()


def test_a_program_and_its_loaded_artifact_share_a_digest_other_weights_do_not(tmp_path):
    compiled = lmforge.optimize(tiny_model("llama"), "passes: [{name: cleanup}, {name: fuse_projections}]\n")
    compiled.save(tmp_path / "artifact")
    loaded = lmforge.load(tmp_path / "artifact").program.graph_module
    assert loaded.code != compiled.program.graph_module.code  # why the digest does not hash the source
    assert program_digest(loaded) == program_digest(compiled.program.graph_module)
    with torch.no_grad():
        loaded.lm_head__weight[0, 0] += 1.0
    assert program_digest(loaded) != program_digest(compiled.program.graph_module)


def test_compile_records_are_kept_beside_the_packages(tiny):
    """What `lmforge info` shows: per bucket compiled for this program on this machine, its
    first-compile seconds and Inductor's phases."""
    _, compiled = tiny
    ids, mask = _left_padded_batch()
    compiled.generate(ids, mask, max_new_tokens=2, eos_token_id=[])
    records = cached_compile_records(compiled.program.graph_module)
    assert {bucket.file_name for bucket in compiled.engine.runner.steps} <= set(records)
    for record in records.values():
        assert record["compile_seconds"] > record["export_seconds"] > 0
        assert set(record["phases"]) == {"lowering", "codegen", "c++ build"} and record["phases"]["c++ build"] > 0


def test_op_placement_lists_compiled_and_refused_ops():
    program = capture(tiny_model("qwen2"))
    assert op_placement(program.graph_module)["refused"] == {}
    assert op_placement(program.graph_module)["compiled"]["lmforge.attention.default"] == 2
    make_evicting(program, [0, 1], capacity=32, recent=8, decay=0.9, observe=8)
    assert op_placement(program.graph_module)["refused"] == {"lmforge.evicting_attention.default": 2}
