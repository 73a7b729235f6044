"""Which programs a draft source may speculate on, checked at compile time from both sides.

Speculative decoding verifies drafted tokens in one forward of several tokens, and is exact
only when that forward computes each token as decoding it alone would. Programs that decide
per decoded token do not: a verification forward never skips a dynamic `ffn_skip` FFN,
attends to its own tokens with exact keys where decoding one by one would read them back
merged (`kv_share` mode `merge`), and would already have evicted tokens for drafts that are
then rejected (`kv_evict`). Their speculative output would not be the program's own greedy
output, so the composition is refused with the reason whatever the order: a draft source
(`prompt_lookup`, `draft_heads`) refuses such a program (`check_draft_source`), and those
passes refuse a program that already drafts (`refuse_if_drafting`).
"""

from __future__ import annotations

from lmforge.errors import LmforgeError

PER_TOKEN_REASONS = {
    "kv_evict": "kv_evict caches decode one token per forward (a rejected draft would already have evicted tokens)",
    "kv_share merge": "merged KV caches let the tokens of a verification forward attend to each other with exact "
                      "keys, where decoding them one by one reads them back merged",
    "ffn_skip dynamic": "dynamic ffn_skip skips FFNs only in one-token forwards, so verifying drafts computes FFNs "
                        "that plain decoding skips",
}


def per_token_decisions(meta: dict) -> list[str]:
    """The passes (keys of `PER_TOKEN_REASONS`) whose decisions on this program are taken per
    decoded token, so that decoding differs from a forward of several tokens."""
    kinds = {entry.get("kind") for entry in meta["kv_cache"]}
    present = {"kv_evict": "evict" in kinds, "kv_share merge": "merged" in kinds,
               "ffn_skip dynamic": meta.get("ffn_skip", {}).get("mode") == "dynamic"}
    return [name for name, found in present.items() if found]


def check_draft_source(meta: dict, drafted: int, pass_name: str) -> None:
    """Refuse a draft source on a program whose verification forwards (`drafted` + 1 tokens)
    would not reproduce its own decoding: per-token decisions, or streaming rings and
    quantized caches whose fixed slack for the tokens of one forward is too small."""
    decisions = per_token_decisions(meta)
    if decisions:
        raise LmforgeError(f"{pass_name}: {PER_TOKEN_REASONS[decisions[0]]}; speculation would change this "
                           f"program's output, so drop {decisions[0]} or the draft source")
    slacks = [entry["streaming"]["capacity"] - entry["streaming"]["sink"] - entry["streaming"]["window"]
              for entry in meta["kv_cache"] if "streaming" in entry]
    if slacks and drafted > min(slacks):
        raise LmforgeError(f"{pass_name}: drafts of {drafted} tokens need a streaming ring slack of {drafted}, the "
                           f"streaming heads have {min(slacks)}; raise `slack` in streaming_heads or draft fewer tokens")
    quantized = [entry["slack"] for entry in meta["kv_cache"] if entry.get("kind") == "quantized"]
    if quantized and drafted > min(quantized):
        raise LmforgeError(f"{pass_name}: drafts of {drafted} tokens need a quantized KV cache slack of {drafted} "
                           f"to roll rejected drafts back, the cache has {min(quantized)}; raise `slack` in "
                           "quantize's kv_cache or draft fewer tokens")


def refuse_if_drafting(meta: dict, name: str) -> None:
    """Refuse pass `name` (a key of `PER_TOKEN_REASONS`) on a program that already drafts."""
    sources = sorted(meta.get("speculation") or {})
    if sources:
        raise LmforgeError(f"{name}: the program drafts tokens ({', '.join(sources)}); {PER_TOKEN_REASONS[name]}; "
                           f"speculation would change the output, so use {name} in a recipe without a draft source")
