"""CUDA-graph capture of decode and verify steps, checked on the CPU with
`StaticReplayCapturer`: its replay re-runs the recorded step on the static buffers only, as
a graph replays its kernels on the memory it recorded, so an input that is not copied into
a static buffer, a Python value frozen at capture or a tensor allocated per step changes the
tokens or is refused."""

import json

import pytest
import torch
from tiny_models import tiny_model
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.compiler.ops import AttentionContext, attention_context
from lmforge.compiler.recipe import parse_recipe
from lmforge.errors import LmforgeError
from lmforge.runtime.cuda_graphs import (
    GraphedStep,
    StaticReplayCapturer,
    capture_blockers,
    graph_plan,
    graphs_for,
    max_verify_width,
)

LOOKUP = ("passes: [{name: cleanup}, {name: fuse_projections}, {name: prompt_lookup, num_draft: 6}]\n"
          "runtime: {max_seq_len: 320}")
NEW_TOKENS = 16
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lookup_model():
    return lmforge.optimize(tiny_model("llama", num_layers=2), LOOKUP)


def _lookup_prompts(batch: int, seed: int = 0) -> torch.Tensor:
    """Each row every token id once (in its own order): whatever the model generates occurs
    earlier in its row, so prompt lookup drafts on most steps and verify steps are wider than 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(253, generator=generator) + 3 for _ in range(batch)])


def _generate(compiled, graphs, prompts, mask=None, new_tokens=NEW_TOKENS) -> torch.Tensor:
    default, compiled.engine.graphs = compiled.engine.graphs, graphs
    try:
        return compiled.generate(prompts, mask, max_new_tokens=new_tokens, eos_token_id=[])
    finally:
        compiled.engine.graphs = default


@pytest.mark.parametrize("batch, bucket", [(1, 1), (3, 4)])
def test_greedy_tokens_with_graphs_equal_eager(lookup_model, batch, bucket):
    prompts = _lookup_prompts(batch)
    mask = torch.ones_like(prompts)
    mask[1:, :5] = 0  # left padding in every row but the first
    expected = _generate(lookup_model, None, prompts, mask)
    graphs = graphs_for(lookup_model.program, lookup_model.engine.runner, "aten", "auto", CPU, StaticReplayCapturer())
    assert torch.equal(_generate(lookup_model, graphs, prompts, mask), expected)
    stats = lookup_model.engine.speculation_stats
    assert stats["drafted"] > 0
    assert {key[0] for key in graphs.graphs} == {bucket} and lookup_model.engine.cache.batch == bucket
    assert 1 in {key[1] for key in graphs.graphs} and max(key[1] for key in graphs.graphs) > 1  # decode and verify
    assert graphs.replays == stats["forwards"] - 1  # every step after the prefill replayed
    assert graphs.report().startswith("cuda graphs: on") and f"b{bucket}x1" in graphs.report()


class _FrozenStart(GraphedStep):
    """A graph step that hands attention the Python `start` of its capture instead of the
    slots buffer: what a capture of the engine's eager context would record."""

    def _step(self, graph, cache, start):
        def step():
            context = AttentionContext(kv=cache, start=start, q_len=graph.input_ids.shape[1], pad=graph.pad)
            with attention_context(context):
                return self.runner(graph.input_ids, graph.positions)

        return step


def test_a_start_frozen_at_capture_changes_the_tokens(lookup_model):
    prompts = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(1))  # short: few lookup hits
    expected = _generate(lookup_model, None, prompts, new_tokens=16)
    frozen = _FrozenStart(lookup_model.engine.runner, StaticReplayCapturer(), max_width=7)
    assert not torch.equal(_generate(lookup_model, frozen, prompts, new_tokens=16), expected)
    assert frozen.replays > 0


class _ScaleReplacedEveryStep:
    """A runner that multiplies its logits by a tensor it allocates anew after every call:
    a CUDA graph would go on reading the tensor it saw at capture."""

    def __init__(self, runner) -> None:
        self.runner, self.scale = runner, torch.ones(())

    def __call__(self, input_ids, position_ids):
        output = self.runner(input_ids, position_ids) * self.scale
        self.scale = torch.ones(())
        return output


def test_a_runner_that_allocates_per_step_is_refused(lookup_model):
    graphs = GraphedStep(_ScaleReplacedEveryStep(lookup_model.engine.runner), StaticReplayCapturer(), max_width=1)
    with pytest.raises(LmforgeError, match="allocated after capture"):
        _generate(lookup_model, graphs, _lookup_prompts(1), new_tokens=4)


def test_steps_outside_the_buckets_and_widths_run_eagerly_and_are_reported(lookup_model):
    prompts = _lookup_prompts(3)
    expected = _generate(lookup_model, None, prompts, new_tokens=8)
    small = GraphedStep(lookup_model.engine.runner, StaticReplayCapturer(), max_width=7, buckets=(1, 2))
    assert torch.equal(_generate(lookup_model, small, prompts, new_tokens=8), expected)
    assert small.replays == 0 and "eager: batch 3 above the largest bucket 2" in small.report()
    narrow = GraphedStep(lookup_model.engine.runner, StaticReplayCapturer(), max_width=1)
    assert torch.equal(_generate(lookup_model, narrow, prompts, new_tokens=8), expected)
    assert narrow.replays > 0 and "is not a captured verify width (1..1)" in narrow.report()


def test_cpu_and_recipe_off_run_eagerly_and_say_why(lookup_model):
    program, runner = lookup_model.program, lookup_model.engine.runner
    assert lookup_model.engine.graph_report() == "cuda graphs: off (device cpu: CUDA graphs need a CUDA device)"
    lookup_model.generate(_lookup_prompts(3)[:, :20], max_new_tokens=2)
    assert lookup_model.engine.cache.batch == 3  # no bucket rows on a CPU
    recipe = parse_recipe(LOOKUP.replace("max_seq_len: 320", "max_seq_len: 320, cuda_graphs: off"))
    off = graphs_for(program, runner, "aten", recipe.runtime.cuda_graphs, CPU, StaticReplayCapturer())
    assert not off.enabled and off.report() == "cuda graphs: off (runtime.cuda_graphs is off)"
    assert max_verify_width(program.meta["speculation"]) == 7


def test_programs_whose_step_is_not_graph_safe_are_blocked():
    plain = [{"cache": 0, "kv_heads": 2, "head_dim": 16}]
    streaming = [{**plain[0], "streaming": {"cache": 1, "kv_heads": 1, "head_dim": 16, "sink": 4, "window": 8}}]
    assert capture_blockers({"kv_cache": plain, "ffn_skip": {"mode": "static"}}, "aten") == []
    assert capture_blockers({"kv_cache": plain}, "triton") == []
    reasons = capture_blockers({"kv_cache": streaming, "ffn_skip": {"mode": "dynamic"}}, "inductor")
    assert len(reasons) == 3
    assert "backend 'inductor' is not known to be graph-safe" in reasons[0]
    assert "dynamic ffn_skip" in reasons[1]
    assert reasons[2] == "the KV cache has ring slots, which attention updates with host-side logic"


def test_lmforge_info_says_what_the_engine_will_capture(lookup_model, tmp_path):
    lookup_model.save(tmp_path / "artifact")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "artifact"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["cuda_graphs"] == (
        "cuda graphs: on CUDA, decode and verify steps replay graphs per batch bucket 1,2,4,8,16,32 and width 1..7 "
        "(eager on a CPU)")
    assert graph_plan(lookup_model.program.meta, "aten", "off") == "cuda graphs: off (runtime.cuda_graphs is off)"


@pytest.mark.parametrize("q_len, pad, tree, window", [
    (1, None, None, 0),
    (4, [0, 3], None, 0),
    (3, [2, 0], [[1, 0, 0], [1, 1, 0], [1, 0, 1]], 0),
    (2, [1, 0], None, 3),
])
def test_the_slot_mask_is_the_eager_mask_over_the_whole_cache(q_len, pad, tree, window):
    start, max_len = 6, 16
    cache = [(torch.zeros(2, 1, max_len, 4), torch.zeros(2, 1, max_len, 4))]
    pad = torch.tensor(pad) if pad is not None else None
    tree = torch.tensor(tree, dtype=torch.bool) if tree is not None else None
    eager = AttentionContext(kv=cache, start=start, q_len=q_len, pad=pad, tree=tree).mask(window)
    if eager is None:  # plain causal attention aligned to the last key
        eager = torch.ones(q_len, start + q_len, dtype=torch.bool).tril(start)[None, None].expand(2, 1, -1, -1)
    static_pad = pad if pad is not None else torch.zeros(2, dtype=torch.long)
    slots = AttentionContext(kv=cache, start=99, q_len=q_len, pad=static_pad, tree=tree,  # start unused with slots
                             slots=torch.arange(start, start + q_len)).mask(window)
    assert slots.shape == (2, 1, q_len, max_len)
    assert torch.equal(slots[..., : start + q_len], eager.expand(2, 1, -1, -1))
    assert not slots[..., start + q_len :].any()
