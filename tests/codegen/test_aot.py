"""Ahead-of-time compiles for sm_80 and sm_90 on a machine without a GPU, the resource
report read from the binaries, the limits checked against each target, and the decode
attention roofline arithmetic.

Triton makes `@triton.jit` functions interpreter-only when TRITON_INTERPRET=1 is set as
they are defined, and other test modules set it at import. The kernels here are defined
with the interpreter switched off for their definition, and lmforge's attention kernels are
compiled in a subprocess without the variable, so the result does not depend on which test
modules pytest imported first.
"""

import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from lmforge.codegen.aot import (
    TARGETS,
    KernelSpec,
    compile_for_target,
    compile_for_targets,
    nvidia_tool,
    occupancy,
    report_kernels,
)
from lmforge.codegen.roofline import PEAK_BANDWIDTH, decode_attention_roofline
from lmforge.errors import LmforgeError

with triton.knobs.runtime.scope():
    triton.knobs.runtime.interpret = False

    @triton.jit
    def rmsnorm_kernel(x_ptr, weight_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
        tl.store(out_ptr + row * n_cols + cols, (x * scale * weight).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inner = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rows[:, None] * K + (k + inner)[None, :])
            b = tl.load(b_ptr + (k + inner)[:, None] * N + cols[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(tl.float16))

RMSNORM_SIGNATURE = {"x_ptr": "*fp16", "weight_ptr": "*fp16", "out_ptr": "*fp16", "n_cols": "i32", "eps": "fp32",
                     "BLOCK": "constexpr"}
MATMUL_SIGNATURE = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
                    **dict.fromkeys(("BLOCK_M", "BLOCK_N", "BLOCK_K"), "constexpr")}


def rmsnorm_spec(aligned: tuple[str, ...] = ("x_ptr", "weight_ptr", "out_ptr", "n_cols")) -> KernelSpec:
    return KernelSpec("rmsnorm_4096", rmsnorm_kernel, RMSNORM_SIGNATURE, {"BLOCK": 4096}, num_warps=8,
                      aligned=aligned, ops=("aten.rsqrt", "aten.mul"))


def matmul_spec(num_stages: int) -> KernelSpec:
    """128 x 256 tiles over 64-deep slices: 48 KB of operands per pipeline buffer."""
    tiles = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}
    return KernelSpec("matmul_128x256", matmul_kernel, MATMUL_SIGNATURE, tiles,
                      num_warps=8, num_stages=num_stages, aligned=tuple(MATMUL_SIGNATURE)[:6])


def test_rmsnorm_compiles_for_both_targets_and_writes_binaries(tmp_path):
    reports = compile_for_targets(rmsnorm_spec(), ("sm_80", "sm_90"), out_dir=tmp_path)
    for target, gpu in (("sm_80", "sm_80"), ("sm_90", "sm_90a")):
        report = reports[target]
        assert f".target {gpu}" in report.ptx
        assert report.cubin.startswith(b"\x7fELF")
        assert report.registers > 0
        assert report.spill_store_bytes == report.spill_load_bytes == 0
        assert 0 < report.occupancy_warps <= TARGETS[target].max_warps_per_sm
        assert report.occupancy_warps % 8 == 0
        assert (tmp_path / "kernels" / f"rmsnorm_4096.{target}.ptx").read_text() == report.ptx
        assert (tmp_path / "kernels" / f"rmsnorm_4096.{target}.cubin").read_bytes() == report.cubin
    assert sorted(path.name for path in (tmp_path / "kernels").iterdir()) == [
        "rmsnorm_4096.sm_80.cubin", "rmsnorm_4096.sm_80.ptx", "rmsnorm_4096.sm_90.cubin", "rmsnorm_4096.sm_90.ptx"]


def test_divisibility_hints_vectorise_the_loads():
    hinted = compile_for_target(rmsnorm_spec(), "sm_80")
    plain = compile_for_target(rmsnorm_spec(aligned=()), "sm_80")

    def global_loads(ptx: str) -> list[str]:
        return [line for line in ptx.splitlines() if "ld.global" in line]

    assert all(".v4." in line for line in global_loads(hinted.ptx))
    assert not any(".v4." in line for line in global_loads(plain.ptx))
    assert len(global_loads(hinted.ptx)) * 4 <= len(global_loads(plain.ptx))


def test_shared_memory_beyond_the_target_is_refused():
    """Five stages keep four 48 KB buffers (192 KB): more than an A100 block may have."""
    refusal = r"kernel matmul_128x256 \(num_warps=8, num_stages=5.*\) on sm_80 needs \d+ bytes"
    with pytest.raises(LmforgeError, match=refusal):
        compile_for_target(matmul_spec(num_stages=5), "sm_80")
    h100 = compile_for_target(matmul_spec(num_stages=4), "sm_90")
    assert TARGETS["sm_80"].shared_per_block < h100.shared_bytes <= TARGETS["sm_90"].shared_per_block


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


def test_bad_specs_name_the_problem():
    with pytest.raises(LmforgeError, match="signature names"):
        compile_for_target(KernelSpec("short", rmsnorm_kernel, {"x_ptr": "*fp16"}), "sm_80")
    with pytest.raises(LmforgeError, match="BLOCK must be 'constexpr'"):
        compile_for_target(KernelSpec("no_block", rmsnorm_kernel, RMSNORM_SIGNATURE), "sm_80")
    with pytest.raises(LmforgeError, match="aligned argument eps"):
        compile_for_target(rmsnorm_spec(aligned=("eps",)), "sm_80")
    with pytest.raises(LmforgeError, match="unknown target 'sm_70'"):
        compile_for_target(rmsnorm_spec(), "sm_70")
    with pytest.raises(LmforgeError, match="not a compiled Triton function"):
        compile_for_target(KernelSpec("plain", lambda x: x, {"x": "i32"}), "sm_80")
    with pytest.raises(LmforgeError, match="no-such-tool not found"):
        nvidia_tool("no-such-tool")


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


CLEAN_PROCESS_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from tiny_models import tiny_model
import lmforge
from lmforge.codegen.aot import attention_kernel_specs, report_kernels, spec_from_emitted
from lmforge.codegen.triton_backend import emit_kernels

model = tiny_model("llama", num_layers=1).to(torch.float16)
program = lmforge.optimize(model, "passes: [{{name: cleanup}}, {{name: fuse_projections}}]\\ncodegen: {{backend: fx}}").program
print(json.dumps({{
    "attention": report_kernels(attention_kernel_specs(128, 4, torch.float16)),
    "fused": report_kernels([spec_from_emitted(kernel, rows=8) for kernel in emit_kernels(program)]),
}}))
"""


@pytest.fixture(scope="module")
def lmforge_kernel_reports() -> dict:
    """report_kernels for lmforge's attention kernels (fp16, head_dim 128, 4 query heads per
    KV head, as their launchers specialise them) and for the fused kernels generated for a
    one-layer tiny fp16 Llama at 8 rows, compiled in a process without TRITON_INTERPRET."""
    script = CLEAN_PROCESS_SCRIPT.format(tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def assert_fits_without_spills(kernel: dict) -> None:
    assert set(kernel["targets"]) == {"sm_80", "sm_90"}
    for target, summary in kernel["targets"].items():
        assert summary["spills"] == summary["spill_loads"] == 0
        assert 0 < summary["registers"] <= 255
        assert summary["shared_bytes"] + summary["static_shared_bytes"] <= TARGETS[target].shared_per_block
        assert summary["occupancy_warps"] > 0


def test_attention_kernels_compile_for_both_targets_without_spills(lmforge_kernel_reports):
    kernels = lmforge_kernel_reports["attention"]
    assert [kernel["name"] for kernel in kernels] == [
        "decode_attention_partial", "decode_attention_combine", "prefill_attention_kernel"]
    for kernel in kernels:
        assert kernel["ops"] == ["lmforge::attention"]
        assert_fits_without_spills(kernel)


def test_generated_fused_kernels_compile_for_both_targets_without_spills(lmforge_kernel_reports):
    kernels = lmforge_kernel_reports["fused"]
    names = [kernel["name"] for kernel in kernels]
    assert any(name.startswith("rmsnorm") for name in names) and any(name.startswith("rope") for name in names)
    for kernel in kernels:
        assert kernel["ops"]
        assert "BLOCK_R=8" in kernel["config"]
        assert_fits_without_spills(kernel)
