"""Tiny random models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ARCHITECTURES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2",
    "granite", "stablelm", "gpt2", "gpt_neox", "opt", "phi",
]

_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_OVERRIDES: dict[str, dict] = {
    # a window shorter than the test prompts, so windowed attention is really exercised
    "mistral": dict(sliding_window=12),
    "gemma2": dict(sliding_window=12, attn_logit_softcapping=30.0, final_logit_softcapping=20.0, head_dim=16),
    "gemma": dict(head_dim=16),
    "qwen3": dict(head_dim=16),
    "phi3": dict(pad_token_id=0),
    "stablelm": dict(num_key_value_heads=4, partial_rotary_factor=0.5),
    "phi": dict(num_key_value_heads=4, partial_rotary_factor=0.5),
    "gpt_neox": dict(num_key_value_heads=None, rotary_pct=0.5),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, num_key_value_heads=None),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0),
}


def tiny_config(model_type: str, num_layers: int | None = None):
    options = {**_COMMON, **_OVERRIDES.get(model_type, {})}
    if num_layers is not None:
        options.update(num_hidden_layers=num_layers, **({"n_layer": num_layers} if model_type == "gpt2" else {}))
    options = {k: v for k, v in options.items() if v is not None}
    config = AutoConfig.for_model(model_type, **options)
    config.initializer_range = 0.2  # spread the logits so greedy decoding has no near-ties
    return config


def tiny_model(model_type: str, seed: int = 0, attn_implementation: str = "eager", num_layers: int | None = None):
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_layers)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


class CharTokenizer:
    """A stand-in tokenizer for tests where text is not under test: every token decodes to one
    character."""

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)
