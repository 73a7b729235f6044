"""`kv_share` mode `merge`: MiniCache-style merging of adjacent layers' KV caches.

Unlike sharing, both layers keep computing their own keys and values; what shrinks is what
the cache stores for them. Each pair's slot keeps one direction per token and head — the
spherical interpolation (SLERP, fraction `t` toward the second layer) of the two layers'
directions — plus each layer's norms, and keeps exactly the token-heads whose directions
are furthest apart (the top `retain_fraction` on calibration text sets the angle
threshold; capacity is that fraction of the cache length). The tokens of the current
forward always attend with their exact keys, so a prefill is exact and merging affects
decoding only: quality is measured by teacher-forced decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lmforge.compiler.kv_layout import _slerp_directions
from lmforge.compiler.layermap import set_role
from lmforge.compiler.ops import attention, merged_attention
from lmforge.compiler.program import Program
from lmforge.errors import LmforgeError
from lmforge.passes.calibrate import node_values

Pairs = list[list[int]]


def check_pairs(program: Program, pairs: Pairs) -> None:
    layout = program.meta["kv_cache"]
    seen: set[int] = set()
    for pair in pairs:
        if len(pair) != 2 or pair[1] != pair[0] + 1:
            raise LmforgeError(f"kv_share merge: group {pair} must be two adjacent layers, e.g. [4, 5]")
        for layer in pair:
            if not 0 <= layer < len(layout):
                raise LmforgeError(f"kv_share merge: layer {layer} does not exist (the model has {len(layout)} layers)")
            if layer in seen or layout[layer]["cache"] != layer or layout[layer].get("kind"):
                raise LmforgeError(f"kv_share merge: layer {layer} is in two groups or already shares a cache")
            if program.layers[layer].attention.target is not attention:
                raise LmforgeError(f"kv_share merge: layer {layer}'s attention was already rewritten")
            seen.add(layer)
        if (layout[pair[0]]["kv_heads"], layout[pair[0]]["head_dim"]) != (layout[pair[1]]["kv_heads"], layout[pair[1]]["head_dim"]):
            raise LmforgeError(f"kv_share merge: layers {pair} have different KV shapes")


def retain_thresholds(program: Program, ids: torch.Tensor, pairs: Pairs, fraction: float, t: float) -> list[float]:
    """Per pair, the angle (radians) above which a token-head is kept exactly: the
    (1 - fraction) quantile of the larger of its key and value angles on `ids`."""
    nodes = [program.layers[layer].attention.args[i] for pair in pairs for layer in pair for i in (1, 2)]
    values = node_values(program, ids, nodes)
    thresholds = []
    for pair in pairs:
        (k0, v0), (k1, v1) = ([values[program.layers[layer].attention.args[i].name] for i in (1, 2)] for layer in pair)
        angle = torch.maximum(_slerp_directions(k0, k1, t)[1], _slerp_directions(v0, v1, t)[1]).flatten().float()
        thresholds.append(math.inf if fraction <= 0 else torch.quantile(angle[:1 << 24], 1 - fraction).item())
    return thresholds


def merge_pairs(
    program: Program,
    pairs: Pairs,
    t: float,
    retain_fraction: float,
    thresholds: list[float],
    allow: Callable[[int], bool] | None = None,
) -> int:
    """Replace each pair's attention ops with `merged_attention` on one merged slot."""
    graph, layout, merged = program.graph_module.graph, program.meta["kv_cache"], 0
    for pair, threshold in zip(pairs, thresholds):
        if allow is not None and not allow(pair[1]):
            continue
        threshold = min(threshold, math.pi)  # directions are never further apart than pi
        for member, layer in enumerate(pair):
            old = program.layers[layer].attention
            q, k, v, _, scale, window, softcap = old.args
            with graph.inserting_before(old):
                new = graph.call_function(
                    merged_attention, (q, k, v, pair[0], member, t, threshold, scale, window, softcap)
                )
            new.meta = dict(old.meta)
            set_role(new, layer, "attention")
            old.replace_all_uses_with(new)
            graph.erase_node(old)
            layout[layer].update(cache=pair[0], kind="merged", member=member, t=t,
                                 retain_threshold=threshold, retain_fraction=retain_fraction)
        merged += 1
    program.refresh()
    return merged
