"""What the attention kernels share: the one visibility rule, the online-softmax loop and the
decode kernels' query-group load.

Every attention variant lmforge runs is a rule on (query position, key position): causal,
a sliding window, attention sinks, left padding and draft trees are all conditions on the
two positions and the row's first real position. Keys are addressed by cache slot; a cache
whose slot order is not the position order (a streaming ring, an evicting cache) hands the
kernels each slot's position (-1: empty), so the same rule and the same kernels serve it.
Keeping the rule in one `@triton.jit` function means decode and prefill cannot disagree
about what a query sees.

A forward's own keys and values need not be in the cache before the kernels run: with
`HAS_NEW`, slots from `new_begin` on are read from the forward's key and value tensors
instead (the launchers have the programs that own those slots write them into the cache
in the same launch), so a step launches no separate cache copies and never reads back
what it has just written.
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


NEW_UNIT_STRIDES = {"stride_nkd": 1, "stride_nvd": 1}
"""What Triton's JIT makes of the new keys' and values' innermost strides (contiguous head
dimensions): the constant 1. `aot_specs` pass them as such, as `codegen/aot.py` does for the
cache's and the query's."""


def position_arguments(key_positions: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The positions tensor and its (row, KV head, slot) strides as the kernels take them:
    (B, S) positions shared by all KV heads get a head stride of 0; without positions, a
    placeholder pointer the kernel never reads (HAS_POSITIONS is False)."""
    if key_positions is None:
        return placeholder, (0, 0, 0)
    positions = key_positions if key_positions.dim() == 3 else key_positions[:, None]
    head_stride = positions.stride(1) if positions.shape[1] > 1 else 0
    return positions, (positions.stride(0), head_stride, positions.stride(2))


def new_arguments(new_keys: torch.Tensor | None, new_values: torch.Tensor | None,
                  placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """A forward's own (B, Hkv, T, D) keys and values with their (row, KV head, token, dim)
    strides as the kernels take them; without them, placeholder pointers the kernel never
    reads (HAS_NEW is False)."""
    if new_keys is None or new_values is None:
        return placeholder, placeholder, (0, 0, 0, 0), (0, 0, 0, 0)
    return new_keys, new_values, new_keys.stride(), new_values.stride()


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
def load_query_group(q_ptr, stride_qb, stride_qh, stride_qd, row, kv_head, group, head_dim,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The one query token of `row` for every query head of `kv_head` (grouped-query
    attention), as the rows of a (BLOCK_H, BLOCK_D) tile, zero past the group and the head
    dimension; with the heads' indices, which rows are real, the dimension indices and
    which dimensions are real, for the caller's loads and stores. Decode kernels that read
    each key block once for the whole group start here."""
    rows = tl.arange(0, BLOCK_H)
    row_ok = rows < group
    heads = kv_head * group + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    return q, heads, row_ok, dims, dim_ok


@triton.jit
def soft_capped(scores, softcap):
    """`softcap * tanh(scores / softcap)`, with tanh from exp (saturates to ±1 for large
    arguments: exp overflows to inf and 2 / inf is 0)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))


@triton.jit
def write_new(cache_base, stride_s, stride_d, new_base, stride_ns, stride_nd, slot, tokens, token_ok,
              dims, dim_ok):
    """Store this forward's `tokens` (rows of its key or value tensor) at cache slots
    slot + token, cast to the cache's dtype (round to nearest even, as a torch copy does)."""
    mask = token_ok[:, None] & dim_ok[None, :]
    new = tl.load(new_base + tokens[:, None] * stride_ns + dims[None, :] * stride_nd, mask=mask, other=0.0)
    tl.store(cache_base + (slot + tokens)[:, None] * stride_s + dims[None, :] * stride_d,
             new.to(cache_base.dtype.element_ty), mask=mask)


@triton.jit
def fold_block(acc, denom, top, q, k, v, ok, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """One key block into the running softmax state (acc, denom, top) of the rows of `q`:
    scores in fp32, masked by `ok`, probabilities cast to the values' dtype for the second
    product (as the reference attention does)."""
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if HAS_SOFTCAP:
        scores = soft_capped(scores, softcap)
    scores = tl.where(ok, scores, float("-inf"))
    new_top = tl.maximum(top, tl.max(scores, 1))
    rescale = tl.exp(top - new_top)
    p = tl.exp(scores - new_top[:, None])
    denom = denom * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, denom, new_top


@triton.jit
def attend_keys(acc, denom, top, q, query_pos, query_row, lo, hi,
                k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, first_slot,
                positions_base, stride_ps, tree_ptr, q_len, start,
                first_real, window, sink, scale, softcap, dims, dim_ok,
                BLOCK_N: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_TREE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr):
    """Fold the keys of slots lo..hi, slot s at row s - first_slot of k_base and v_base
    (0 for a cache; the forward's first slot for its own keys), into the running softmax
    state (acc, denom, top) of the rows of `q`. `query_pos` is each row's position
    (broadcastable to (rows, 1)); with a tree, `query_row` is each row's index in the
    (q_len, q_len) tree, which replaces the causal rule among the keys at positions
    start..start+q_len. Keys and values are taken in the query's dtype (the cache's, which
    the reference attends over); scores accumulate in fp32; probabilities are cast to the
    value dtype for the second product, as the reference does."""
    for block_start in range(lo, hi, BLOCK_N):
        slots = block_start + tl.arange(0, BLOCK_N)
        in_range = slots < hi
        k = tl.load(k_base + (slots - first_slot)[:, None] * stride_ks + dims[None, :] * stride_kd,
                    mask=in_range[:, None] & dim_ok[None, :], other=0.0).to(q.dtype)
        v = tl.load(v_base + (slots - first_slot)[:, None] * stride_vs + dims[None, :] * stride_vd,
                    mask=in_range[:, None] & dim_ok[None, :], other=0.0).to(q.dtype)
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
        acc, denom, top = fold_block(acc, denom, top, q, k, v, ok, scale, softcap, HAS_SOFTCAP)
    return acc, denom, top


@triton.jit
def attend_range(acc, denom, top, q, query_pos, query_row, lo, hi,
                 k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                 new_k_base, new_v_base, stride_nks, stride_nkd, stride_nvs, stride_nvd, new_begin,
                 positions_base, stride_ps, tree_ptr, q_len, start,
                 first_real, window, sink, scale, softcap, dims, dim_ok,
                 BLOCK_N: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_TREE: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_NEW: tl.constexpr):
    """`attend_keys` over slots lo..hi of the cache; with `HAS_NEW`, the slots from
    `new_begin` on are read from the forward's own keys and values instead (two walks, so
    each tile is one plain load)."""
    if HAS_NEW:
        acc, denom, top = attend_keys(
            acc, denom, top, q, query_pos, query_row, lo, tl.minimum(hi, new_begin),
            k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, 0,
            positions_base, stride_ps, tree_ptr, q_len, start, first_real, window, sink, scale, softcap, dims, dim_ok,
            BLOCK_N, HAS_POSITIONS, HAS_TREE, HAS_SOFTCAP,
        )
        acc, denom, top = attend_keys(
            acc, denom, top, q, query_pos, query_row, tl.maximum(lo, new_begin), hi,
            new_k_base, new_v_base, stride_nks, stride_nkd, stride_nvs, stride_nvd, new_begin,
            positions_base, stride_ps, tree_ptr, q_len, start, first_real, window, sink, scale, softcap, dims, dim_ok,
            BLOCK_N, HAS_POSITIONS, HAS_TREE, HAS_SOFTCAP,
        )
    else:
        acc, denom, top = attend_keys(
            acc, denom, top, q, query_pos, query_row, lo, hi,
            k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, 0,
            positions_base, stride_ps, tree_ptr, q_len, start, first_real, window, sink, scale, softcap, dims, dim_ok,
            BLOCK_N, HAS_POSITIONS, HAS_TREE, HAS_SOFTCAP,
        )
    return acc, denom, top
