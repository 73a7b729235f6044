"""The `cpp` backend refuses, when a program is lowered (before any bucket is exported), every
pass whose op it has no lowering for, in one line naming the op, the pass and why
(`codegen/cpp/refused.py`); and its table leaves no lmforge op out."""

import pytest
from tiny_models import tiny_model

from lmforge.codegen import lower
from lmforge.codegen.aten import PYTHON_KERNELS
from lmforge.codegen.cpp.refused import COMPILED_LMFORGE_OPS, CPP_REFUSED
from lmforge.codegen.cpp_backend import op_placement
from lmforge.compiler.capture import capture
from lmforge.compiler.recipe import CodegenConfig
from lmforge.errors import LmforgeError
from lmforge.passes.ffn_skip import make_dynamic
from lmforge.passes.kv_evict import make_evicting
from lmforge.passes.kv_merge import merge_pairs
from lmforge.passes.sparse_prefill import make_sparse
from lmforge.passes.streaming_heads import split_heads


@pytest.fixture(scope="module")
def captured():
    return capture(tiny_model("llama"))


def _streaming(program):
    split_heads(program, {0: [True] * program.config.num_key_value_heads}, 4, 16, 8)


def _sparse(program):
    make_sparse(program, {0: [0] * program.config.num_attention_heads}, budget=4, block=32, min_length=256)


REWRITES = {
    "streaming_heads": (_streaming, "streaming_attention", "ring slot"),
    "sparse_prefill": (_sparse, "sparse_attention", "picks each query block's key blocks"),
    "kv_merge": (lambda program: merge_pairs(program, [[0, 1]], 0.6, 0.1, [0.0]), "merged_attention", "MiniCache"),
    "kv_evict": (lambda program: make_evicting(program, [0, 1], capacity=32, recent=8, decay=0.9, observe=8),
                 "evicting_attention", "re-ranks it at every decode step"),
    "ffn_skip mode: dynamic": (lambda program: make_dynamic(program, [1], threshold=0.99, warmup=2), "ffn_skip_gate",
                               "torch.cond branches"),
}


@pytest.mark.parametrize("pass_name", list(REWRITES))
def test_each_pass_without_a_lowering_is_refused_at_lowering_in_one_line(captured, pass_name):
    rewrite, op, why = REWRITES[pass_name]
    program = captured.clone()
    rewrite(program)
    with pytest.raises(LmforgeError) as refused:
        lower(program, CodegenConfig(backend="cpp"))
    message = str(refused.value)
    assert message.startswith(f"codegen backend cpp has no kernel for lmforge::{op} (pass {pass_name}): ")
    assert why in message and message.endswith("; use backend aten for this recipe") and "\n" not in message
    assert op_placement(program.graph_module)["refused"]  # `lmforge info` lists the same op as refused


def test_every_lmforge_op_is_compiled_or_refused_with_a_reason():
    assert set(PYTHON_KERNELS) <= set(COMPILED_LMFORGE_OPS) | set(CPP_REFUSED)
    assert all(pass_name and reason for pass_name, reason in CPP_REFUSED.values())


def test_a_plain_program_is_not_refused(captured):
    assert op_placement(captured.graph_module)["refused"] == {}
