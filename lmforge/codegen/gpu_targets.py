"""What one streaming multiprocessor of each NVIDIA target offers, and how many warps of a
kernel fit on it: plain arithmetic, usable (and tested) without compiling anything, apart
from `aot.py`, which compiles and needs a process where Triton is not interpreting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TargetLimits:
    """What one streaming multiprocessor offers, from the CUDA C++ Programming Guide's table
    "Technical Specifications per Compute Capability" (8.0: A100; 9.0: H100)."""

    name: str
    capability: int
    shared_per_sm: int
    shared_per_block: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    register_unit: int = 256
    """Registers are given to a warp in multiples of 256 (the occupancy calculator's unit)."""
    shared_reserved_per_block: int = 1024
    """The system's own 1 KB of shared memory per resident block (CUDA tuning guides)."""
    shared_unit: int = 128


TARGETS = {
    "sm_80": TargetLimits("sm_80", 80, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
    "sm_90": TargetLimits("sm_90", 90, shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
}
"""sm_90 compiles to sm_90a (H100/H200 only), as Triton does for capability 90."""


def occupancy(registers: int, shared_bytes: int, num_warps: int, limits: TargetLimits) -> tuple[int, str]:
    """(resident warps per SM, what limits it): the CUDA occupancy calculator's rules for
    whole blocks of `num_warps` warps. An estimate: it ignores the L1/shared carve-out the
    driver picks and anything else running on the SM."""
    warp_registers = math.ceil(registers * 32 / limits.register_unit) * limits.register_unit
    block_shared = shared_bytes + limits.shared_reserved_per_block
    block_shared = math.ceil(block_shared / limits.shared_unit) * limits.shared_unit
    blocks = {
        "registers": (limits.registers_per_sm // warp_registers) // num_warps,
        "shared memory": limits.shared_per_sm // block_shared,
        "warps": limits.max_warps_per_sm // num_warps,
        "blocks": limits.max_blocks_per_sm,
    }
    limit = min(blocks, key=blocks.get)
    return blocks[limit] * num_warps, limit
