"""Flash attention (online softmax) for a forward of q_len >= 1 tokens at positions
start..start+q_len against the keys before and among them, read from the cache in place.

Covers the prefill (start 0), a chunked forward or the verification of drafted tokens
(start > 0, causal with that offset), a tree of drafts (a boolean (q_len, q_len) mask over
this forward's tokens replaces the causal rule among them), left padding, sliding windows,
attention sinks and soft-capped logits, all through the rule in `attention_core.visible`.
A program owns one block of queries of one query head and walks only the key ranges its
queries can see (the sinks, then the window up to the block's last query), so a windowed
or streaming prefill costs in proportion to the window, not to the square of the length.

With `blocks` (per row, query head and query block, the indices of the key blocks to
compute, ascending, -1 after the last), the program walks only those key blocks (the
MInference patterns of `compiler/sparse_patterns.py`); the token rule still applies inside
each block, so a pattern that keeps the diagonal block never leaves a query without a key.

Given the forward's own keys and values, the kernel also writes them into the cache (slots
start..start+q_len): the programs of each KV head's first query head store the tokens of
their query block, so each token is written once per row and KV head, and every program
reads those slots from the new tensors, never from the cache being written.

`start` may be a tensor read on the device (the forward's cache slots,
`AttentionContext.slots`), so that a verify step captured in a CUDA graph, whose launch
arguments are frozen at capture, attends from each replay's own position; the grid depends
only on the number of queries, never on the position.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmforge.codegen.triton.attention_core import (
    EMPTY_TOP,
    NEW_UNIT_STRIDES,
    NO_WINDOW,
    attend_range,
    new_arguments,
    position_arguments,
    write_new,
)
from lmforge.errors import LmforgeError


@triton.jit
def prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, new_k_ptr, new_v_ptr, out_ptr, pad_ptr, positions_ptr, tree_ptr, blocks_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_nkb, stride_nkh, stride_nks, stride_nkd,
    stride_nvb, stride_nvh, stride_nvs, stride_nvd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_pb, stride_ph, stride_ps,
    stride_bb, stride_bh, stride_bq,
    q_len, num_slots, start, start_ptr, window, sink, heads, group, head_dim, query_rows, max_blocks,
    scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_TREE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_SPARSE: tl.constexpr, HAS_NEW: tl.constexpr,
    START_ON_DEVICE: tl.constexpr,
):
    """One program per (query block of `query_rows` tokens, row x query head). In block-sparse
    mode a query block and a key block both span `query_rows` tokens (the pattern's block,
    any size: the key tiles walk it in BLOCK_N steps). With `HAS_NEW` (slots are positions,
    no sinks), the program of a KV head's first query head writes its block's keys and
    values, and the keys are walked in two parts, the cache's and the forward's own; the
    sink walk is compiled out, which keeps the kernel within sm_80's registers. The first
    query is at `start`, or with `START_ON_DEVICE` at the position `start_ptr` holds; the
    keys are the `num_slots` slots with `HAS_POSITIONS`, else the slots up to the last query."""
    query_block = tl.program_id(0)
    if START_ON_DEVICE:
        start = tl.load(start_ptr).to(tl.int32)
    kv_len = start + q_len
    if HAS_POSITIONS:
        kv_len = num_slots
    row = tl.program_id(1) // heads
    head = tl.program_id(1) % heads
    kv_head = head // group
    tokens = query_block * query_rows + tl.arange(0, BLOCK_M)
    token_ok = (tl.arange(0, BLOCK_M) < query_rows) & (tokens < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + tokens[:, None] * stride_qt + dims[None, :] * stride_qd,
                mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
    first_real = 0
    if HAS_PAD:
        first_real = tl.load(pad_ptr + row)
    query_pos = (start + tokens)[:, None]
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    positions_base = positions_ptr + row * stride_pb + kv_head * stride_ph
    new_k_base = new_k_ptr + row * stride_nkb + kv_head * stride_nkh
    new_v_base = new_v_ptr + row * stride_nvb + kv_head * stride_nvh
    if HAS_NEW:
        if head % group == 0:
            write_new(k_base, stride_ks, stride_kd, new_k_base, stride_nks, stride_nkd, start, tokens, token_ok,
                      dims, dim_ok)
            write_new(v_base, stride_vs, stride_vd, new_v_base, stride_nvs, stride_nvd, start, tokens, token_ok,
                      dims, dim_ok)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    top = tl.full([BLOCK_M], EMPTY_TOP, dtype=tl.float32)
    if BLOCK_SPARSE:
        chosen = blocks_ptr + row * stride_bb + head * stride_bh + query_block * stride_bq
        for index in range(0, max_blocks):
            key_block = tl.load(chosen + index)
            if key_block >= 0:
                acc, denom, top = attend_range(
                    acc, denom, top, q, query_pos, tokens[:, None], key_block * query_rows,
                    tl.minimum(key_block * query_rows + query_rows, kv_len),
                    k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                    new_k_base, new_v_base, stride_nks, stride_nkd, stride_nvs, stride_nvd, start,
                    positions_base, stride_ps,
                    tree_ptr, q_len, start, first_real, window, sink, scale, softcap, dims, dim_ok,
                    BLOCK_N, HAS_POSITIONS, HAS_TREE, HAS_SOFTCAP, HAS_NEW,
                )
    else:
        if HAS_POSITIONS or HAS_TREE:
            # slot order is not position order, or a tree may reach any of this forward's keys
            sink_end = 0
            lo = 0
            hi = kv_len
        else:
            block_first = start + query_block * query_rows
            hi = tl.minimum(kv_len, block_first + query_rows)
            sink_end = tl.where(sink > 0, tl.minimum(first_real + sink, hi), 0)
            # the window of the block's first query, from the row's first real key, but never
            # past the block's first query itself (a padding query sees its own key)
            lo = tl.minimum(tl.maximum(block_first - window + 1, first_real), block_first)
            lo = tl.maximum(lo, sink_end)
        if not HAS_NEW:  # a forward that writes its keys has no sinks (the launcher refuses them)
            acc, denom, top = attend_range(
                acc, denom, top, q, query_pos, tokens[:, None], 0, sink_end,
                k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                new_k_base, new_v_base, stride_nks, stride_nkd, stride_nvs, stride_nvd, start,
                positions_base, stride_ps,
                tree_ptr, q_len, start, first_real, window, sink, scale, softcap, dims, dim_ok,
                BLOCK_N, HAS_POSITIONS, HAS_TREE, HAS_SOFTCAP, False,
            )
        acc, denom, top = attend_range(
            acc, denom, top, q, query_pos, tokens[:, None], lo, hi,
            k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
            new_k_base, new_v_base, stride_nks, stride_nkd, stride_nvs, stride_nvd, start,
            positions_base, stride_ps,
            tree_ptr, q_len, start, first_real, window, sink, scale, softcap, dims, dim_ok,
            BLOCK_N, HAS_POSITIONS, HAS_TREE, HAS_SOFTCAP, HAS_NEW,
        )
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + row * stride_ob + head * stride_oh + tokens[:, None] * stride_ot + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & dim_ok[None, :])


@dataclass(frozen=True)
class PrefillLaunch:
    """How the launcher runs the kernel for one forward, and what `aot_specs` compiles: the
    one place both read, so the AOT report describes the configuration that runs."""

    query_rows: int
    """Queries a program owns (a block-sparse pattern's block, else BLOCK_M)."""
    block_m: int
    block_n: int
    block_d: int
    num_warps: int


def launch_config(q_len: int, head_dim: int, element_size: int, tree: bool = False,
                  sparse_block: int | None = None) -> PrefillLaunch:
    """Tiles and warps for `q_len` queries at `head_dim`: up to 64 queries a program (at
    least the 16 rows `tl.dot` needs) and 64 keys a block (32 past head_dim 128), head_dim
    padded to a power of two (masked). fp32 products run on FMA units, not tensor cores, and
    hold more in registers: 32 queries and 16 keys (64 x 64 spilled 8 KB per thread at head_dim
    128 on sm_80). A draft tree's ancestor mask is one more tile per key block: at most 32
    queries (64 spilled on sm_80 at head_dim 64 in fp16, on 4 warps and on 8); its key walk
    does not depend on the query block, so each query's result is the same at any height. A
    block-sparse program owns one pattern block of queries, however large. Warps, each
    choice a count that compiled without spills for sm_80 and sm_90 (Triton 3.9; fewer
    spilled): 8 from 64 x 128 tiles in fp16 and 32 x 128 in fp32 (4 spilled 748 B on sm_90);
    fp32 block-sparse tiles of 64 queries 8, but 16 at head_dim 64 (8 spilled on sm_80); a
    tree's 32-query tiles 8 in fp16 and 16 in fp32 (at head_dim 64 and 128; 4 spilled at 64 in
    fp16 on sm_90, 8 in fp32 on sm_80)."""
    block_d = triton.next_power_of_2(head_dim)
    half = element_size <= 2
    if sparse_block is not None:
        query_rows = sparse_block
        block_m = max(16, triton.next_power_of_2(sparse_block))
    else:
        block_m = min(32 if tree or not half else 64, max(16, triton.next_power_of_2(q_len)))
        query_rows = block_m
    block_n = (64 if block_d <= 128 else 32) if half else 16
    if half:
        num_warps = 8 if block_m * block_d >= 64 * 128 else 4
    elif sparse_block is not None and block_m >= 64:
        num_warps = 16 if block_d == 64 else 8
    else:
        num_warps = 8 if block_m * block_d >= 32 * 128 else 4
    if tree and block_m >= 32:
        num_warps = 8 if half else 16
    return PrefillLaunch(query_rows, block_m, block_n, block_d, num_warps)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int | torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    sink: int = 0,
    pad: torch.Tensor | None = None,
    tree: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    blocks: torch.Tensor | None = None,
    block: int = 64,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the q_len queries at positions start.. over a cache.

    `start` is an int, or an integer tensor whose first element the kernel reads on the
    device (the forward's cache slots, `AttentionContext.slots`), so no launch argument
    depends on the position. q: (B, Hq, T, D); k_cache, v_cache: (B, Hkv, S, D), any strides. Without
    `key_positions`, slot i holds position i and slots 0..start+T are read: this forward's
    keys must already be written, or be given as `new_keys` and `new_values` ((B, Hkv, T, D),
    any strides), which the kernel writes into the cache at slots start..start+T (S must
    hold them); with it ((B, S) or (B, Hkv, S) int32, -1: empty) all S
    slots are read. `window` <= 0: no window. `pad` (B,): each row's first real position.
    `tree` (T, T) bool: which of this forward's tokens each one sees. `blocks` (B or 1,
    Hq or 1, ceil(T / block), K) int32: key blocks per query block (block-sparse, start 0).
    Returns (B, Hq, T, D), a view of a contiguous (B, T, Hq, D) tensor (the attention ops'
    output layout)."""
    batch, heads, q_len, head_dim = q.shape
    group = heads // k_cache.shape[1]
    launch = launch_config(q_len, head_dim, q.element_size(), tree=tree is not None,
                           sparse_block=block if blocks is not None else None)
    on_device = isinstance(start, torch.Tensor)
    out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    positions, position_strides = position_arguments(key_positions, q)
    new_k, new_v, new_k_strides, new_v_strides = new_arguments(new_keys, new_values, q)
    has_new = new_keys is not None
    if has_new and (key_positions is not None or sink > 0):
        raise LmforgeError("prefill attention writes new keys only into a dense cache without attention sinks (a "
                           "streaming head's ring is written by RingSlot.write)")
    if has_new and not on_device and start + q_len > k_cache.shape[2]:
        raise LmforgeError(f"prefill attention writes the new keys and values at slots {start}..{start + q_len - 1} "
                           f"of a dense cache; this cache has {k_cache.shape[2]} slots")
    if blocks is not None:
        blocks = blocks.to(torch.int32).contiguous()
        block_strides = tuple(blocks.stride(i) if blocks.shape[i] > 1 else 0 for i in range(3))
        max_blocks = blocks.shape[3]
    else:
        blocks, block_strides, max_blocks = q, (0, 0, 0), 0
    prefill_attention_kernel[(triton.cdiv(q_len, launch.query_rows), batch * heads)](
        q, k_cache, v_cache, new_k, new_v, out, pad if pad is not None else q, positions,
        tree.to(torch.int8).contiguous() if tree is not None else q, blocks,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *new_k_strides, *new_v_strides, *out.stride(),
        *position_strides, *block_strides,
        q_len, k_cache.shape[2], 0 if on_device else start, start if on_device else q,
        window if window > 0 else NO_WINDOW, sink, heads, group, head_dim, launch.query_rows, max_blocks,
        scale, softcap,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=launch.block_d,
        HAS_PAD=pad is not None, HAS_POSITIONS=key_positions is not None, HAS_TREE=tree is not None,
        HAS_SOFTCAP=softcap > 0.0, BLOCK_SPARSE=max_blocks > 0, HAS_NEW=has_new, START_ON_DEVICE=on_device,
        num_warps=launch.num_warps,
    )
    return out


def aot_specs(head_dim: int, group: int, dtype: torch.dtype, q_len: int = 1 << 16, tree: bool = False,
              sparse_block: int | None = None) -> list[tuple[object, dict, dict, int]]:
    """Example (kernel, signature, constexprs, num_warps) sets for ahead-of-time compiles of
    a padded causal prefill at these shapes that writes its keys and values into the cache
    (`group` does not change the kernel: a program serves one query head), with the tiles
    and warps `launch_config` gives the launcher for `q_len` queries (by default a long
    prompt's), under a draft tree's mask with `tree`, over block-sparse lists of
    `sparse_block`-token blocks with it."""
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    launch = launch_config(q_len, head_dim, torch.empty((), dtype=dtype).element_size(), tree=tree,
                           sparse_block=sparse_block)
    signature = {
        "q_ptr": f"*{element}", "k_ptr": f"*{element}", "v_ptr": f"*{element}",
        "new_k_ptr": f"*{element}", "new_v_ptr": f"*{element}", "out_ptr": f"*{element}",
        "pad_ptr": "*i32", "positions_ptr": "*i32", "tree_ptr": "*i8", "blocks_ptr": "*i32",
        **{f"stride_{tensor}{axis}": "i32" for tensor, axes in
           (("q", "bhtd"), ("k", "bhsd"), ("v", "bhsd"), ("nk", "bhsd"), ("nv", "bhsd"), ("o", "bhtd"), ("p", "bhs"),
            ("b", "bhq"))
           for axis in axes},
        "q_len": "i32", "num_slots": "i32", "start": "i32", "start_ptr": "*i64",
        **{name: "i32" for name in ("window", "sink", "heads", "group", "head_dim", "query_rows", "max_blocks")},
        "scale": "fp32", "softcap": "fp32",
    }
    constexprs = {"BLOCK_M": launch.block_m, "BLOCK_N": launch.block_n, "BLOCK_D": launch.block_d, "HAS_PAD": True,
                  "HAS_POSITIONS": False, "HAS_TREE": tree, "HAS_SOFTCAP": False,
                  "BLOCK_SPARSE": sparse_block is not None,
                  "HAS_NEW": True, "START_ON_DEVICE": False, **NEW_UNIT_STRIDES}
    return [(prefill_attention_kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
             launch.num_warps)]
