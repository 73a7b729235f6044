"""Attention for a ragged continuous batch over a paged KV cache, read through block tables.

A serving step (`Engine.step_paged`) lays the query tokens of several requests in one row:
decode requests feed one token, prefilling ones a chunk of their prompt, each from its own
first position. Their earlier keys and values live in a block pool `(1, kv_heads, blocks *
block_size, head_dim)`; a request's block table lists its blocks in position order, so
position p is at slot `table[p // block_size] * block_size + p % block_size`
(`runtime.paged`). The kernel gathers each key tile through the table instead of copying
the context into one sequence, as the `aten` path does (`codegen/aten/paged.py`).

Work is split into items, each a block of up to BLOCK_M query tokens of one request; a
program owns one item, one KV head and one key split, and the query heads of that KV head
are the rows of its tile with the item's tokens (grouped-query attention: each key block is
loaded once for the whole group, as in `decode_attention.py`). A query sees the keys of its
own request at positions not after its own and, with a window, less than `window` before
it (`attention_core.visible`); soft-capping is applied to the scores before the mask.

The step's own keys and values are written into their slots by the programs of the first
split (each token once per KV head), and every program reads the positions from the
request's first new token on from the step's key and value tensors, never from the pool
being written, so one launch both writes the cache and attends. The earlier positions are
full blocks nobody writes during the step (a block shared through the prefix cache is full
and never written again, `serve/continuous.py`).

When every request in the step decodes one token, the items are single tokens: their tile
is the group's heads padded to the 16 rows `tl.dot` needs, and a long context is split
over several programs whose partial outputs and log-sum-exps the decode kernel's combine
stage merges (`decode_attention.decode_attention_combine`). A step with a prompt chunk runs
one split with tiles of several tokens; its decode requests ride along in tiles of their own.
"""

import torch
import triton
import triton.language as tl

from lmforge.codegen.triton.attention_core import (
    EMPTY_TOP,
    NEW_UNIT_STRIDES,
    NO_WINDOW,
    attend_keys,
    fold_block,
    visible,
)
from lmforge.codegen.triton.decode_attention import (
    MAX_SPLITS,
    MIN_KEYS_PER_SPLIT,
    TARGET_PROGRAMS,
    decode_attention_combine,
)
from lmforge.compiler.ops import PagedRows
from lmforge.errors import LmforgeError


@triton.jit
def attend_pool(acc, denom, top, q, query_pos, lo, hi, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                table_base, block_size, window, scale, softcap, dims, dim_ok,
                BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Fold the keys at positions lo..hi of one request, gathered from the pool through its
    block table, into the running softmax state of the rows of `q` (at `query_pos`,
    (rows, 1))."""
    for block_start in range(lo, hi, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N)
        in_range = positions < hi
        blocks = tl.load(table_base + positions // block_size, mask=in_range, other=0)
        slots = blocks * block_size + positions % block_size
        tile = in_range[:, None] & dim_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + dims[None, :] * stride_kd, mask=tile, other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + dims[None, :] * stride_vd, mask=tile, other=0.0)
        key_pos = positions[None, :]
        ok = in_range[None, :] & visible(query_pos, key_pos, key_pos <= query_pos, 0, window, 0)
        acc, denom, top = fold_block(acc, denom, top, q, k.to(q.dtype), v.to(q.dtype), ok, scale, softcap,
                                     HAS_SOFTCAP)
    return acc, denom, top


@triton.jit
def paged_attention_kernel(
    q_ptr, new_k_ptr, new_v_ptr, k_pool_ptr, v_pool_ptr, tables_ptr, spans_ptr, items_ptr,
    partial_out_ptr, partial_lse_ptr, out_ptr,
    stride_qh, stride_qt, stride_qd,
    stride_nkh, stride_nks, stride_nkd,
    stride_nvh, stride_nvs, stride_nvd,
    stride_kh, stride_ks, stride_kd,
    stride_vh, stride_vs, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_tr,
    heads, group, head_dim, block_size, window, splits,
    scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    """One program per (item, KV head, split). An item (`items_ptr`: request, first token
    within it) is up to BLOCK_M query tokens; its rows are token x group member (BLOCK_G
    members, `group` real). A request's span (`spans_ptr`) is the row of its first query
    token in q, its first position and its token count. The keys the item's queries can see
    run from its first query's window to its last query; a split takes its share of them.
    With SINGLE_SPLIT the output is the answer; else each row's output normalised within
    the split and its log-sum-exp go to the partial buffers for the combine stage."""
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    request = tl.load(items_ptr + 2 * item)
    offset = tl.load(items_ptr + 2 * item + 1)
    query_begin = tl.load(spans_ptr + 3 * request)
    start = tl.load(spans_ptr + 3 * request + 1)
    count = tl.load(spans_ptr + 3 * request + 2)
    table_base = tables_ptr + request * stride_tr
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    new_k_base = new_k_ptr + kv_head * stride_nkh + query_begin * stride_nks
    new_v_base = new_v_ptr + kv_head * stride_nvh + query_begin * stride_nvs
    k_base = k_pool_ptr + kv_head * stride_kh
    v_base = v_pool_ptr + kv_head * stride_vh
    if split == 0:
        tokens = offset + tl.arange(0, BLOCK_M)
        token_ok = tokens < count
        positions = start + tokens
        blocks = tl.load(table_base + positions // block_size, mask=token_ok, other=0)
        slots = blocks * block_size + positions % block_size
        tile = token_ok[:, None] & dim_ok[None, :]
        new_k = tl.load(new_k_base + tokens[:, None] * stride_nks + dims[None, :] * stride_nkd, mask=tile, other=0.0)
        new_v = tl.load(new_v_base + tokens[:, None] * stride_nvs + dims[None, :] * stride_nvd, mask=tile, other=0.0)
        tl.store(k_base + slots[:, None] * stride_ks + dims[None, :] * stride_kd,
                 new_k.to(k_pool_ptr.dtype.element_ty), mask=tile)
        tl.store(v_base + slots[:, None] * stride_vs + dims[None, :] * stride_vd,
                 new_v.to(v_pool_ptr.dtype.element_ty), mask=tile)

    rows = tl.arange(0, BLOCK_M * BLOCK_G)
    token = offset + rows // BLOCK_G
    member = rows % BLOCK_G
    row_ok = (token < count) & (member < group)
    head = kv_head * group + member
    q = tl.load(q_ptr + head[:, None] * stride_qh + (query_begin + token)[:, None] * stride_qt
                + dims[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    query_pos = (start + token)[:, None]

    last = start + tl.minimum(offset + BLOCK_M, count)
    first = tl.maximum(start + offset - window + 1, 0)
    per_split = tl.cdiv(last - first, splits)
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, last)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_M * BLOCK_G], dtype=tl.float32)
    top = tl.full([BLOCK_M * BLOCK_G], EMPTY_TOP, dtype=tl.float32)
    acc, denom, top = attend_pool(acc, denom, top, q, query_pos, lo, tl.minimum(hi, start),
                                  k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                  table_base, block_size, window, scale, softcap, dims, dim_ok, BLOCK_N, HAS_SOFTCAP)
    acc, denom, top = attend_keys(
        acc, denom, top, q, query_pos, 0, tl.maximum(lo, start), hi,
        new_k_base, new_v_base, stride_nks, stride_nkd, stride_nvs, stride_nvd, start,
        q_ptr, 0, q_ptr, 1, 0, 0, window, 0, scale, softcap, dims, dim_ok,
        BLOCK_N, False, False, HAS_SOFTCAP,
    )
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tile = row_ok[:, None] & dim_ok[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptr + (query_begin + token)[:, None] * stride_ot + head[:, None] * stride_oh
                 + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=tile)
    else:
        lse = tl.where(denom > 0, top + tl.log(tl.where(denom > 0, denom, 1.0)), float("-inf"))
        slot = ((query_begin + token) * heads + head) * splits + split
        tl.store(partial_out_ptr + slot[:, None] * head_dim + dims[None, :], out, mask=tile)
        tl.store(partial_lse_ptr + slot, lse, mask=row_ok)


def launch_config(group: int, head_dim: int, element_size: int, decode: bool) -> dict[str, int]:
    """BLOCK_M, BLOCK_G, BLOCK_N, BLOCK_D and num_warps, for the launcher and `aot_specs`
    alike. A decode step's items are one token: the group's heads padded to the 16 rows
    `tl.dot` needs, as the decode kernel's tiles. A step with prompt chunks takes up to 64
    rows of tokens x heads in fp16/bf16, and in fp32 (whose products run on FMA units and
    hold more in registers) 32 at head_dim 64 and 16 from 128; at least one token's heads.
    Keys: 64 a block in half precision, 32 in fp32 (16 for chunk tiles from head_dim 128).
    Warps, each a count that compiled without spills for sm_80 and sm_90 at head_dim 64 and
    128, 1-8 query heads per KV head, soft-capped or not (Triton 3.9): half-precision decode
    4, chunks 8 (4 spilled 20 B on sm_80 at head_dim 64, soft-capped); fp32 8, but 4 for decode
    tiles from head_dim 128 (4 spilled 20-32 B on sm_90 at 64; 32-row chunk tiles at 128
    spilled on 4, 8 and 16 warps)."""
    block_d = triton.next_power_of_2(head_dim)
    half = element_size <= 2
    block_g = triton.next_power_of_2(group)
    if decode:
        block_m, block_g = 1, max(16, block_g)
    else:
        block_m = max(1, (64 if half else 32 if block_d <= 64 else 16) // block_g)
        block_g = max(block_g, 16 // block_m)
    block_n = 64 if half else (32 if decode or block_d < 128 else 16)
    if half:
        num_warps = 4 if decode else 8
    else:
        num_warps = 4 if decode and block_d >= 128 else 8
    return {"BLOCK_M": block_m, "BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps}


def split_count(items_times_heads: int, longest: int) -> int:
    """Key splits of a decode step: enough programs to fill a GPU (TARGET_PROGRAMS), none
    with fewer than MIN_KEYS_PER_SPLIT keys of the longest request, at most MAX_SPLITS (the
    rule of `decode_attention`)."""
    by_occupancy = triton.cdiv(TARGET_PROGRAMS, items_times_heads)
    by_length = triton.cdiv(longest, MIN_KEYS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def _work(rows: PagedRows, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(spans (R, 3), items (I, 2)) int32 from the step's pieces: each request's first query
    row, first position and token count; each item's request and first token."""
    items = [(request, offset) for request, (_, _, count) in enumerate(rows.pieces)
             for offset in range(0, count, block_m)]
    spans = torch.tensor(rows.pieces, dtype=torch.int32, device=device).reshape(-1, 3)
    return spans, torch.tensor(items, dtype=torch.int32, device=device).reshape(-1, 2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    rows: PagedRows,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q (1, Hq, T, D), k and v (1, Hkv, T, D): the step's tokens of every request in one row,
    laid out by `rows` (`runtime.paged.paged_rows`: block tables, block size, and per request
    its first query row, first position and count). Writes k and v into the pools
    (1, Hkv, slots, D) at their positions' slots and returns (1, T, Hq, D), like
    `aten.paged.paged_attention`. `window` <= 0: no window; `softcap` <= 0: none."""
    if rows.block_tables is None or rows.block_size < 1 or not rows.pieces:
        raise LmforgeError("paged attention on the triton backend needs the step's block tables, block size and "
                           "pieces (runtime.paged.paged_rows builds them)")
    if q.shape[0] != 1 or k.shape[2] != q.shape[2] or sum(count for _, _, count in rows.pieces) != q.shape[2]:
        raise LmforgeError(f"a paged step is one row of every request's tokens: q {tuple(q.shape)}, k "
                           f"{tuple(k.shape)} and the pieces' {sum(c for _, _, c in rows.pieces)} tokens disagree")
    _, heads, tokens, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    decode = all(count == 1 for _, _, count in rows.pieces)
    config = launch_config(group, head_dim, q.element_size(), decode)
    spans, items = _work(rows, config["BLOCK_M"], q.device)
    longest = max(start + count for _, start, count in rows.pieces)
    scanned = min(longest, window) if window > 0 else longest
    splits = split_count(items.shape[0] * kv_heads, scanned) if decode else 1
    out = torch.empty(1, tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    partial_out = torch.empty(tokens, heads, splits if splits > 1 else 0, head_dim, dtype=torch.float32,
                              device=q.device)
    partial_lse = torch.empty(tokens, heads, splits if splits > 1 else 0, dtype=torch.float32, device=q.device)
    tables = rows.block_tables
    paged_attention_kernel[(items.shape[0], kv_heads, splits)](
        q, k, v, key_pool, value_pool, tables, spans, items, partial_out, partial_lse, out,
        q.stride(1), q.stride(2), q.stride(3), k.stride(1), k.stride(2), k.stride(3),
        v.stride(1), v.stride(2), v.stride(3), key_pool.stride(1), key_pool.stride(2), key_pool.stride(3),
        value_pool.stride(1), value_pool.stride(2), value_pool.stride(3), out.stride(1), out.stride(2), out.stride(3),
        tables.stride(0), heads, group, head_dim, rows.block_size, window if window > 0 else NO_WINDOW, splits,
        scale, softcap,
        BLOCK_M=config["BLOCK_M"], BLOCK_G=config["BLOCK_G"], BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"],
        HAS_SOFTCAP=softcap > 0.0, SINGLE_SPLIT=splits == 1, num_warps=config["num_warps"],
    )
    if splits > 1:
        decode_attention_combine[(tokens, heads)](
            partial_out, partial_lse, out, out.stride(1), out.stride(2), out.stride(3), heads, head_dim, splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=config["BLOCK_D"],
        )
    return out


def aot_specs(head_dim: int, group: int, dtype: torch.dtype, softcap: bool = False,
              decode: bool = True) -> list[tuple[object, dict, dict, int]]:
    """Example (kernel, signature, constexprs, num_warps) sets for ahead-of-time compiles of a
    paged step at these shapes, as the launcher picks them: a decode step's split kernel
    (its combine stage is the decode kernel's, compiled with it), or with `decode` False a
    step with prompt chunks, one split."""
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    config = launch_config(group, head_dim, torch.empty((), dtype=dtype).element_size(), decode)
    signature = {
        "q_ptr": f"*{element}", "new_k_ptr": f"*{element}", "new_v_ptr": f"*{element}",
        "k_pool_ptr": f"*{element}", "v_pool_ptr": f"*{element}",
        "tables_ptr": "*i32", "spans_ptr": "*i32", "items_ptr": "*i32",
        "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "out_ptr": f"*{element}",
        **{f"stride_{tensor}{axis}": "i32" for tensor, axes in
           (("q", "htd"), ("nk", "hsd"), ("nv", "hsd"), ("k", "hsd"), ("v", "hsd"), ("o", "thd"), ("t", "r"))
           for axis in axes},
        **dict.fromkeys(("heads", "group", "head_dim", "block_size", "window", "splits"), "i32"),
        "scale": "fp32", "softcap": "fp32",
    }
    constexprs = {name: config[name] for name in ("BLOCK_M", "BLOCK_G", "BLOCK_N", "BLOCK_D")}
    constexprs.update(HAS_SOFTCAP=softcap, SINGLE_SPLIT=not decode, **NEW_UNIT_STRIDES)
    return [(paged_attention_kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
             config["num_warps"])]
