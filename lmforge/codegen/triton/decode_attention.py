"""Split-K ("flash-decoding") attention for one query token per row, read straight from the
runtime's `(batch, kv_heads, max_len, head_dim)` cache.

Decoding has one query per row, so a kernel that parallelises over queries has only
batch x heads programs and leaves most of a GPU idle while each walks the whole context.
Splitting the keys of each row into `splits` ranges gives batch x kv_heads x splits
programs; each writes its partial output and log-sum-exp, and a second kernel combines the
splits exactly (softmax is associative once each part carries its log-sum-exp). When one
split is enough (a short context, or rows x KV heads that already fill the GPU), stage 1
writes the answer itself: one launch instead of two.

One stage-1 program serves all query heads of its KV head (grouped-query attention): the
heads' queries are the rows of one tile, so each key and value block is loaded once for
the whole group instead of once per query head. Decode attention is bound by memory
traffic, so reading K/V once per group is the saving that matters; the rows also give
`tl.dot` the 16 rows tensor cores need.

Given the step's new key and value, stage 1 also writes them into the cache at slot
`query_pos`: the one program whose split holds that slot stores them (once per row and KV
head) and reads them from the new tensors, not back from the cache, so a decode step has no
separate cache-copy launches. Every other program reads only older slots, which nobody
writes during the launch.

A step captured in a CUDA graph replays its launches with the arguments of the capture, so
nothing that changes from step to step may be a launch argument. The query's position can
therefore be given as a tensor (the forward's cache slots, `AttentionContext.slots`) that
stage 1 reads on the device; the range each split scans is computed in the kernel from it,
and the number of splits, which sets the grid, is then fixed by the cache's size instead of
the current length. A split that starts past the current length scans nothing and reports
an empty result (log-sum-exp -inf), which the combine stage gives no weight. Eager launches
keep choosing the split count from the length.
"""

import torch
import triton
import triton.language as tl

from lmforge.codegen.triton.attention_core import (
    EMPTY_TOP,
    NEW_UNIT_STRIDES,
    NO_WINDOW,
    attend_range,
    load_query_group,
    new_arguments,
    position_arguments,
    write_new,
)
from lmforge.errors import LmforgeError

TARGET_PROGRAMS = 128
"""Stage-1 programs to aim for: about one per streaming multiprocessor of a current GPU."""
MIN_KEYS_PER_SPLIT = 256
"""Below this many keys a split costs more in launch and combine than it saves."""
MAX_SPLITS = 16


@triton.jit
def decode_attention_partial(
    q_ptr, k_ptr, v_ptr, new_k_ptr, new_v_ptr, pad_ptr, positions_ptr, partial_out_ptr, partial_lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_qd, stride_ob, stride_oh, stride_od,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_nkb, stride_nkh, stride_nks, stride_nkd,
    stride_nvb, stride_nvh, stride_nvs, stride_nvd,
    stride_pb, stride_ph, stride_ps,
    num_slots, query_pos, start_ptr, window, sink, group, head_dim, splits,
    scale, softcap,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    HAS_NEW: tl.constexpr, START_ON_DEVICE: tl.constexpr,
):
    """Stage 1, one program per (row, KV head, split): attention of the group's query heads
    over the split's share of the slots the query can see, as an fp32 output normalised
    within the split and its log-sum-exp (-inf for a split with no visible key, or none at
    all: a split past the current length). With a single split that output is already the
    answer: it goes straight to `out_ptr`, and stage 2 is not launched. The query is at
    `query_pos`, or with `START_ON_DEVICE` at the position `start_ptr` holds. Slots are
    positions (0..query_pos are scanned, from the window's first key when there are no
    sinks), or with `HAS_POSITIONS` all `num_slots` slots are scanned. With `HAS_NEW`
    (slots are positions), the program whose split holds slot `query_pos` writes the step's
    key and value there and attends to them from the new tensors."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q, heads, row_ok, dims, dim_ok = load_query_group(q_ptr, stride_qb, stride_qh, stride_qd, row, kv_head, group,
                                                      head_dim, BLOCK_H, BLOCK_D)
    first_real = 0
    if HAS_PAD:
        first_real = tl.load(pad_ptr + row)
    if START_ON_DEVICE:
        query_pos = tl.load(start_ptr).to(tl.int32)
    if HAS_POSITIONS:
        begin = 0
        length = num_slots
    else:
        # slots are positions: keys before the window are never seen (unless sinks keep the
        # first ones), and a row's padding is invisible to all but a padding query itself
        length = query_pos + 1
        scan_begin = tl.where(sink == 0, tl.maximum(query_pos - window + 1, 0), 0)
        begin = tl.minimum(tl.maximum(scan_begin, first_real), query_pos)
    per_split = tl.cdiv(length - begin, splits)
    lo = begin + split * per_split
    hi = tl.minimum(lo + per_split, length)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)
    top = tl.full([BLOCK_H], EMPTY_TOP, dtype=tl.float32)
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    new_k_base = new_k_ptr + row * stride_nkb + kv_head * stride_nkh
    new_v_base = new_v_ptr + row * stride_nvb + kv_head * stride_nvh
    if HAS_NEW:
        if (lo <= query_pos) & (query_pos < hi):
            token = tl.arange(0, 1)
            write_new(k_base, stride_ks, stride_kd, new_k_base, stride_nks, stride_nkd, query_pos, token, token < 1,
                      dims, dim_ok)
            write_new(v_base, stride_vs, stride_vd, new_v_base, stride_nvs, stride_nvd, query_pos, token, token < 1,
                      dims, dim_ok)
    acc, denom, top = attend_range(
        acc, denom, top, q, query_pos, 0, lo, hi,
        k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        new_k_base, new_v_base, stride_nks, stride_nkd, stride_nvs, stride_nvd, query_pos,
        positions_ptr + row * stride_pb + kv_head * stride_ph, stride_ps, q_ptr, 1, query_pos,
        first_real, window, sink, scale, softcap, dims, dim_ok,
        BLOCK_N, HAS_POSITIONS, False, HAS_SOFTCAP, HAS_NEW,
    )
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        lse = tl.where(denom > 0, top + tl.log(tl.where(denom > 0, denom, 1.0)), float("-inf"))
        slot = (row * group * tl.num_programs(1) + heads) * splits + split
        tl.store(partial_out_ptr + slot[:, None] * head_dim + dims[None, :], out,
                 mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(partial_lse_ptr + slot, lse, mask=row_ok)


@triton.jit
def decode_attention_combine(
    partial_out_ptr, partial_lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_od,
    heads, head_dim, splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Stage 2, one program per (row, query head): the splits' outputs weighted by
    exp(lse - max lse), which is the softmax over all the keys. An empty split (lse -inf)
    has weight 0 and its output is not read, so nothing it stored can reach the result."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    parts = tl.arange(0, BLOCK_S)
    part_ok = parts < splits
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    first = (row * heads + head) * splits
    lse = tl.load(partial_lse_ptr + first + parts, mask=part_ok, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))
    filled = part_ok & (lse > float("-inf"))
    partial = tl.load(partial_out_ptr + (first + parts[:, None]) * head_dim + dims[None, :],
                      mask=filled[:, None] & dim_ok[None, :], other=0.0)
    out = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def _block_sizes(group: int, head_dim: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, BLOCK_D, num_warps) for the launcher and `aot_specs` alike: the
    group's heads padded to the 16 rows `tl.dot` needs, 64 keys per block (32 in fp32, whose
    products run on FMA units, not tensor cores: at head_dim 128 on sm_80, 64 fp32 keys spill
    and 32 take 160 registers), head_dim padded to a power of two (masked, e.g. 80 -> 128);
    4 warps, but 8 for fp32 from head_dim 128 (4 spilled 608 B on sm_90)."""
    block_d = triton.next_power_of_2(head_dim)
    half = element_size <= 2
    num_warps = 8 if not half and block_d >= 128 else 4
    return max(16, triton.next_power_of_2(group)), 64 if half else 32, block_d, num_warps


def _split_count(rows_times_heads: int, scanned: int) -> int:
    """Splits for `scanned` keys: enough programs to fill the GPU, but none shorter than
    MIN_KEYS_PER_SPLIT keys (a launch's fixed split count takes the cache's size here).
    An empty batch gets one split: its grid has no programs, so nothing is launched."""
    by_occupancy = triton.cdiv(TARGET_PROGRAMS, max(1, rows_times_heads))
    by_length = triton.cdiv(scanned, MIN_KEYS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def _scanned(num_slots: int, query_pos: int | torch.Tensor, window: int, sink: int,
             key_positions: torch.Tensor | None) -> int:
    """Keys stage 1 scans, which sets the split count: every slot of a cache read by
    position or of a query whose position is on the device (the most a launch that does not
    know the step may face), else the ones up to the query, from its window's first."""
    if key_positions is not None or isinstance(query_pos, torch.Tensor):
        return num_slots
    return query_pos + 1 - (max(0, query_pos - window + 1) if window > 0 and sink == 0 else 0)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_pos: int | torch.Tensor,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    sink: int = 0,
    pad: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per row at position `query_pos` over a cache.

    `query_pos` is an int, or an integer tensor whose first element the kernel reads on the
    device (the forward's cache slots, `AttentionContext.slots`): then no launch argument
    depends on the step, and the split count is the one for a full cache, as a CUDA graph
    needs. q: (B, Hq, 1, D); k_cache, v_cache: (B, Hkv, S, D), any strides. Without
    `key_positions`, slot i holds position i and slots 0..query_pos are read: the query's
    own key must already be written, or be given as `new_keys` and `new_values`
    ((B, Hkv, 1, D), any strides), which the kernel writes into the cache at slot
    `query_pos` (S must exceed it). With `key_positions` (B, S) or (B, Hkv, S) int32
    (-1: empty slot), all S slots are read and the rule is applied to their positions.
    `window` <= 0 means no window; `sink` keeps each row's first real tokens visible;
    `pad` (B,) gives each row's first real position. Returns (B, Hq, 1, D), a view of a
    contiguous (B, 1, Hq, D) tensor (the attention ops' output layout)."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    block_h, block_n, block_d, num_warps = _block_sizes(group, head_dim, q.element_size())
    positions, position_strides = position_arguments(key_positions, q)
    new_k, new_v, new_k_strides, new_v_strides = new_arguments(new_keys, new_values, q)
    has_new = new_keys is not None
    on_device = isinstance(query_pos, torch.Tensor)
    if has_new and key_positions is not None:
        raise LmforgeError("decode attention writes new keys only into a dense cache (slot = position); a "
                           "streaming head's ring is written by RingSlot.write")
    if has_new and not on_device and query_pos >= k_cache.shape[2]:
        raise LmforgeError(f"decode attention writes the new key and value at slot {query_pos} of a dense cache; "
                           f"this cache has {k_cache.shape[2]} slots")
    splits = _split_count(batch * kv_heads, _scanned(k_cache.shape[2], query_pos, window, sink, key_positions))
    out = torch.empty(batch, 1, heads, head_dim, dtype=q.dtype, device=q.device)
    partial_out = torch.empty(batch, heads, splits if splits > 1 else 0, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(batch, heads, splits if splits > 1 else 0, dtype=torch.float32, device=q.device)
    decode_attention_partial[(batch, kv_heads, splits)](
        q, k_cache, v_cache, new_k, new_v, pad if pad is not None else q, positions, partial_out, partial_lse, out,
        q.stride(0), q.stride(1), q.stride(3), out.stride(0), out.stride(2), out.stride(3),
        *k_cache.stride(), *v_cache.stride(), *new_k_strides, *new_v_strides, *position_strides,
        k_cache.shape[2], 0 if on_device else query_pos, query_pos if on_device else q,
        window if window > 0 else NO_WINDOW, sink, group, head_dim, splits,
        scale, softcap,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_PAD=pad is not None, HAS_POSITIONS=key_positions is not None, HAS_SOFTCAP=softcap > 0.0,
        SINGLE_SPLIT=splits == 1, HAS_NEW=has_new, START_ON_DEVICE=on_device, num_warps=num_warps,
    )
    if splits == 1:
        return out.transpose(1, 2)
    decode_attention_combine[(batch, heads)](
        partial_out, partial_lse, out, out.stride(0), out.stride(2), out.stride(3), heads, head_dim, splits,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
    )
    return out.transpose(1, 2)


def aot_specs(head_dim: int, group: int, dtype: torch.dtype) -> list[tuple[object, dict, dict, int]]:
    """Example (kernel, signature, constexprs, num_warps) sets for ahead-of-time compiles of
    a plain decode step (no padding, positions or soft-cap; the step's key and value
    written by the kernel; its position a launch argument, as in an eager step: a step
    replayed from a CUDA graph loads it instead, the START_ON_DEVICE variant that
    `aot.launchable_attention_specs` derives from this entry) at these shapes: what the
    launcher would pick for `head_dim`, `group` query heads per KV head and `dtype`."""
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    block_h, block_n, block_d, num_warps = _block_sizes(group, head_dim,
                                                        torch.empty((), dtype=dtype).element_size())
    partial_signature = {
        "q_ptr": f"*{element}", "k_ptr": f"*{element}", "v_ptr": f"*{element}",
        "new_k_ptr": f"*{element}", "new_v_ptr": f"*{element}", "pad_ptr": "*i32",
        "positions_ptr": "*i32", "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "out_ptr": f"*{element}",
        **{f"stride_{tensor}{axis}": "i32" for tensor, axes in
           (("q", "bhd"), ("o", "bhd"), ("k", "bhsd"), ("v", "bhsd"), ("nk", "bhsd"), ("nv", "bhsd"), ("p", "bhs"))
           for axis in axes},
        "num_slots": "i32", "query_pos": "i32", "start_ptr": "*i64",
        **dict.fromkeys(("window", "sink", "group", "head_dim", "splits"), "i32"),
        "scale": "fp32", "softcap": "fp32",
    }
    partial_constexprs = {"BLOCK_H": block_h, "BLOCK_N": block_n, "BLOCK_D": block_d,
                          "HAS_PAD": False, "HAS_POSITIONS": False, "HAS_SOFTCAP": False, "SINGLE_SPLIT": False,
                          "HAS_NEW": True, "START_ON_DEVICE": False, **NEW_UNIT_STRIDES}
    combine_signature = {
        "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "out_ptr": f"*{element}",
        **{name: "i32" for name in ("stride_ob", "stride_oh", "stride_od", "heads", "head_dim", "splits")},
    }
    combine_constexprs = {"BLOCK_S": MAX_SPLITS, "BLOCK_D": block_d}
    return [
        (decode_attention_partial, {**partial_signature, **dict.fromkeys(partial_constexprs, "constexpr")},
         partial_constexprs, num_warps),
        (decode_attention_combine, {**combine_signature, **dict.fromkeys(combine_constexprs, "constexpr")},
         combine_constexprs, 4),
    ]
