"""The ahead-of-time compiles `test_aot.py` checks, run as a script in a process of their own
(started without TRITON_INTERPRET): importing triton here, in the pytest process, would
decide for every test module after this one that Triton's library runs compiled, and the
interpreter tests would break. Prints one JSON object; refusals are recorded as messages.

    python tests/codegen/aot_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmforge  # noqa: E402
from lmforge.codegen.aot import (  # noqa: E402
    KernelSpec,
    attention_kernel_specs,
    compile_for_target,
    compile_for_targets,
    launchable_attention_specs,
    nvidia_tool,
    report_kernels,
    spec_from_emitted,
)
from lmforge.codegen.triton.quantized_linear import aot_kernel_specs  # noqa: E402
from lmforge.codegen.triton_backend import emit_kernels  # noqa: E402
from lmforge.codegen.triton_emit import MAX_TILE  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


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
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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


def matmul_spec(name: str, tiles: tuple[int, int, int], num_warps: int, num_stages: int) -> KernelSpec:
    constexprs = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tiles))
    return KernelSpec(name, matmul_kernel, MATMUL_SIGNATURE, constexprs, num_warps=num_warps, num_stages=num_stages,
                      aligned=tuple(MATMUL_SIGNATURE)[:6])


def refusal(run) -> str | None:
    """The LmforgeError message `run()` raises, or None if it raises none."""
    try:
        run()
    except LmforgeError as error:
        return str(error)
    return None


def global_loads(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if "ld.global" in line]


def rmsnorm_checks(out_dir: Path) -> dict:
    reports = compile_for_targets(rmsnorm_spec(), ("sm_80", "sm_90"), out_dir=out_dir)
    plain = compile_for_target(rmsnorm_spec(aligned=()), "sm_80")
    targets = {}
    for target, report in reports.items():
        stem = out_dir / "kernels" / f"rmsnorm_4096.{target}"
        targets[target] = {
            **report.summary(),
            "ptx_target": next(line.split()[1] for line in report.ptx.splitlines() if line.startswith(".target")),
            "cubin_is_elf": report.cubin.startswith(b"\x7fELF"),
            "files_match": (Path(f"{stem}.ptx").read_text() == report.ptx
                            and Path(f"{stem}.cubin").read_bytes() == report.cubin),
            "loads": global_loads(report.ptx),
        }
    return {"targets": targets, "files": sorted(path.name for path in (out_dir / "kernels").iterdir()),
            "plain_sm_80": {**plain.summary(), "loads": global_loads(plain.ptx)}}


def limit_checks() -> dict:
    h100 = compile_for_target(matmul_spec("matmul_128x256", (128, 256, 64), 8, 4), "sm_90")
    return {
        # five stages keep four 48 KB buffers (192 KB): more than an A100 block may have
        "shared_sm_80": refusal(lambda: compile_for_target(matmul_spec("matmul_128x256", (128, 256, 64), 8, 5),
                                                           "sm_80")),
        "four_stages_sm_90": h100.summary(),
        # a 64 x 128 fp32 accumulator in one warp: 256 values a thread, over the 255 registers allowed
        "spill_sm_80": refusal(lambda: compile_for_target(matmul_spec("matmul_64x128", (64, 128, 32), 1, 1), "sm_80")),
    }


def bad_spec_checks() -> dict:
    return {
        "short_signature": refusal(lambda: compile_for_target(
            KernelSpec("short", rmsnorm_kernel, {"x_ptr": "*fp16"}), "sm_80")),
        "missing_constexpr": refusal(lambda: compile_for_target(
            KernelSpec("no_block", rmsnorm_kernel, RMSNORM_SIGNATURE), "sm_80")),
        "aligned_float": refusal(lambda: compile_for_target(rmsnorm_spec(aligned=("eps",)), "sm_80")),
        "unknown_target": refusal(lambda: compile_for_target(rmsnorm_spec(), "sm_70")),
        "not_a_kernel": refusal(lambda: compile_for_target(KernelSpec("plain", lambda x: x, {"x": "i32"}), "sm_80")),
        "missing_tool": refusal(lambda: nvidia_tool("no-such-tool")),
    }


def lmforge_kernel_reports() -> dict:
    """lmforge's attention kernels (fp16, head_dim 128, 4 query heads per KV head) and the
    fused kernels generated for a one-layer tiny fp16 Llama at their largest tile (a long
    prefill: MAX_TILE rows)."""
    model = tiny_model("llama", num_layers=1).to(torch.float16)
    recipe = "passes: [{name: cleanup}, {name: fuse_projections}]\ncodegen: {backend: fx}\n"
    program = lmforge.optimize(model, recipe).program
    return {
        "attention": report_kernels(attention_kernel_specs(128, 4, torch.float16)),
        "fused": report_kernels([spec_from_emitted(kernel, rows=MAX_TILE) for kernel in emit_kernels(program)]),
    }


ALL_ATTENTION_OPS = tuple(f"lmforge::{op}" for op in ("attention", "tree_attention", "sparse_attention",
                                                      "streaming_attention", "merged_attention", "evicting_attention"))


def attention_variant_reports() -> list[dict]:
    """The attention kernel variants a program calling every attention op can launch that
    `attention_kernel_specs` does not compile (fp16, head_dim 64, 2 query heads per KV head,
    block-sparse blocks of 64 tokens, a draft tree of 15 nodes and its root)."""
    plain = {spec.name for spec in attention_kernel_specs(64, 2, torch.float16)}
    specs = launchable_attention_specs(ALL_ATTENTION_OPS, 64, 2, torch.float16, sparse_block=64, verify_tokens=16)
    return report_kernels([spec for spec in specs if spec.name not in plain])


SPILLED_BEFORE = (  # (kernel, head_dim, group, dtype, soft-cap, block-sparse block, verify tokens)
    ("prefill_attention_kernel_tree", 64, 2, torch.float16, False, None, 64),
    ("prefill_attention_kernel_tree", 64, 2, torch.float16, True, None, 64),
    ("prefill_attention_kernel_block_sparse", 64, 2, torch.float32, False, 64, None),
    ("prefill_attention_kernel_block_sparse", 128, 2, torch.float32, False, 64, None),
    ("decode_attention_partial", 128, 8, torch.float32, False, None, None),
    ("decode_attention_partial_captured", 128, 8, torch.float32, False, None, None),
    ("prefill_attention_kernel", 128, 8, torch.float32, False, None, None),
)
"""Configurations whose earlier block and warp choices spilled on sm_80 or sm_90."""


def spilled_before_reports() -> list[dict]:
    """`SPILLED_BEFORE` compiled as their launchers now run them, each with its configuration."""
    reports = []
    for name, head_dim, group, dtype, softcap, sparse_block, verify_tokens in SPILLED_BEFORE:
        specs = launchable_attention_specs(ALL_ATTENTION_OPS, head_dim, group, dtype, softcap=softcap,
                                           sparse_block=sparse_block, verify_tokens=verify_tokens)
        (report,) = report_kernels([spec for spec in specs if spec.name == name])
        reports.append({**report, "case": [name, head_dim, group, str(dtype), softcap, sparse_block, verify_tokens]})
    return reports


QUANTIZED_FORMATS = [{"group_size": None, "bias": False, "outliers": True},
                     {"group_size": 32, "bias": True, "outliers": False}]
QUANTIZED_COMPILED = ("dequant_gemv_int8", "dequant_gemm_int4_g32_bias", "dequant_split_k_combine")


def quantized_linear_reports() -> list[dict]:
    """Three of the dequantizing matmul's fp16 configurations (`QUANTIZED_COMPILED`): the int8
    GEMV, the int4 GEMM with a bias, the split-K combine."""
    return report_kernels([spec for spec in aot_kernel_specs(torch.float16, QUANTIZED_FORMATS)
                           if spec.name in QUANTIZED_COMPILED])


if __name__ == "__main__":
    print(json.dumps({"rmsnorm": rmsnorm_checks(Path(sys.argv[1])), "limits": limit_checks(),
                      "bad_specs": bad_spec_checks(), **lmforge_kernel_reports(),
                      "attention_variants": attention_variant_reports(), "spilled_before": spilled_before_reports(),
                      "quantized_linear": quantized_linear_reports()}))
