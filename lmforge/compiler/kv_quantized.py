"""Quantized KV cache (KIVI): int8 or fp8 codes with scales, plus a full-precision window.

Keys and values are stored as 1-byte codes. Granularity `kivi` (the default) quantizes keys
per channel over a group of `group` consecutive tokens and values per token, because keys
have outlier channels and values do not (KIVI, Liu et al. 2024); granularity `token`
quantizes both per token. int8 is asymmetric (a scale and a zero point, the value of
the middle code); fp8 stores `torch.float8_e4m3fn` codes with a scale only. Scales and zero points
are fp16: at head_dim 32 they add 8 bytes per token and head to the 64 bytes of codes.

Which tokens a query reads quantized is a function of positions only, never of how the
sequence was cut into forwards: the query at slot p reads exactly the tokens of its own group
(slots `p // group * group ..`) and every earlier, complete group quantized. So a prefill, a
cache-free forward, token-by-token decoding and the verification of drafts all compute the
same numbers, and speculation stays exact. The slot keeps the exact keys and values of the
slots from `frontier` (a group boundary) on in a ring of `group + slack` entries; groups
before `frontier` are committed to codes. A forward commits what no later forward can roll
back: the groups before its own start, and the groups more than `slack` slots before its end
(a long prefill would not fit the ring otherwise). A forward that later restarts more than
`slack` slots before the end of the previous one (drafts of more than `slack` tokens
rejected) finds its group committed and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from lmforge.errors import LmforgeError

DTYPES = ("int8", "fp8")
GRANULARITIES = ("kivi", "token")
_CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_FP8_MAX = 448.0
_SCALE_FLOOR = 2.0**-20  # a constant group still gets a usable (fp16-normal) scale


@dataclass(frozen=True)
class KVQuantSpec:
    """How one layer's keys and values are quantized: code `dtype`, `granularity`, and the
    `group` of tokens that share key scales (kivi) and are quantized together."""

    dtype: str
    granularity: str
    group: int

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise LmforgeError(f"quantized KV cache: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.granularity not in GRANULARITIES:
            raise LmforgeError(f"quantized KV cache: granularity {self.granularity!r} is not one of "
                               f"{', '.join(GRANULARITIES)}")
        if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 1:
            raise LmforgeError(f"quantized KV cache: residual {str(self.group)[:40]} is not a positive integer")

    @property
    def keys_per_channel(self) -> bool:
        return self.granularity == "kivi"

    @property
    def code_dtype(self) -> torch.dtype:
        return _CODE_DTYPES[self.dtype]

    def group_start(self, slot: int) -> int:
        return slot // self.group * self.group


@dataclass
class Quantized:
    """Codes with their scales and zero points (None for fp8), shaped like the tensor they
    encode except along the reduced dimension."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def _masked_extremes(x: torch.Tensor, dims: tuple[int, ...], valid: torch.Tensor | None):
    """Minimum and maximum of `x` over `dims`, ignoring entries where `valid` is False
    (left padding); a reduction with no valid entry gives 0 and 0."""
    if valid is None:
        return x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    low = torch.where(valid, x, torch.inf).amin(dims, keepdim=True)
    high = torch.where(valid, x, -torch.inf).amax(dims, keepdim=True)
    empty = torch.isinf(low)
    return low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)


def quantize_groups(x: torch.Tensor, dims: tuple[int, ...], dtype: str, valid: torch.Tensor | None = None) -> Quantized:
    """Quantize `x` with one scale (and zero point) per reduction over `dims`. int8 maps each
    reduction's [min, max] onto the 256 codes -128..127 (asymmetric; the zero point is the
    value of code 0, so reading back is one multiply-add); fp8 scales its largest magnitude
    to e4m3's 448. Codes are computed from the fp16-rounded scale and zero point, so that
    `dequantize_groups` reproduces what was encoded."""
    x = x.float()
    low, high = _masked_extremes(x, dims, valid)
    if dtype == "fp8":
        scale = (torch.maximum(low.abs(), high.abs()) / _FP8_MAX).clamp_min(_SCALE_FLOOR).half()
        codes = (x / scale.float()).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        return Quantized(codes, scale, None)
    scale = ((high - low) / 255.0).clamp_min(_SCALE_FLOOR).half()
    zero = (low + 128 * scale.float()).half()
    codes = torch.round((x - zero.float()) / scale.float()).clamp(-128, 127)
    return Quantized(codes.to(torch.int8), scale, zero)


def dequantize_groups(quantized: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes, scale = quantized.codes, quantized.scale.to(dtype)
    if quantized.zero is None:
        return codes.to(dtype) * scale
    return torch.addcmul(quantized.zero.to(dtype), codes.to(dtype), scale)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, n * group, D) → (B, H, n, group, D)."""
    batch, heads, length, dim = x.shape
    return x.view(batch, heads, length // group, group, dim)


def quantize_keys(keys: torch.Tensor, spec: KVQuantSpec, valid: torch.Tensor | None = None) -> Quantized:
    """Keys (B, H, n * group, D): per channel over each group of tokens (kivi; scale and zero
    (B, H, n, D)) or per token (scale and zero (B, H, n * group, 1)). `valid` (B, 1, n * group)
    marks the slots that are not left padding, which the per-channel ranges ignore."""
    if not spec.keys_per_channel:
        return quantize_groups(keys, (-1,), spec.dtype)
    mask = None if valid is None else _grouped(valid[..., None], spec.group)
    found = quantize_groups(_grouped(keys, spec.group), (3,), spec.dtype, mask)
    squeeze = lambda t: None if t is None else t.squeeze(3)  # noqa: E731
    return Quantized(found.codes.flatten(2, 3), squeeze(found.scale), squeeze(found.zero))


def dequantize_keys(quantized: Quantized, spec: KVQuantSpec, dtype: torch.dtype) -> torch.Tensor:
    if not spec.keys_per_channel:
        return dequantize_groups(quantized, dtype)
    unsqueeze = lambda t: None if t is None else t.unsqueeze(3)  # noqa: E731
    grouped = Quantized(_grouped(quantized.codes, spec.group), unsqueeze(quantized.scale), unsqueeze(quantized.zero))
    return dequantize_groups(grouped, dtype).flatten(2, 3)


def quantize_values(values: torch.Tensor, spec: KVQuantSpec) -> Quantized:
    """Values: per token, whatever the granularity (their outliers are per token)."""
    return quantize_groups(values, (-1,), spec.dtype)


def fake_quantize(keys: torch.Tensor, values: torch.Tensor, spec: KVQuantSpec,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What whole groups of keys and values read back as once committed (same function, so
    the same numbers)."""
    return (dequantize_keys(quantize_keys(keys, spec, valid), spec, keys.dtype),
            dequantize_groups(quantize_values(values, spec), values.dtype))


@dataclass
class QuantizedSlot:
    """One cache slot of a quantized layer: codes and scales for the slots before `frontier`,
    the exact keys and values of slots `frontier .. end` in a ring (slot s at entry
    s % ring size). See the module docstring for when groups are committed."""

    key_codes: torch.Tensor    # (B, H, L, D) int8 / float8_e4m3fn
    value_codes: torch.Tensor  # (B, H, L, D)
    key_scale: torch.Tensor    # kivi: (B, H, ceil(L / group), D); token: (B, H, L, 1) fp16
    key_zero: torch.Tensor | None
    value_scale: torch.Tensor  # (B, H, L, 1) fp16
    value_zero: torch.Tensor | None
    ring_keys: torch.Tensor    # (B, H, group + slack, D), the program's dtype
    ring_values: torch.Tensor
    spec: KVQuantSpec
    slack: int
    frontier: int = 0
    end: int = 0

    @classmethod
    def allocate(cls, batch: int, heads: int, max_len: int, head_dim: int, spec: KVQuantSpec, slack: int,
                 dtype: torch.dtype) -> QuantizedSlot:
        if not isinstance(slack, int) or isinstance(slack, bool) or slack < 0:
            raise LmforgeError(f"quantized KV cache: slack {str(slack)[:40]} is not a non-negative integer")
        code_shape = (batch, heads, max_len, head_dim)
        groups = -(-max_len // spec.group)
        key_stats = (batch, heads, groups, head_dim) if spec.keys_per_channel else (batch, heads, max_len, 1)
        value_stats = (batch, heads, max_len, 1)
        with_zero = spec.dtype == "int8"
        ring = (batch, heads, spec.group + slack, head_dim)
        return cls(
            key_codes=torch.zeros(code_shape, dtype=spec.code_dtype),
            value_codes=torch.zeros(code_shape, dtype=spec.code_dtype),
            key_scale=torch.zeros(key_stats, dtype=torch.float16),
            key_zero=torch.zeros(key_stats, dtype=torch.float16) if with_zero else None,
            value_scale=torch.zeros(value_stats, dtype=torch.float16),
            value_zero=torch.zeros(value_stats, dtype=torch.float16) if with_zero else None,
            ring_keys=torch.zeros(ring, dtype=dtype),
            ring_values=torch.zeros(ring, dtype=dtype),
            spec=spec,
            slack=slack,
        )

    def nbytes(self) -> int:
        return sum(value.nbytes for f in fields(self) if isinstance(value := getattr(self, f.name), torch.Tensor))

    def exact(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring's keys and values of slots `first .. last` (all at or after `frontier`)."""
        entries = torch.arange(first, last, device=self.ring_keys.device) % self.ring_keys.shape[2]
        return self.ring_keys[:, :, entries], self.ring_values[:, :, entries]

    def keep_exact(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        """Store the exact keys and values of slots `first ..` in the ring."""
        entries = torch.arange(first, first + keys.shape[2], device=keys.device) % self.ring_keys.shape[2]
        self.ring_keys[:, :, entries] = keys
        self.ring_values[:, :, entries] = values

    def commit(self, keys: torch.Tensor, values: torch.Tensor, first: int, valid: torch.Tensor | None) -> None:
        """Encode whole groups of slots `first ..` (`first` a group boundary)."""
        spec, last = self.spec, first + keys.shape[2]
        quantized_keys, quantized_values = quantize_keys(keys, spec, valid), quantize_values(values, spec)
        self.key_codes[:, :, first:last] = quantized_keys.codes
        self.value_codes[:, :, first:last] = quantized_values.codes
        rows = slice(first // spec.group, last // spec.group) if spec.keys_per_channel else slice(first, last)
        self.key_scale[:, :, rows] = quantized_keys.scale
        self.value_scale[:, :, first:last] = quantized_values.scale
        if quantized_keys.zero is not None:
            self.key_zero[:, :, rows] = quantized_keys.zero
            self.value_zero[:, :, first:last] = quantized_values.zero

    def committed(self, first: int, last: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of committed slots `first .. last` (group boundaries), dequantized."""
        spec = self.spec
        rows = slice(first // spec.group, last // spec.group) if spec.keys_per_channel else slice(first, last)
        zero = lambda stored, index: None if stored is None else stored[:, :, index]  # noqa: E731
        keys = Quantized(self.key_codes[:, :, first:last], self.key_scale[:, :, rows], zero(self.key_zero, rows))
        values = Quantized(self.value_codes[:, :, first:last], self.value_scale[:, :, first:last],
                           zero(self.value_zero, slice(first, last)))
        return dequantize_keys(keys, spec, dtype), dequantize_groups(values, dtype)


def quantized_slot_entry(entry: dict) -> tuple[KVQuantSpec, int]:
    """The spec and slack of a layout entry of kind `quantized` (checked: it may come from a
    stranger's manifest)."""
    return KVQuantSpec(entry.get("dtype"), entry.get("granularity"), entry.get("residual")), entry.get("slack")
