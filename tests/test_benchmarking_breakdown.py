"""The decode-step breakdown and the physical limit: the parts of a profiled step fit in it and
name the ops a tiny model runs; the bandwidth is a real figure; the limit comes from the
weight bytes a step reads."""

import math

import pytest
import torch

import lmforge
from lmforge.benchmarking_breakdown import (
    TOLERANCE,
    limit_tokens_per_second,
    profile_decode_steps,
    read_bandwidth,
    step_weight_bytes,
)
from lmforge.compiler.capture import capture
from lmforge.errors import LmforgeError
from tests.tiny_models import tiny_model

RECIPE = "passes: [{name: cleanup}]\ncodegen: {backend: %s}\nruntime: {max_seq_len: 64}\n"


@pytest.fixture(scope="module", params=["aten", "fx"])
def tiny_llama(request):
    return lmforge.optimize(tiny_model("llama"), RECIPE % request.param)


def test_parts_of_a_profiled_step_fit_in_it(tiny_llama):
    part = profile_decode_steps(tiny_llama.engine, batch=2, context=6, steps=4)
    assert part.batch == 2 and part.context == 6
    assert part.matmul_us > 0 and part.attention_us > 0 and part.other_ops_us > 0 and part.compiled_us == 0
    assert part.python_us >= -TOLERANCE * part.profiled_step_us and part.consistent
    assert part.step_us > 0 and part.outside_compiled == []
    calls = {op["op"]: op["calls"] for op in part.top_ops}
    # 2 layers: one attention each, 7 projections each, and the LM head
    assert calls["lmforge::attention"] == 2
    assert sum(calls.get(op, 0) for op in ("mkldnn::_linear_pointwise", "aten::linear")) == 2 * 7 + 1


def test_profiling_refuses_an_empty_step(tiny_llama):
    with pytest.raises(LmforgeError, match="steps >= 1, got 1, 64, 0"):
        profile_decode_steps(tiny_llama.engine, steps=0)


def test_read_bandwidth_is_a_positive_finite_figure():
    gigabytes_per_second = read_bandwidth(megabytes=16, runs=3)
    assert math.isfinite(gigabytes_per_second) and gigabytes_per_second > 0


def test_a_step_reads_every_weight_but_the_embedding_table(tiny_llama):
    program = tiny_llama.program
    everything = sum(tensor.nbytes for tensor in program.state_dict().values())
    hf = tiny_model("llama")
    read = step_weight_bytes(program)
    assert read == everything - hf.model.embed_tokens.weight.nbytes
    assert limit_tokens_per_second(read, 10.0, 4) == pytest.approx(4 * 10e9 / read)


def test_a_weight_tied_to_the_lm_head_is_read_once():
    hf = tiny_model("gpt2")
    assert hf.lm_head.weight is hf.transformer.wte.weight
    read = sum(p.nbytes for p in hf.parameters()) - hf.transformer.wpe.weight.nbytes  # positions: one row a token
    assert step_weight_bytes(capture(hf)) == read


@pytest.mark.parametrize("weight_bytes, bandwidth", [(0, 10.0), (100, 0.0), (100, float("nan"))])
def test_limit_refuses_what_is_not_a_measurement(weight_bytes, bandwidth):
    with pytest.raises(LmforgeError, match="positive weight bytes and bandwidth"):
        limit_tokens_per_second(weight_bytes, bandwidth, 1)


def test_profiled_steps_leave_the_runner_as_it_was(tiny_llama):
    runner = tiny_llama.engine.runner
    before = dict(getattr(runner, "__globals__", {}))
    profile_decode_steps(tiny_llama.engine, context=2, steps=1)
    after = getattr(runner, "__globals__", {})
    assert after.keys() == before.keys() and all(after[key] is value for key, value in before.items())


class _CompiledLike:
    """A runner shaped like the cpp backend's (`steps`: its compiled callables by bucket),
    whose one 'compiled' step is the tiny model's own runner plus some work around it."""

    def __init__(self, runner) -> None:
        self.steps = {"decode": runner}

    def __call__(self, input_ids, position_ids):
        position_ids = position_ids.contiguous() + torch.zeros_like(position_ids)  # left in Python
        return self.steps["decode"](input_ids, position_ids)


def test_a_compiled_step_is_one_part_and_what_runs_around_it_is_listed(tiny_llama):
    engine = tiny_llama.engine
    plain, engine.runner = engine.runner, _CompiledLike(engine.runner)
    try:
        part = profile_decode_steps(engine, context=4, steps=2)
        steps = dict(engine.runner.steps)
    finally:
        engine.runner = plain
    assert steps == {"decode": plain}  # the labels are gone again
    assert part.compiled_us > 0 and part.matmul_us == 0 and part.attention_us == 0 and part.consistent
    outside = {row["op"] for row in part.outside_compiled}
    assert {"aten::zeros_like", "aten::add"} <= outside
    assert not outside & {"mkldnn::_linear_pointwise", "aten::linear", "lmforge::attention"}
