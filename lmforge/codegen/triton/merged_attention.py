"""`merged_attention` (MiniCache) on the `triton` backend: attention over a merged cache that
restores the earlier tokens' keys and values as it reads them.

A merged slot stores, per token and KV head, one unit direction for a pair of layers and
each layer's norms (`kv_layout.MergedSlot`); a layer's key is its direction times its own
norm, or the exact key when the token-head was retained. `kv_layout.restore` materialises
all of them in PyTorch before attending: it writes a full (B, H, start, D) copy of the keys
and of the values and the attention reads the copies back, three passes over the context
per layer and step. Here the kernel loads the direction, the norm and the retained row of
each key block and multiplies them in registers, so the context is read once, which is what
memory-bound decoding pays for; a restore kernel feeding the flash kernels would have moved
three times the bytes per restored token (read direction, write key, read key).

Split-K as in `decode_attention.py`: for one query per row, the earlier tokens are divided
among `splits` programs per (row, KV head), each writing a partial output and its
log-sum-exp, which `decode_attention_combine` reduces; a forward of several tokens (a
chunked prefill) uses one split and as many programs as its query rows need. A program's
rows are (token, query head) pairs of one KV head, so all query heads of a group share each
key and value block (GQA). This forward's own keys and values are exact and come from the
op's inputs; the slot is written afterwards, by `kv_layout.merge_into` at member 1 (a
SLERP of the pair plus a running count of retained rows: a scan over tokens, not a
pointwise or row kernel, and once per forward for two layers).
"""

import torch
import triton
import triton.language as tl

from lmforge.codegen.triton.attention_core import EMPTY_TOP, NO_WINDOW, fold_block, visible
from lmforge.codegen.triton.decode_attention import _split_count, decode_attention_combine
from lmforge.codegen.triton.prefill_attention import prefill_attention
from lmforge.compiler.kv_layout import MergedSlot, merge_into
from lmforge.compiler.ops import AttentionContext, current_context
from lmforge.errors import LmforgeError


@triton.jit
def restored_block(direction_base, norms_base, kept_base, slots, in_range, kept, index, norm_column,
                   stride_ds, stride_dd, stride_ns, stride_nm, stride_rr, stride_rm, member, dims, dim_ok):
    """A block of one layer's keys (or values) from a merged slot: direction x the member's
    norm (rounded to the cache's dtype, as `kv_layout.restore` computes it), or the exact
    retained row where the token-head was retained."""
    merged = in_range & (index < 0)
    direction = tl.load(direction_base + slots[:, None] * stride_ds + dims[None, :] * stride_dd,
                        mask=merged[:, None] & dim_ok[None, :], other=0.0)
    norm = tl.load(norms_base + slots * stride_ns + norm_column * stride_nm, mask=merged, other=0.0)
    restored = (direction.to(tl.float32) * norm.to(tl.float32)[:, None]).to(direction.dtype)
    exact = tl.load(kept_base + index[:, None] * stride_rr + member * stride_rm + dims[None, :],
                    mask=kept[:, None] & dim_ok[None, :], other=0.0)
    return tl.where(kept[:, None], exact, restored)


@triton.jit
def merged_attention_kernel(
    q_ptr, new_k_ptr, new_v_ptr, direction_k_ptr, direction_v_ptr, norms_ptr, index_ptr, kept_k_ptr, kept_v_ptr,
    pad_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_nkb, stride_nkh, stride_nkt, stride_nkd,
    stride_nvb, stride_nvh, stride_nvt, stride_nvd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_nb, stride_nh, stride_ns, stride_nm,
    stride_ib, stride_ih, stride_is,
    stride_rb, stride_rh, stride_rr, stride_rm,
    stride_ob, stride_ot, stride_oh, stride_od,
    member, start, q_len, scan_begin, window, group, head_dim, splits,
    scale, softcap,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    """One program per (row, KV head, block of query rows x split). Rows are (token, query
    head of the group) pairs; the program folds the split's share of the earlier tokens
    (restored from the merged slot) and, in the last split, this forward's own tokens up to
    the block's last query. With one split the output is final; otherwise it is a partial
    output and log-sum-exp for `decode_attention_combine` (one query per row only).
    The retained rows' head dimension is innermost and contiguous, as `MergedSlot.allocate`
    makes it (the launcher checks)."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    row_block = tl.program_id(2) // splits
    split = tl.program_id(2) % splits
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < q_len * group
    tokens = rows // group
    heads = kv_head * group + rows % group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + tokens[:, None] * stride_qt
                + dims[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    first_real = 0
    if HAS_PAD:
        first_real = tl.load(pad_ptr + row)
    query_pos = (start + tokens)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_R], dtype=tl.float32)
    top = tl.full([BLOCK_R], EMPTY_TOP, dtype=tl.float32)
    # earlier tokens before the row's first real one, or out of every query's window, are never seen
    begin = tl.minimum(tl.maximum(scan_begin, first_real), start)
    per_split = tl.cdiv(start - begin, splits)
    lo = begin + split * per_split
    hi = tl.minimum(lo + per_split, start)
    direction_offset = row * stride_db + kv_head * stride_dh
    norms_base = norms_ptr + row * stride_nb + kv_head * stride_nh
    index_base = index_ptr + row * stride_ib + kv_head * stride_ih
    kept_offset = row * stride_rb + kv_head * stride_rh
    for block_start in range(lo, hi, BLOCK_N):
        slots = block_start + tl.arange(0, BLOCK_N)
        in_range = slots < hi
        index = tl.load(index_base + slots * stride_is, mask=in_range, other=-1)
        kept = in_range & (index >= 0)
        k = restored_block(direction_k_ptr + direction_offset, norms_base, kept_k_ptr + kept_offset, slots, in_range,
                           kept, index, member, stride_ds, stride_dd, stride_ns, stride_nm, stride_rr, stride_rm,
                           member, dims, dim_ok).to(q.dtype)
        v = restored_block(direction_v_ptr + direction_offset, norms_base, kept_v_ptr + kept_offset, slots, in_range,
                           kept, index, 2 + member, stride_ds, stride_dd, stride_ns, stride_nm, stride_rr, stride_rm,
                           member, dims, dim_ok).to(q.dtype)
        key_pos = slots[None, :]
        ok = in_range[None, :] & visible(query_pos, key_pos, key_pos <= query_pos, first_real, window, 0)
        acc, denom, top = fold_block(acc, denom, top, q, k, v, ok, scale, softcap, HAS_SOFTCAP)
    if split == splits - 1:
        new_k_base = new_k_ptr + row * stride_nkb + kv_head * stride_nkh
        new_v_base = new_v_ptr + row * stride_nvb + kv_head * stride_nvh
        last_row = tl.minimum(row_block * BLOCK_R + BLOCK_R, q_len * group) - 1
        seen = last_row // group + 1  # causal: no query of the block sees a later token
        for block_start in range(0, seen, BLOCK_N):
            new_tokens = block_start + tl.arange(0, BLOCK_N)
            in_range = new_tokens < seen
            mask = in_range[:, None] & dim_ok[None, :]
            k = tl.load(new_k_base + new_tokens[:, None] * stride_nkt + dims[None, :] * stride_nkd, mask=mask,
                        other=0.0).to(q.dtype)
            v = tl.load(new_v_base + new_tokens[:, None] * stride_nvt + dims[None, :] * stride_nvd, mask=mask,
                        other=0.0).to(q.dtype)
            key_pos = (start + new_tokens)[None, :]
            ok = in_range[None, :] & visible(query_pos, key_pos, key_pos <= query_pos, first_real, window, 0)
            acc, denom, top = fold_block(acc, denom, top, q, k, v, ok, scale, softcap, HAS_SOFTCAP)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(out_ptr + row * stride_ob + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
                 + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        lse = tl.where(denom > 0, top + tl.log(denom), float("-inf"))
        part = (row * group * tl.num_programs(1) + heads) * splits + split
        tl.store(partial_out_ptr + part[:, None] * head_dim + dims[None, :], out,
                 mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(partial_lse_ptr + part, lse, mask=row_ok)


def _block_sizes(rows: int, head_dim: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_D, num_warps): query rows padded to the 16 `tl.dot` needs, up
    to 32 (16 in fp32), 32 keys per block (16 in fp32), head_dim padded to a power of two.
    Each restored block holds a direction, an exact row and the result for keys and for
    values: at head_dim 128 on sm_80, 64 fp16 rows spilled 284 bytes a thread with 4 warps.
    fp32 takes 8 warps except at head_dim 64: on sm_80, 4 warps spilled at head_dim 32 and
    128, and 8 spilled at 64 (ptxas kept those to 128 registers)."""
    block_r = min(16 if element_size > 2 else 32, max(16, triton.next_power_of_2(rows)))
    block_d = triton.next_power_of_2(head_dim)
    return block_r, 16 if element_size > 2 else 32, block_d, 8 if element_size > 2 and block_d != 64 else 4


def merged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: MergedSlot, member: int, start: int,
                     scale: float, window: int = 0, softcap: float = 0.0,
                     pad: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, Hq, T, D) at positions start.. over `member`'s keys and values of
    positions 0..start restored from `slot` and this forward's own k, v (B, Hkv, T, D).
    `window` <= 0: no window; `pad` (B,) int32: each row's first real position. Returns
    (B, T, Hq, D), contiguous (the attention ops' output layout)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if slot.direction_k.stride() != slot.direction_v.stride() or slot.retained_k.stride() != slot.retained_v.stride():
        raise LmforgeError("merged attention reads keys and values with one set of strides; this slot's differ")
    if slot.retained_k.stride(-1) != 1:
        raise LmforgeError("merged attention needs the retained rows' head dimension contiguous")
    block_r, block_n, block_d, num_warps = _block_sizes(q_len * group, head_dim, q.element_size())
    scan_begin = max(0, start - window + 1) if window > 0 else 0
    splits = _split_count(batch * kv_heads, start - scan_begin) if q_len == 1 else 1
    row_blocks = triton.cdiv(q_len * group, block_r)
    out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device)
    partial_out = torch.empty(batch, heads, splits if splits > 1 else 0, head_dim, dtype=torch.float32,
                              device=q.device)
    partial_lse = torch.empty(batch, heads, splits if splits > 1 else 0, dtype=torch.float32, device=q.device)
    merged_attention_kernel[(batch, kv_heads, row_blocks * splits)](
        q, k, v, slot.direction_k, slot.direction_v, slot.norms, slot.retained_index, slot.retained_k, slot.retained_v,
        pad if pad is not None else q, out, partial_out, partial_lse,
        *q.stride(), *k.stride(), *v.stride(), *slot.direction_k.stride(), *slot.norms.stride(),
        *slot.retained_index.stride(), *slot.retained_k.stride()[:4], *out.stride(),
        member, start, q_len, scan_begin, window if window > 0 else NO_WINDOW, group, head_dim, splits,
        scale, softcap,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_PAD=pad is not None, HAS_SOFTCAP=softcap > 0.0, SINGLE_SPLIT=splits == 1, num_warps=num_warps,
    )
    if splits > 1:
        decode_attention_combine[(batch, heads)](
            partial_out, partial_lse, out, out.stride(0), out.stride(2), out.stride(3), heads, head_dim, splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )
    return out


def _pad(ctx: AttentionContext) -> torch.Tensor | None:
    """Each row's first real position as the int32 the kernels read, once per forward (the
    same cache entry the other attention ops on this backend use)."""
    if ctx.pad is None:
        return None
    return ctx.cached("triton_pad", lambda: ctx.pad.to(torch.int32).contiguous())


def triton_merged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_index: int, member: int,
                            t: float, retain_threshold: float, scale: float, window: int,
                            softcap: float) -> torch.Tensor:
    """`merged_attention`: a forward from slot 0 (or without a cache) is plain flash
    attention over its own keys; a later one reads the merged slot through the kernel. With
    a cache, member 0 stages its keys and values in the slot and member 1 merges both."""
    ctx = current_context()
    if ctx.tree is not None:
        raise LmforgeError("merged caches do not verify draft trees (kv_share merge refuses drafting programs)")
    if ctx.kv is None or ctx.start == 0:
        out = prefill_attention(q, k, v, 0, scale, window, softcap, pad=_pad(ctx)).transpose(1, 2).contiguous()
    else:
        out = merged_attention(q, k, v, ctx.kv[cache_index], member, ctx.start, scale, window, softcap, _pad(ctx))
    if ctx.kv is not None:
        slot = ctx.kv[cache_index]
        if member == 0:
            slot.staged_k, slot.staged_v = k, v
        else:
            merge_into(slot, ctx.start, (slot.staged_k, k), (slot.staged_v, v), t, retain_threshold)
            slot.staged_k = slot.staged_v = None
    return out


def aot_specs(head_dim: int, group: int, dtype: torch.dtype) -> list[tuple[object, dict, dict, int]]:
    """Example (kernel, signature, constexprs, num_warps) sets for ahead-of-time compiles,
    as the launcher picks them at these shapes for one decoded token per row (split, so
    partial outputs; `q_len` 1, which Triton's JIT makes a constant) and for a chunk of
    several tokens (the largest row block, one split), both over padded rows."""
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    pointers = {"index_ptr": "*i32", "pad_ptr": "*i32", "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32"}
    signature = {name: pointers.get(name, f"*{element}") if name.endswith("_ptr")
                 else "fp32" if name in ("scale", "softcap") else "constexpr" if name.isupper() else "i32"
                 for name in merged_attention_kernel.arg_names}
    entries = []
    for rows, single in ((group, False), (1 << 16, True)):
        block_r, block_n, block_d, num_warps = _block_sizes(rows, head_dim,
                                                            torch.empty((), dtype=dtype).element_size())
        constexprs = {"BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_D": block_d, "HAS_PAD": True,
                      "HAS_SOFTCAP": False, "SINGLE_SPLIT": single}
        entries.append((merged_attention_kernel, signature, constexprs, num_warps))
    return entries
