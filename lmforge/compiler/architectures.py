"""Which Hugging Face architectures lmforge captures, and where their parts live.

The table names, per `model_type`, the decoder-layer container and the submodule names of
each role, so the LayerMap can be read off `nn_module_stack` without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module names of one architecture, relative to a decoder layer."""

    layers: str
    attention: str
    q: str | None
    k: str | None
    v: str | None
    o: str
    qkv: str | None = None
    ffn: tuple[str, ...] = ("mlp",)


_LLAMA_LIKE = ArchitectureSpec("model.layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj")

SUPPORTED: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "phi3": ArchitectureSpec("model.layers", "self_attn", None, None, None, "o_proj", qkv="qkv_proj"),
    "phi": ArchitectureSpec("model.layers", "self_attn", "q_proj", "k_proj", "v_proj", "dense"),
    "gpt2": ArchitectureSpec("transformer.h", "attn", None, None, None, "c_proj", qkv="c_attn"),
    "gpt_neox": ArchitectureSpec(
        "gpt_neox.layers", "attention", None, None, None, "dense", qkv="query_key_value"
    ),
    "opt": ArchitectureSpec(
        "model.decoder.layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
        ffn=("fc1", "fc2", "activation_fn"),
    ),
}

_WHY_NOT = {
    "falcon": "its attention module builds alibi/rotary state outside transformers' "
    "AttentionInterface, so lmforge cannot route it through its attention op",
    "bert": "it is an encoder (bidirectional attention, no causal LM head)",
    "roberta": "it is an encoder (bidirectional attention, no causal LM head)",
    "t5": "it is an encoder-decoder model with cross-attention",
    "bart": "it is an encoder-decoder model with cross-attention",
}


def spec_for(config) -> ArchitectureSpec:
    """The spec of a config's architecture, or an error naming it and why it is refused."""
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED:
        return SUPPORTED[model_type]
    if getattr(config, "is_encoder_decoder", False):
        why = "it is an encoder-decoder model"
    else:
        why = _WHY_NOT.get(model_type, "lmforge has no capture rules for it yet")
    raise LmforgeError(
        f"unsupported architecture {model_type!r} "
        f"({', '.join(getattr(config, 'architectures', None) or []) or 'no architectures field'}): "
        f"{why}. Supported model types: {', '.join(sorted(SUPPORTED))}"
    )
