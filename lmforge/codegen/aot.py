"""Ahead-of-time compilation of lmforge's Triton kernels for NVIDIA targets, on any machine.

A kernel that spills registers, or asks for more shared memory than the chip has, fails or
crawls only when it is launched on that chip. Triton can compile for a target without its
GPU (`triton.compile` with a `GPUTarget`), so those problems can be caught here, on a CPU:
this module compiles a `KernelSpec` for sm_80 (A100) and sm_90 (H100), reads what the chip
would have to provide, and refuses a kernel that spills or cannot fit.

What the compile does not say without a GPU is read from the binary. Registers are not in
Triton's metadata until a driver loads the cubin, so they come from `cuobjdump -res-usage`
on the cubin Triton produced, and spills from the `ptxas -v` log of the run that produced
it; both tools ship inside the triton wheel (`triton/backends/nvidia/bin/`).
`metadata.shared` is the dynamic shared memory a launch requests; cuobjdump adds the static
part. Triton never checks either against the target, so the limits below are checked here.

The first import of triton in a process (importing lmforge does it, through torch.export)
fixes whether Triton's own library functions (tl.sum, …) are compiled or interpreted: with
TRITON_INTERPRET=1 set at that moment nothing can be compiled ahead of time, and without it
kernels cannot be interpreted later. Where the interpreter is in use, compile in a process
of its own (the tests do). Target limits and occupancy arithmetic are in `gpu_targets.py`.

The PTX and cubin written to an artifact are for reading (`cuobjdump`, `nvdisasm`, a diff
between versions); the runtime never loads them (DESIGN.md: nothing executable is taken
from an artifact).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from lmforge.codegen.gpu_targets import TARGETS, TargetLimits, occupancy
from lmforge.errors import LmforgeError

_SCALAR_TYPES = {"i1", "i8", "i16", "i32", "i64", "u8", "u32", "u64", "fp16", "bf16", "fp32", "fp64"}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one configuration, as a launcher would specialise it.

    `signature` maps every argument of `fn`, in order, to "*fp16", "*bf16", "*fp32", "*i32",
    … (pointers), "i32", "fp32", … (scalars) or "constexpr" (then its value is in
    `constexprs`). `aligned` names the pointer and integer arguments that get Triton's
    16-byte divisibility hint: the JIT adds it for every 16-byte-aligned pointer and every
    integer divisible by 16, and without it loads are not vectorised, so leaving it out
    measures a different kernel from the one that runs."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    """The graph ops (e.g. "lmforge::attention") this kernel implements, for reports."""

    def config(self) -> str:
        """The configuration in one line, for error messages and reports."""
        values = ", ".join(f"{key}={value}" for key, value in self.constexprs.items())
        return f"num_warps={self.num_warps}, num_stages={self.num_stages}" + (f", {values}" if values else "")


@dataclass(frozen=True)
class CompiledKernelReport:
    """One kernel compiled for one target, and what a launch would need from the chip."""

    name: str
    target: str
    ptx: str
    cubin: bytes
    registers: int
    """Per thread, from the cubin (cuobjdump -res-usage)."""
    spill_store_bytes: int
    spill_load_bytes: int
    """Both from ptxas -v; a kernel that spills is refused, so a report always has 0."""
    shared_bytes: int
    """Dynamic shared memory a launch requests (Triton's metadata.shared)."""
    static_shared_bytes: int
    """Shared memory declared in the cubin itself (cuobjdump's SHARED)."""
    occupancy_warps: int
    """Resident warps per SM that registers, shared memory and warp limits allow."""
    occupancy_limit: str
    compile_seconds: float

    def summary(self) -> dict:
        """The report without the binaries: what `lmforge info --json` shows per target."""
        limits = TARGETS[self.target]
        return {
            "registers": self.registers,
            "spills": self.spill_store_bytes,
            "spill_loads": self.spill_load_bytes,
            "shared_bytes": self.shared_bytes,
            "static_shared_bytes": self.static_shared_bytes,
            "occupancy_warps": self.occupancy_warps,
            "occupancy_fraction": round(self.occupancy_warps / limits.max_warps_per_sm, 3),
            "occupancy_limit": self.occupancy_limit,
            "compile_seconds": round(self.compile_seconds, 3),
        }


def nvidia_tool(name: str) -> Path:
    """A binary the triton wheel ships for its NVIDIA backend (ptxas, cuobjdump)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise LmforgeError(
            f"{name} not found at {path}: the installed triton wheel has no NVIDIA tools, so the registers "
            "and spills of an ahead-of-time compile cannot be read (install the official triton wheel from PyPI)"
        )
    return path


def _ptxas_for(limits: TargetLimits) -> Path:
    """The ptxas Triton 3.9 itself runs for this target: the legacy one below sm_90, the
    newer one (named ptxas-blackwell) from sm_90 on (backends/nvidia/compiler.get_ptxas)."""
    return nvidia_tool("ptxas" if limits.capability < 90 else "ptxas-blackwell")


def _check_spec(spec: KernelSpec) -> JITFunction:
    fn = spec.fn
    if not isinstance(fn, JITFunction):
        raise LmforgeError(
            f"kernel {spec.name}: {type(fn).__name__} is not a compiled Triton function; kernels defined while "
            "TRITON_INTERPRET=1 is set can only be interpreted: compile ahead of time in a process without it"
        )
    if list(spec.signature) != list(fn.arg_names):
        raise LmforgeError(
            f"kernel {spec.name}: signature names {list(spec.signature)}, the function takes {fn.arg_names}"
        )
    for arg, kind in spec.signature.items():
        scalar = kind[1:] if kind.startswith("*") else kind
        if kind != "constexpr" and scalar not in _SCALAR_TYPES:
            raise LmforgeError(f"kernel {spec.name}: argument {arg} has unknown type {kind!r}")
        if (kind == "constexpr") != (arg in spec.constexprs):
            raise LmforgeError(
                f"kernel {spec.name}: argument {arg} must be 'constexpr' exactly when it has a value in constexprs"
            )
    for arg in spec.aligned:
        kind = spec.signature.get(arg)
        if kind is None or not (kind.startswith("*") or kind in {"i32", "i64"}):
            raise LmforgeError(f"kernel {spec.name}: aligned argument {arg} is not a pointer or integer argument")
    return fn


def _compile(spec: KernelSpec, fn: JITFunction, limits: TargetLimits):
    """(compiled kernel, seconds, ptxas -v log). Triton always runs ptxas with -v and prints
    the log when asked (TRITON_DUMP_PTXAS_LOG), so the log read here is that of the very
    run that produced the cubin; a cache hit would skip ptxas, so the cache is bypassed."""
    _ptxas_for(limits)  # say which tool is missing before Triton fails less clearly
    if not isinstance(triton.language.standard.sum, JITFunction):
        raise LmforgeError(
            "triton was imported while TRITON_INTERPRET=1 was set, so its own library functions (tl.sum, …) "
            "can only be interpreted in this process: compile ahead of time in a process started without it"
        )
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in spec.aligned}
    source = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    log = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        began = time.perf_counter()
        compiled = triton.compile(source, target=GPUTarget("cuda", limits.capability, 32), options=options)
        seconds = time.perf_counter() - began
    return compiled, seconds, log.getvalue()


def _resource_usage(cubin: bytes, function: str) -> dict[str, int]:
    """cuobjdump's line for the kernel: REG, STACK, SHARED, LOCAL, … as integers."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(nvidia_tool("cuobjdump")), "-res-usage", str(path)],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(rf"Function {re.escape(function)}:\s*\n\s*(.*)", text)
    if found is None:
        raise LmforgeError(f"cuobjdump -res-usage lists no function {function}:\n{text}")
    return {key: int(value) for key, value in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", found.group(1))}


def _spills(ptxas_log: str, name: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from the ptxas -v log of the compile."""
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if found is None:
        raise LmforgeError(f"kernel {name}: the compile printed no ptxas -v spill line (log: {ptxas_log[:200]!r})")
    return int(found.group(1)), int(found.group(2))


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def compile_for_target(spec: KernelSpec, target: str) -> CompiledKernelReport:
    """Compile `spec` for one target and measure it; raises LmforgeError if it spills or
    needs more shared memory per block than the target allows."""
    if target not in TARGETS:
        raise LmforgeError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    limits = TARGETS[target]
    fn = _check_spec(spec)
    compiled, seconds, ptxas_log = _compile(spec, fn, limits)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    usage = _resource_usage(cubin, compiled.metadata.name)
    where = f"kernel {spec.name} ({spec.config()}) on {target}"
    shared = compiled.metadata.shared + usage.get("SHARED", 0)
    if shared > limits.shared_per_block:
        raise LmforgeError(f"{where} needs {shared} bytes of shared memory per block; "
                           f"{target} allows {limits.shared_per_block}")
    spill_stores, spill_loads = _spills(ptxas_log, spec.name)
    if spill_stores or spill_loads:
        raise LmforgeError(f"{where} spills registers: {spill_stores} bytes stored, {spill_loads} loaded "
                           f"({usage['REG']} registers per thread)")
    warps, limit = occupancy(usage["REG"], shared, spec.num_warps, limits)
    return CompiledKernelReport(
        name=spec.name, target=target, ptx=ptx, cubin=cubin, registers=usage["REG"],
        spill_store_bytes=spill_stores, spill_load_bytes=spill_loads, shared_bytes=compiled.metadata.shared,
        static_shared_bytes=usage.get("SHARED", 0), occupancy_warps=warps, occupancy_limit=limit,
        compile_seconds=seconds,
    )


def compile_for_targets(
    spec: KernelSpec, targets: Iterable[str] = ("sm_80", "sm_90"), out_dir: Path | None = None
) -> dict[str, CompiledKernelReport]:
    """Compile `spec` for each target (see `compile_for_target`). With `out_dir`, the PTX and
    cubin go to `out_dir/kernels/<name>.<target>.ptx` and `.cubin`, each written atomically,
    once every target has compiled."""
    reports = {target: compile_for_target(spec, target) for target in targets}
    if out_dir is not None:
        for target, report in reports.items():
            stem = Path(out_dir) / "kernels" / f"{spec.name}.{target}"
            _write_atomically(stem.with_name(stem.name + ".ptx"), report.ptx.encode())
            _write_atomically(stem.with_name(stem.name + ".cubin"), report.cubin)
    return reports


def report_kernels(
    specs: Iterable[KernelSpec], targets: Iterable[str] = ("sm_80", "sm_90"), out_dir: Path | None = None
) -> list[dict]:
    """The `kernels` entry of `lmforge info --json`: per kernel its name, the ops it
    implements, its configuration and, per target, registers, spills, shared memory,
    occupancy and compile time."""
    targets = tuple(targets)
    kernels = []
    for spec in specs:
        reports = compile_for_targets(spec, targets, out_dir)
        kernels.append({
            "name": spec.name,
            "ops": list(spec.ops),
            "config": spec.config(),
            "targets": {target: report.summary() for target, report in reports.items()},
        })
    return kernels


def spec_from_aot_tuple(
    name: str, entry: tuple, ops: tuple[str, ...] = (), aligned: tuple[str, ...] | None = None,
    unit: tuple[str, ...] = (), num_stages: int = 3,
) -> KernelSpec:
    """A KernelSpec from a kernel module's `aot_specs` entry `(fn, signature, constexprs,
    num_warps)`. `aligned` defaults to every pointer argument (torch allocations are
    aligned); integer arguments are hinted only when named, since a stride of 1 hinted
    divisible by 16 would be compiled wrong. `unit` names integer arguments the JIT would
    see as 1 (innermost strides of contiguous tensors) and specialise to the constant 1."""
    fn, signature, constexprs, num_warps = entry
    signature = {arg: "constexpr" if arg in unit else kind for arg, kind in signature.items()}
    constexprs = {**constexprs, **dict.fromkeys(unit, 1)}
    if aligned is None:
        aligned = tuple(arg for arg, kind in signature.items() if kind.startswith("*"))
    return KernelSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                      num_stages=num_stages, aligned=aligned, ops=ops)


HEAD_MAJOR_TENSORS = ("q", "k", "v", "o", "nk", "nv", "d", "r")
"""Tensor prefixes of the attention kernels' stride arguments (`stride_<tensor><axis>`) whose
innermost dimension is `head_dim`, contiguous: queries, caches, outputs, a forward's new keys
and values, a merged cache's directions (`d`) and retained rows (`r`)."""


def _attention_spec(name: str, entry: tuple, ops: tuple[str, ...], head_dim: int,
                    unit: tuple[str, ...] = (), zero: tuple[str, ...] = ()) -> KernelSpec:
    """`spec_from_aot_tuple` with what Triton's JIT adds at a launch of an attention kernel:
    the innermost strides of head-major tensors (and the integer arguments in `unit`) are 1
    and become constants; every pointer, every other stride of a head-major tensor (a
    multiple of `head_dim`, with `head_dim` itself, when divisible by 16) and the integer
    arguments in `zero` (always 0 at a launch, so divisible by 16) get the divisibility hint."""
    fn, signature = entry[0], entry[1]
    strides = {arg: arg[len("stride_"):] for arg in signature if arg.startswith("stride_")}
    head_major = {arg for arg, suffix in strides.items() if suffix[:-1] in HEAD_MAJOR_TENSORS}
    innermost = {arg for arg in head_major if arg.endswith("d")}
    unit = tuple(arg for arg in signature if signature[arg] == "i32" and (arg in innermost or arg in unit))
    multiples = ({"head_dim", *head_major} - set(unit)) if head_dim % 16 == 0 else set()
    aligned = tuple(arg for arg, kind in signature.items()
                    if kind.startswith("*") or (arg in {*multiples, *zero} and kind == "i32"))
    return spec_from_aot_tuple(name, entry, ops=ops, aligned=aligned, unit=unit)


def attention_kernel_specs(head_dim: int, group: int, dtype: torch.dtype) -> list[KernelSpec]:
    """The attention kernels of a plain decode step and prefill (split-K decode, both stages,
    and flash prefill) as their launchers specialise them for a contiguous cache at these
    shapes: the modules' `aot_specs`, plus what Triton's JIT would add on its own
    (`_attention_spec`). That includes the strides of the forward's new keys and values
    (`stride_nk*`, `stride_nv*`): the attention ops hand the kernels their `k` and `v` inputs,
    a RoPE kernel's fresh (B, Hkv, T, D) output or a head-major view of a projection's
    (B, T, width) output whose width is a whole number of heads, so every stride but the
    innermost is a multiple of `head_dim`. `launchable_attention_specs` adds every other
    variant a program can launch.

    The kernel modules are imported here, not at the top of this module: importing them
    defines their `@triton.jit` functions, which must happen after a test has had the
    chance to set TRITON_INTERPRET."""
    from lmforge.codegen.triton import decode_attention, prefill_attention

    entries = [*decode_attention.aot_specs(head_dim, group, dtype),
               *prefill_attention.aot_specs(head_dim, group, dtype)]
    return [_attention_spec(entry[0].__name__, entry, ("lmforge::attention",), head_dim) for entry in entries]


def launchable_attention_specs(ops: Iterable[str], head_dim: int, group: int, dtype: torch.dtype,
                               softcap: bool = False, sparse_block: int | None = None,
                               verify_tokens: int | None = None) -> list[KernelSpec]:
    """Every attention kernel variant a program whose graph calls `ops` ("lmforge::attention",
    …) can launch, each listing the ops that launch it: the dense decode and prefill that
    write the step's keys (`attention_kernel_specs`), those and the tree verify as a step
    captured in a CUDA graph launches them (the position read from the device; a decode's
    split count fixed by the cache's size, which sets only the grid), the same kernels over a forward's own
    keys only (cache-free forwards, streaming heads' and merged or evicting caches' prefill),
    over a streaming ring's key positions, under a draft tree's mask, over block-sparse key
    lists of `sparse_block` tokens, and the merged-cache and evicting-cache kernels. A draft
    tree's verify forward of `verify_tokens` tokens and a block-sparse prefill get the tiles
    and warps their launcher picks (`prefill_attention.launch_config`; tree None: the largest
    query block it can pick). Constant flags that add work without
    changing a kernel's structure are set as the program can launch them at their most
    demanding: left padding on, soft-capping as the model caps its logits."""
    from lmforge.codegen.triton import decode_attention, evicting_attention, merged_attention, prefill_attention

    decode, combine = decode_attention.aot_specs(head_dim, group, dtype)
    (prefill,) = prefill_attention.aot_specs(head_dim, group, dtype)
    (tree,) = prefill_attention.aot_specs(head_dim, group, dtype, q_len=verify_tokens or 1 << 16, tree=True)
    (block_sparse,) = prefill_attention.aot_specs(head_dim, group, dtype, sparse_block=sparse_block or 64)
    merged_decode, merged_chunk = merged_attention.aot_specs(head_dim, group, dtype)
    (evicting,) = evicting_attention.aot_specs(head_dim, group, dtype)
    dense, streaming = ("attention", "tree_attention", "sparse_attention"), ("streaming_attention",)
    every = (*dense, *streaming, "merged_attention", "evicting_attention")
    variants = [  # name, module entry, constants changed, ops that launch it, further arguments the JIT sees as 1
        ("decode_attention_partial", decode, {}, dense, ()),
        ("decode_attention_partial_captured", decode, {"START_ON_DEVICE": True}, dense, ()),
        ("decode_attention_partial_own_keys", decode, {"HAS_NEW": False}, (*dense, *streaming), ()),
        ("decode_attention_partial_positions", decode, {"HAS_NEW": False, "HAS_POSITIONS": True}, streaming,
         ("stride_ps",)),
        ("decode_attention_combine", combine, {}, (*dense, *streaming, "merged_attention"), ()),
        ("prefill_attention_kernel", prefill, {}, dense, ()),
        ("prefill_attention_kernel_captured", prefill, {"START_ON_DEVICE": True}, dense, ()),
        ("prefill_attention_kernel_own_keys", prefill, {"HAS_NEW": False}, every, ()),
        ("prefill_attention_kernel_tree", tree, {}, ("tree_attention",), ()),
        ("prefill_attention_kernel_tree_captured", tree, {"START_ON_DEVICE": True}, ("tree_attention",), ()),
        ("prefill_attention_kernel_positions", prefill, {"HAS_NEW": False, "HAS_POSITIONS": True}, streaming,
         ("stride_ps",)),
        ("prefill_attention_kernel_block_sparse", block_sparse, {}, ("sparse_attention",), ()),
        ("merged_attention_kernel", merged_decode, {}, ("merged_attention",), ("q_len", "stride_nm", "stride_is")),
        ("merged_attention_kernel_chunk", merged_chunk, {}, ("merged_attention",), ("stride_nm", "stride_is")),
        ("evicting_decode_kernel", evicting, {}, ("evicting_attention",), ("stride_ps", "stride_as")),
    ]
    wanted = {op.removeprefix("lmforge::") for op in ops}
    specs = []
    for name, (fn, signature, constexprs, num_warps), changed, launched_by, unit in variants:
        launching = tuple(f"lmforge::{op}" for op in launched_by if op in wanted)
        if not launching:
            continue
        demanding = {flag: value for flag, value in (("HAS_PAD", True), ("HAS_SOFTCAP", softcap))
                     if flag in constexprs}
        entry = (fn, signature, {**constexprs, **demanding, **changed}, num_warps)
        # a step captured in a CUDA graph reads its position from the device and passes 0
        on_device = changed.get("START_ON_DEVICE", False)
        zero = tuple(arg for arg in ("query_pos", "start") if on_device and arg in signature)
        specs.append(_attention_spec(name, entry, launching, head_dim, unit, zero))
    return specs


def paged_attention_specs(head_dim: int, group: int, dtype: torch.dtype, softcap: bool = False) -> list[KernelSpec]:
    """The paged attention kernel a served step launches over a block pool
    (`codegen/triton/paged_attention.py`), in its two configurations: a decode step's
    one-token tiles split over the context (its combine stage is the decode kernel's,
    `decode_attention_combine`) and a step with prompt chunks. Block tables and spans are
    int32 arrays with no stride to hint beyond the table's row stride, which varies."""
    from lmforge.codegen.triton import paged_attention

    ops = ("lmforge::attention", "lmforge::tree_attention")
    return [_attention_spec(f"paged_attention_kernel_{kind}", entry, ops, head_dim)
            for kind, decode in (("decode", True), ("chunk", False))
            for entry in paged_attention.aot_specs(head_dim, group, dtype, softcap, decode=decode)]


def spec_from_emitted(kernel, rows: int, columns: int | None = None) -> KernelSpec:
    """A KernelSpec for a fused kernel from `triton_emit` (an `EmittedKernel`) as its launcher
    would run it over `rows` rows: BLOCK_R and num_warps from `triton_emit.launch_config`.
    `columns` gives the row width for a kernel whose width is not
    known from the graph. Every pointer gets the divisibility hint (the launcher passes
    `.contiguous()` inputs and fresh outputs); size arguments do not, as their values vary."""
    from lmforge.codegen.triton_emit import launch_config

    block_c = kernel.constexprs.get("BLOCK_C")
    if block_c is None:
        if columns is None:
            raise LmforgeError(f"kernel {kernel.name}: its row width depends on the input; give columns")
        block_c = triton.next_power_of_2(columns)
    block_r, num_warps = launch_config(rows, block_c)
    aligned = tuple(arg for arg, kind in kernel.signature.items() if kind.startswith("*"))
    return KernelSpec(name=kernel.name, fn=kernel.fn, signature=dict(kernel.signature), num_warps=num_warps,
                      constexprs={"BLOCK_R": block_r, "BLOCK_C": block_c}, aligned=aligned, ops=tuple(kernel.ops))
