"""What both attention kernels share: the one visibility rule and the online-softmax loop.

Every attention variant lmforge runs is a rule on (query position, key position): causal,
a sliding window, attention sinks, left padding and draft trees are all conditions on the
two positions and the row's first real position. Keys are addressed by cache slot; a cache
whose slot order is not the position order (a streaming ring, an evicting cache) hands the
kernels each slot's position (-1: empty), so the same rule and the same kernels serve it.
Keeping the rule in one `@triton.jit` function means decode and prefill cannot disagree
about what a query sees.
"""

import torch
import triton
import triton.language as tl

NO_WINDOW = 1 << 30
"""The window a launcher passes for "no window": larger than any position, small enough that
`query - window` stays within int32."""

EMPTY_TOP = tl.constexpr(-1.0e30)
"""Initial running maximum of the online softmax. Finite, so a block whose keys are all
masked (-inf scores) rescales by exp(-inf - EMPTY_TOP) = 0 instead of exp(-inf + inf) = NaN.
A `tl.constexpr`: a compiled kernel may read no other kind of global."""


def position_arguments(key_positions: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The positions tensor and its (row, KV head, slot) strides as the kernels take them:
    (B, S) positions shared by all KV heads get a head stride of 0; without positions, a
    placeholder pointer the kernel never reads (HAS_POSITIONS is False)."""
    if key_positions is None:
        return placeholder, (0, 0, 0)
    positions = key_positions if key_positions.dim() == 3 else key_positions[:, None]
    head_stride = positions.stride(1) if positions.shape[1] > 1 else 0
    return positions, (positions.stride(0), head_stride, positions.stride(2))


@triton.jit
def visible(query_pos, key_pos, causal, first_real, window, sink):
    """Whether a query sees a key: a real key (at or after the row's first real position)
    that `causal` allows and that is one of the row's first `sink` real tokens or within the
    last `window` positions; and always the query's own key, so a padding query, which
    would otherwise see nothing and turn NaN, sees itself (as `AttentionContext._build_mask`
    and `streaming_allowed` do). Empty slots (position -1) are never real."""
    recent = key_pos > query_pos - window
    sinks = (key_pos - first_real) < sink
    return ((key_pos >= first_real) & causal & (recent | sinks)) | (key_pos == query_pos)


@triton.jit
def soft_capped(scores, softcap):
    """`softcap * tanh(scores / softcap)`, with tanh from exp (saturates to ±1 for large
    arguments: exp overflows to inf and 2 / inf is 0)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))


@triton.jit
def attend_range(acc, denom, top, q, query_pos, query_row, lo, hi,
                 k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                 positions_base, stride_ps, tree_ptr, q_len, start,
                 first_real, window, sink, scale, softcap, dims, dim_ok,
                 BLOCK_N: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_TREE: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr):
    """Fold the keys of slots lo..hi into the running softmax state (acc, denom, top) of the
    rows of `q`. `query_pos` is each row's position (broadcastable to (rows, 1)); with a
    tree, `query_row` is each row's index in the (q_len, q_len) tree, which replaces the
    causal rule among the keys at positions start..start+q_len. Scores accumulate in fp32;
    probabilities are cast to the value dtype for the second product, as the reference does."""
    for block_start in range(lo, hi, BLOCK_N):
        slots = block_start + tl.arange(0, BLOCK_N)
        in_range = slots < hi
        k = tl.load(k_base + slots[:, None] * stride_ks + dims[None, :] * stride_kd,
                    mask=in_range[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + dims[None, :] * stride_vd,
                    mask=in_range[:, None] & dim_ok[None, :], other=0.0)
        if HAS_POSITIONS:
            key_pos = tl.load(positions_base + slots * stride_ps, mask=in_range, other=-1)[None, :]
        else:
            key_pos = slots[None, :]
        causal = key_pos <= query_pos
        if HAS_TREE:
            new = (key_pos >= start) & (key_pos < start + q_len) & (query_row < q_len)
            branch = tl.load(tree_ptr + query_row * q_len + (key_pos - start), mask=new, other=0)
            causal = tl.where(new, branch != 0, causal)
        ok = in_range[None, :] & visible(query_pos, key_pos, causal, first_real, window, sink)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if HAS_SOFTCAP:
            scores = soft_capped(scores, softcap)
        scores = tl.where(ok, scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        rescale = tl.exp(top - new_top)
        p = tl.exp(scores - new_top[:, None])
        denom = denom * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        top = new_top
    return acc, denom, top
