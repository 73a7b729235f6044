"""Ahead-of-time compiles for sm_80 and sm_90 on a machine without a GPU, the resource
report read from the binaries, the limits checked against each target, and the decode
attention roofline arithmetic.

The compiles run in `aot_worker.py`, in a process started without TRITON_INTERPRET: the
first import of triton fixes, for the whole process, whether its library runs compiled or
interpreted, and in this pytest process that depends on which test modules were collected
first (the interpreter tests set the variable at import).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.codegen.gpu_targets import TARGETS, occupancy
from lmforge.codegen.roofline import PEAK_BANDWIDTH, decode_attention_roofline
from lmforge.errors import LmforgeError

WORKER = Path(__file__).with_name("aot_worker.py")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Everything aot_worker.py compiled and measured, as JSON."""
    out_dir = tmp_path_factory.mktemp("aot")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(WORKER), str(out_dir)], capture_output=True, text=True,
                         env=environment, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def assert_fits_without_spills(kernel: dict) -> None:
    assert set(kernel["targets"]) == {"sm_80", "sm_90"}
    for target, summary in kernel["targets"].items():
        assert summary["spills"] == summary["spill_loads"] == 0
        assert 0 < summary["registers"] <= 255
        assert summary["shared_bytes"] + summary["static_shared_bytes"] <= TARGETS[target].shared_per_block
        assert 0 < summary["occupancy_warps"] <= TARGETS[target].max_warps_per_sm


def test_rmsnorm_compiles_for_both_targets_and_writes_binaries(compiled):
    rmsnorm = compiled["rmsnorm"]
    for target, gpu in (("sm_80", "sm_80"), ("sm_90", "sm_90a")):
        report = rmsnorm["targets"][target]
        assert report["ptx_target"] == gpu
        assert report["cubin_is_elf"] and report["files_match"]
        assert report["registers"] > 0
        assert report["occupancy_warps"] % 8 == 0
    assert_fits_without_spills(rmsnorm)
    assert rmsnorm["files"] == ["rmsnorm_4096.sm_80.cubin", "rmsnorm_4096.sm_80.ptx",
                                "rmsnorm_4096.sm_90.cubin", "rmsnorm_4096.sm_90.ptx"]


def test_divisibility_hints_vectorise_the_loads(compiled):
    hinted, plain = compiled["rmsnorm"]["targets"]["sm_80"], compiled["rmsnorm"]["plain_sm_80"]
    assert all(".v4." in load for load in hinted["loads"])
    assert not any(".v4." in load for load in plain["loads"])
    assert len(hinted["loads"]) * 4 <= len(plain["loads"])
    assert hinted["registers"] < plain["registers"]


def test_shared_memory_beyond_the_target_is_refused(compiled):
    limits = compiled["limits"]
    assert limits["shared_sm_80"].startswith(
        "kernel matmul_128x256 (num_warps=8, num_stages=5, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64) on sm_80 needs ")
    assert limits["shared_sm_80"].endswith(f"sm_80 allows {TARGETS['sm_80'].shared_per_block}")
    # what an A100 block cannot have, an H100 block can
    h100 = limits["four_stages_sm_90"]
    assert TARGETS["sm_80"].shared_per_block < h100["shared_bytes"] <= TARGETS["sm_90"].shared_per_block


def test_a_kernel_that_spills_is_refused(compiled):
    message = compiled["limits"]["spill_sm_80"]
    assert message.startswith("kernel matmul_64x128 (num_warps=1, num_stages=1, BLOCK_M=64")
    assert " on sm_80 spills registers: " in message and " 0 bytes stored" not in message


def test_bad_specs_name_the_problem(compiled):
    messages = compiled["bad_specs"]
    assert "signature names ['x_ptr']" in messages["short_signature"]
    assert "argument BLOCK must be 'constexpr'" in messages["missing_constexpr"]
    assert "aligned argument eps" in messages["aligned_float"]
    assert messages["unknown_target"].startswith("unknown target 'sm_70'")
    assert "not a compiled Triton function" in messages["not_a_kernel"]
    assert messages["missing_tool"].startswith("no-such-tool not found at ")


def test_attention_kernels_compile_for_both_targets_without_spills(compiled):
    """Split-K decode (both stages) and flash prefill, fp16, head_dim 128, 4 query heads per
    KV head, as their launchers specialise them."""
    kernels = compiled["attention"]
    assert [kernel["name"] for kernel in kernels] == [
        "decode_attention_partial", "decode_attention_combine", "prefill_attention_kernel"]
    for kernel in kernels:
        assert kernel["ops"] == ["lmforge::attention"]
        assert_fits_without_spills(kernel)


def test_every_attention_variant_compiles_for_both_targets_without_spills(compiled):
    """Beyond a plain decode step and prefill: the kernels over a forward's own keys, a
    streaming ring's positions, a draft tree, block-sparse lists, and the merged-cache and
    evicting-cache kernels, each listing the ops that launch it (fp16, head_dim 64, padded)."""
    kernels = {kernel["name"]: kernel for kernel in compiled["attention_variants"]}
    assert set(kernels) == {
        "decode_attention_partial_captured", "decode_attention_partial_own_keys", "decode_attention_partial_positions",
        "prefill_attention_kernel_captured", "prefill_attention_kernel_own_keys", "prefill_attention_kernel_tree",
        "prefill_attention_kernel_tree_captured", "prefill_attention_kernel_positions",
        "prefill_attention_kernel_block_sparse", "merged_attention_kernel", "merged_attention_kernel_chunk",
        "evicting_decode_kernel"}
    assert kernels["merged_attention_kernel"]["ops"] == ["lmforge::merged_attention"]
    assert kernels["evicting_decode_kernel"]["ops"] == ["lmforge::evicting_attention"]
    assert kernels["prefill_attention_kernel_tree"]["ops"] == ["lmforge::tree_attention"]
    assert len(kernels["prefill_attention_kernel_own_keys"]["ops"]) == 6  # every op's cache-free forward
    assert "BLOCK_M=64" in kernels["prefill_attention_kernel_block_sparse"]["config"]
    assert "BLOCK_M=16" in kernels["prefill_attention_kernel_tree"]["config"]  # a 16-token verify
    assert kernels["prefill_attention_kernel_tree_captured"]["ops"] == ["lmforge::tree_attention"]
    for kernel in kernels.values():
        assert "HAS_PAD=True" in kernel["config"] or kernel["name"] == "evicting_decode_kernel"  # slots mark padding
        assert_fits_without_spills(kernel)


def test_captured_steps_read_their_position_from_the_device(compiled):
    """The decode and verify kernels a CUDA graph replays: START_ON_DEVICE, their (zero)
    position argument hinted."""
    variants = {kernel["name"]: kernel for kernel in compiled["attention_variants"]}
    for name in ("decode_attention_partial_captured", "prefill_attention_kernel_captured"):
        assert "START_ON_DEVICE=True" in variants[name]["config"]
        assert variants[name]["ops"] == ["lmforge::attention", "lmforge::tree_attention", "lmforge::sparse_attention"]
    assert "START_ON_DEVICE=True" in variants["prefill_attention_kernel_tree_captured"]["config"]


def test_configurations_that_spilled_compile_without_spills(compiled):
    """Tree verify with 64 tokens in fp16 at head_dim 64 (soft-capped or not), block-sparse
    64-token blocks in fp32 at head_dim 64 and 128, decode (eager and captured) and prefill in
    fp32 at head_dim 128 with 8 query heads per KV head: each spilled on sm_80 or sm_90 with
    the earlier block and warp choices."""
    kernels = compiled["spilled_before"]
    assert len(kernels) == 7
    for kernel in kernels:
        assert_fits_without_spills(kernel)
    tree, _, sparse_64, sparse_128, decode, captured, prefill = (kernel["config"] for kernel in kernels)
    assert tree.startswith("num_warps=8,") and "BLOCK_M=32," in tree
    assert sparse_64.startswith("num_warps=16,") and sparse_128.startswith("num_warps=8,")
    assert all(config.startswith("num_warps=8,") for config in (decode, captured, prefill))


def test_generated_fused_kernels_compile_for_both_targets_without_spills(compiled):
    kernels = compiled["fused"]
    names = [kernel["name"] for kernel in kernels]
    assert any(name.startswith("rmsnorm") for name in names) and any(name.startswith("rope") for name in names)
    for kernel in kernels:  # at the largest tile: 2048 elements on 16 warps, 4 per thread
        assert kernel["ops"]
        config = dict(item.split("=") for item in kernel["config"].split(", "))
        assert int(config["BLOCK_R"]) * int(config["BLOCK_C"]) == 2048 and config["num_warps"] == "16"
        assert_fits_without_spills(kernel)
        assert all(summary["registers"] <= 128 for summary in kernel["targets"].values()), kernel["name"]


def test_the_dequantizing_matmul_compiles_without_spills(compiled):
    """int8 GEMV, int4 GEMM with a bias, split-K combine (`codegen/triton/quantized_linear.py`)."""
    kernels = compiled["quantized_linear"]
    assert [kernel["name"] for kernel in kernels] == [
        "dequant_gemv_int8", "dequant_gemm_int4_g32_bias", "dequant_split_k_combine"]
    assert kernels[0]["ops"] == ["aten.linear", "aten.index_add: outliers' sparse correction, after the kernel"]
    for kernel in kernels:
        assert_fits_without_spills(kernel)


def test_occupancy_by_hand():
    # 128 registers x 32 threads = 4096 per warp: 16 warps fit 64K registers, 4 blocks of 4
    assert occupancy(128, 0, 4, TARGETS["sm_80"]) == (16, "registers")
    # 48 KB + the reserved 1 KB per block: 3 blocks in 164 KB; registers would allow 8
    assert occupancy(32, 48 * 1024, 8, TARGETS["sm_80"]) == (24, "shared memory")
    # the same blocks on sm_90: 228 KB holds 4
    assert occupancy(32, 48 * 1024, 8, TARGETS["sm_90"]) == (32, "shared memory")
    # 33 registers round up to 40 per thread (1280 per warp): 51 warps, 12 blocks of 4
    assert occupancy(33, 0, 4, TARGETS["sm_80"]) == (48, "registers")
    assert occupancy(16, 0, 4, TARGETS["sm_90"]) == (64, "warps")


def test_decode_roofline_for_llama_3_8b_at_4k_by_hand():
    """32 layers, 32 query / 8 KV heads of 128, bf16, 4096 cached tokens, 16 splits."""
    h100 = PEAK_BANDWIDTH["H100-SXM"]
    roofline = decode_attention_roofline(32, 32, 8, 128, 2, 4096, 16, h100)
    assert roofline.kv_bytes == 32 * 2 * 4096 * 8 * 256 == 536_870_912  # 16.8 MB a layer
    assert roofline.query_bytes == 32 * 16 * 32 * 256 == 4_194_304
    assert roofline.output_bytes == 32 * 32 * 256 == 262_144
    assert roofline.partial_bytes == 32 * 2 * 16 * 32 * 129 * 4 == 16_908_288
    assert roofline.total_bytes == 558_235_648
    assert roofline.useful_fraction == pytest.approx(536_870_912 / 558_235_648)
    assert roofline.useful_fraction >= 0.8
    assert roofline.microseconds_at_peak == pytest.approx(558_235_648 / 3350e9 * 1e6)  # 166.6 us
    a100 = decode_attention_roofline(32, 32, 8, 128, 2, 4096, 16, PEAK_BANDWIDTH["A100-40GB"])
    assert a100.microseconds_at_peak == pytest.approx(roofline.microseconds_at_peak * 3350 / 1555)
    with pytest.raises(LmforgeError, match="grouped"):
        decode_attention_roofline(32, 30, 8, 128, 2, 4096, 16, h100)
