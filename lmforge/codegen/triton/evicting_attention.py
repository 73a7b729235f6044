"""`evicting_attention` on the `triton` backend: decode attention over an evicting cache
(`kv_layout.EvictingSlot`) that also returns the attention probability every kept entry
received, summed over the query heads of its KV head, which updates the eviction scores.

A running (online) softmax never holds the final probabilities, so the kernel walks the
kept entries twice: the first pass is the usual flash-decoding loop (output, maximum and
sum), the second recomputes each block's logits and writes exp(logit - max) / sum, summed
over the group's rows. The second pass reads only the keys, and the cache is small and
fixed (`capacity` entries per KV head, whatever the context), so one program per (row, KV
head) walks all of it; there is no split to combine. The step's own key and value are the
last entry, read from the op's inputs; `EvictingSlot.insert` then stores them over the
entry the scores choose (an argmin and a scatter per head).

The prefill is plain flash attention over the prompt; the prompt's importance
(`aten.evicting.prefill_importance`: the last `observe` queries' attention to each key)
stays in PyTorch, since it runs once per prompt, not per decoded token.
"""

import torch
import triton
import triton.language as tl

from lmforge.codegen.aten.evicting import prefill_importance
from lmforge.codegen.triton.attention_core import EMPTY_TOP, load_query_group, soft_capped
from lmforge.codegen.triton.prefill_attention import prefill_attention
from lmforge.compiler.kv_layout import EvictingSlot
from lmforge.compiler.ops import AttentionContext, current_context
from lmforge.errors import LmforgeError


@triton.jit
def entry_scores(q, k_base, stride_ks, stride_kd, new_k_base, stride_nkd, positions_base, stride_ps, entries,
                 capacity, dims, dim_ok, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """The group's fp32 scores for a block of entries: entry `capacity` is the step's own
    key, earlier ones the cache's; empty entries (position -1) and entries past the last
    score -inf."""
    cached = entries < capacity
    new = entries == capacity
    k = tl.load(k_base + entries[:, None] * stride_ks + dims[None, :] * stride_kd,
                mask=cached[:, None] & dim_ok[None, :], other=0.0)
    k = k + tl.load(new_k_base + entries[:, None] * 0 + dims[None, :] * stride_nkd,
                    mask=new[:, None] & dim_ok[None, :], other=0.0).to(k.dtype)
    position = tl.load(positions_base + entries * stride_ps, mask=cached, other=-1)
    valid = new | (position >= 0)
    scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale
    if HAS_SOFTCAP:
        scores = soft_capped(scores, softcap)
    return tl.where(valid[None, :], scores, float("-inf"))


@triton.jit
def evicting_decode_kernel(
    q_ptr, k_ptr, v_ptr, new_k_ptr, new_v_ptr, positions_ptr, out_ptr, attention_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_nkb, stride_nkh, stride_nkd,
    stride_nvb, stride_nvh, stride_nvd,
    stride_pb, stride_ph, stride_ps,
    stride_ob, stride_oh, stride_od,
    stride_ab, stride_ah, stride_as,
    capacity, group, head_dim, scale, softcap,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """One program per (row, KV head): the group's query heads over the `capacity` cached
    entries and the step's own key (entry `capacity`). Writes the output and, per entry,
    the probability summed over the group's heads (0 for empty entries)."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    q, heads, row_ok, dims, dim_ok = load_query_group(q_ptr, stride_qb, stride_qh, stride_qd, row, kv_head, group,
                                                      head_dim, BLOCK_H, BLOCK_D)
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    new_k_base = new_k_ptr + row * stride_nkb + kv_head * stride_nkh
    new_v_base = new_v_ptr + row * stride_nvb + kv_head * stride_nvh
    positions_base = positions_ptr + row * stride_pb + kv_head * stride_ph
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)
    top = tl.full([BLOCK_H], EMPTY_TOP, dtype=tl.float32)
    for block_start in range(0, capacity + 1, BLOCK_N):
        entries = block_start + tl.arange(0, BLOCK_N)
        scores = entry_scores(q, k_base, stride_ks, stride_kd, new_k_base, stride_nkd, positions_base,
                              stride_ps, entries, capacity, dims, dim_ok, scale, softcap, HAS_SOFTCAP)
        v = tl.load(v_base + entries[:, None] * stride_vs + dims[None, :] * stride_vd,
                    mask=(entries < capacity)[:, None] & dim_ok[None, :], other=0.0)
        v = (v + tl.load(new_v_base + entries[:, None] * 0 + dims[None, :] * stride_nvd,
                         mask=(entries == capacity)[:, None] & dim_ok[None, :], other=0.0).to(v.dtype)).to(q.dtype)
        new_top = tl.maximum(top, tl.max(scores, 1))
        rescale = tl.exp(top - new_top)
        p = tl.exp(scores - new_top[:, None])
        denom = denom * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        top = new_top
    out = acc / denom[:, None]
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    attention_base = attention_ptr + row * stride_ab + kv_head * stride_ah
    for block_start in range(0, capacity + 1, BLOCK_N):
        entries = block_start + tl.arange(0, BLOCK_N)
        scores = entry_scores(q, k_base, stride_ks, stride_kd, new_k_base, stride_nkd, positions_base,
                              stride_ps, entries, capacity, dims, dim_ok, scale, softcap, HAS_SOFTCAP)
        probabilities = tl.exp(scores - top[:, None]) / denom[:, None]
        summed = tl.sum(tl.where(row_ok[:, None], probabilities, 0.0), 0)
        tl.store(attention_base + entries * stride_as, summed, mask=entries <= capacity)


def _block_sizes(group: int, head_dim: int, element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, BLOCK_D, num_warps): the group's heads padded to the 16 rows
    `tl.dot` needs, 32 entries per block (16 in fp32), head_dim padded to a power of two,
    8 warps for fp32 from head_dim 128 (4 spilled on sm_80). Half the decode kernel's
    blocks: a block carries the cache's and the step's keys and values (the step's entry is
    merged in by mask), and at 64 fp16 entries, head_dim 128, sm_80 needed all 255
    registers and 135 KB of shared memory."""
    block_d = triton.next_power_of_2(head_dim)
    return (max(16, triton.next_power_of_2(group)), 32 if element_size <= 2 else 16, block_d,
            8 if element_size > 2 and block_d >= 128 else 4)


def evicting_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: EvictingSlot, scale: float,
                    softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step over an evicting cache. q (B, Hq, 1, D); k, v (B, Hkv, 1, D): the
    step's own key and value, seen after the `capacity` cached entries. Returns the output
    (B, 1, Hq, D), contiguous, and the fp32 attention (B, Hkv, capacity + 1) each entry got,
    summed over the query heads of its KV head (the step's own entry last), which is what
    `EvictingSlot.insert` takes."""
    batch, heads, _, head_dim = q.shape
    kv_heads, capacity = slot.keys.shape[1], slot.keys.shape[2]
    group = heads // kv_heads
    block_h, block_n, block_d, num_warps = _block_sizes(group, head_dim, q.element_size())
    positions = slot.slots.to(torch.int32)
    out = torch.empty(batch, 1, heads, head_dim, dtype=q.dtype, device=q.device)
    attention = torch.empty(batch, kv_heads, capacity + 1, dtype=torch.float32, device=q.device)
    evicting_decode_kernel[(batch, kv_heads)](
        q, slot.keys, slot.values, k, v, positions, out, attention,
        q.stride(0), q.stride(1), q.stride(3), *slot.keys.stride(), *slot.values.stride(),
        k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        *positions.stride(), out.stride(0), out.stride(2), out.stride(3), *attention.stride(),
        capacity, group, head_dim, scale, softcap,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, HAS_SOFTCAP=softcap > 0.0, num_warps=num_warps,
    )
    return out, attention


def _pad(ctx: AttentionContext) -> torch.Tensor | None:
    """Each row's first real position as int32, once per forward (shared with the other ops)."""
    if ctx.pad is None:
        return None
    return ctx.cached("triton_pad", lambda: ctx.pad.to(torch.int32).contiguous())


def triton_evicting_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_index: int, scale: float,
                              window: int, softcap: float) -> torch.Tensor:
    """`evicting_attention`: exact flash attention for a prefill or a cache-free forward
    (the prefill then fills the cache by importance); one decoded token per forward over
    the kept entries, whose scores take the attention they received."""
    ctx = current_context()
    if ctx.kv is None or ctx.start == 0:
        out = prefill_attention(q, k, v, 0, scale, window, softcap, pad=_pad(ctx)).transpose(1, 2).contiguous()
        if ctx.kv is not None:
            slot = ctx.kv[cache_index]
            slot.fill(k, v, prefill_importance(q, k, ctx.pad, scale, slot.observe, slot.decay))
        return out
    if q.shape[2] != 1:
        raise LmforgeError("kv_evict decodes one token per forward; speculative verification would evict tokens "
                           "for drafts that are then rejected")
    slot = ctx.kv[cache_index]
    out, attention = evicting_decode(q, k, v, slot, scale, softcap)
    slot.insert(k, v, ctx.start, attention)
    return out


def aot_specs(head_dim: int, group: int, dtype: torch.dtype) -> list[tuple[object, dict, dict, int]]:
    """The (kernel, signature, constexprs, num_warps) set for an ahead-of-time compile of a
    decode step over an evicting cache at these shapes, as the launcher picks it."""
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    block_h, block_n, block_d, num_warps = _block_sizes(group, head_dim, torch.empty((), dtype=dtype).element_size())
    pointers = {"positions_ptr": "*i32", "attention_ptr": "*fp32"}
    signature = {name: pointers.get(name, f"*{element}") if name.endswith("_ptr")
                 else "fp32" if name in ("scale", "softcap") else "constexpr" if name.isupper() else "i32"
                 for name in evicting_decode_kernel.arg_names}
    constexprs = {"BLOCK_H": block_h, "BLOCK_N": block_n, "BLOCK_D": block_d, "HAS_SOFTCAP": False}
    return [(evicting_decode_kernel, signature, constexprs, num_warps)]
