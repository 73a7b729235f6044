"""How close split-K decode attention can come to the memory-bandwidth roofline: a count of
the bytes its two kernels move per generated token, not a measurement.

Decoding reads the whole cache to produce one token and does ~4 flops per byte read, far
below the ridge point of any current GPU (~150 flops/byte on A100, ~300 on H100), so its
best possible time is the bytes moved divided by peak memory bandwidth. Only the keys and
values are bytes the answer needs; the query, the output and the partial results the two
stages pass through global memory are overhead. The useful fraction (KV bytes over all
bytes) is the share of peak bandwidth the kernels could turn into progress even if every
byte moved at full speed — the "roofline estimate" this module reports.

What the count assumes, from `codegen/triton/decode_attention.py`: one stage-1 program per
(row, KV head, split) reads each key and value of its split once for all query heads of the
group (GQA), reads the group's queries (so the query is read once per split), and writes an
fp32 partial output and an fp32 log-sum-exp per query head; stage 2 reads them back and
writes the output once. Caches, L2 hits, masked tail blocks and launch overhead are not
modelled; a real kernel reaches perhaps 70–90 % of peak bandwidth even when it moves only
these bytes.

The split count changes the overhead bytes, and the launcher picks it two ways: an eager
step from the keys it scans, a step replayed from a CUDA graph (its grid frozen at capture)
from the cache's size. `decode_splits` gives the count with the rule that picked it, and the
estimate carries both, so a report says which step it models.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class MemoryBandwidth:
    name: str
    bytes_per_second: float
    source: str


PEAK_BANDWIDTH = {
    bandwidth.name: bandwidth
    for bandwidth in (
        MemoryBandwidth("A100-40GB", 1555e9, "NVIDIA A100 Tensor Core GPU datasheet: 40GB HBM2, 1,555 GB/s"),
        MemoryBandwidth("A100-80GB-SXM", 2039e9, "NVIDIA A100 Tensor Core GPU datasheet: 80GB HBM2e SXM, 2,039 GB/s"),
        MemoryBandwidth("H100-SXM", 3350e9, "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, 3.35 TB/s"),
    )
}
"""Peak HBM bandwidth as NVIDIA's datasheets state it (decimal gigabytes)."""

PARTIAL_BYTES = 4
"""Stage 1's partial outputs and log-sum-exps are fp32, whatever the cache's dtype."""


@dataclass(frozen=True)
class DecodeSplits:
    """Stage 1's split count and the rule that picked it, in words, for reports."""

    count: int
    rule: str


def decode_splits(kv_programs: int, context: int, cache_slots: int | None = None) -> DecodeSplits:
    """The split count the decode launcher picks (`decode_attention._split_count`) for
    `kv_programs` (batch x KV heads) attending over `context` keys: for an eager step by those
    keys; for a step captured in a CUDA graph (`cache_slots` given) by the cache's size,
    whatever the context. Imports the launcher, and so Triton, only when called."""
    from lmforge.codegen.triton.decode_attention import _split_count

    if cache_slots is None:
        return DecodeSplits(_split_count(kv_programs, context), f"eager step: by the {context} keys it scans")
    if cache_slots < context:
        raise LmforgeError(f"a cache of {cache_slots} slots cannot hold {context} tokens of context")
    return DecodeSplits(_split_count(kv_programs, cache_slots),
                        f"step captured in a CUDA graph: by the cache's {cache_slots} slots")


@dataclass(frozen=True)
class DecodeRoofline:
    """Bytes one generated token's decode attention moves across all layers, by kind, and
    the time they take at peak bandwidth."""

    kv_bytes: int
    query_bytes: int
    output_bytes: int
    partial_bytes: int
    bandwidth: MemoryBandwidth
    splits: DecodeSplits

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.query_bytes + self.output_bytes + self.partial_bytes

    @property
    def useful_fraction(self) -> float:
        """KV bytes over all bytes moved: the most of peak bandwidth that does useful work."""
        return self.kv_bytes / self.total_bytes

    @property
    def microseconds_at_peak(self) -> float:
        return self.total_bytes / self.bandwidth.bytes_per_second * 1e6


def decode_attention_roofline(
    layers: int, query_heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, context: int,
    splits: int | DecodeSplits, bandwidth: MemoryBandwidth,
) -> DecodeRoofline:
    """The bytes-moved model for one token of one sequence attending over `context` cached
    positions, with stage 1 split `splits` ways (the launcher's choice, `decode_splits`:
    batch x KV heads x splits programs aimed at ~128, at least 256 keys a split, at most 16;
    a bare count is recorded as given)."""
    if isinstance(splits, int):
        splits = DecodeSplits(splits, "given")
    if query_heads % kv_heads:
        raise LmforgeError(f"{query_heads} query heads cannot be grouped over {kv_heads} KV heads")
    if min(layers, query_heads, kv_heads, head_dim, dtype_bytes, context, splits.count) < 1:
        raise LmforgeError("every shape in a decode roofline must be at least 1")
    head_vector = head_dim * dtype_bytes
    return DecodeRoofline(
        kv_bytes=layers * 2 * context * kv_heads * head_vector,
        query_bytes=layers * splits.count * query_heads * head_vector,
        output_bytes=layers * query_heads * head_vector,
        partial_bytes=layers * 2 * splits.count * query_heads * (head_dim + 1) * PARTIAL_BYTES,
        bandwidth=bandwidth,
        splits=splits,
    )
