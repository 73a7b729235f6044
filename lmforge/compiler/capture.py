"""Capture a Hugging Face causal LM as a Program with torch.export.

Attention is routed through `lmforge::attention` by registering an implementation with
transformers' `AttentionInterface`. Because that implementation has no entry in the mask
interface, transformers skips building attention masks altogether: causality, padding and
sliding windows are the op's business, computed once per step by the runtime instead of
once per layer inside the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import fx, nn

from lmforge.compiler.architectures import spec_for
from lmforge.compiler.layermap import LayerMap, build_layer_map
from lmforge.compiler.ops import attention, last_position
from lmforge.compiler.program import Program, plain_graph_module
from lmforge.errors import LmforgeError

ATTN_IMPLEMENTATION = "lmforge"
_UNSUPPORTED_ATTENTION_KWARGS = ("s_aux", "sinks", "position_bias")


def _hf_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: forwards the per-layer options to the op."""
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise LmforgeError(f"attention option {name!r} is not supported by lmforge::attention")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attention(
        query, key, value, module.layer_idx, float(scale), int(sliding_window or 0), float(softcap or 0.0)
    )
    return out, None


def _register_with_transformers() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention)


class _LogitsOnly(nn.Module):
    """The call shape lmforge exports: token ids and explicit positions in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@contextlib.contextmanager
def _routed_through_lmforge(model: nn.Module) -> Iterator[None]:
    """Switch the model to lmforge attention for the capture, and back afterwards, so the
    same object still serves as the unmodified reference."""
    _register_with_transformers()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def load_reference(model_or_path: nn.Module | str | Path, dtype: str | None = None) -> nn.Module:
    """The Hugging Face model a Program is captured from and verified against. A checkpoint
    path is read straight into `dtype` (a `torch` dtype name; None: transformers' default), so
    a bfloat16 program of an 8 B model never holds a float32 copy of its weights on the way."""
    if isinstance(model_or_path, nn.Module):
        spec_for(model_or_path.config)
        return model_or_path.eval()
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_or_path)
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path}: not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    spec_for(config)
    placement = {"dtype": getattr(torch, dtype)} if dtype else {}
    return AutoModelForCausalLM.from_pretrained(path, **placement).eval()


def kv_cache_layout(layers: LayerMap) -> list[dict]:
    """One cache entry per decoder layer, its shape read off the attention op's key input
    (configs disagree on how they name KV heads; the traced tensor does not)."""
    layout = []
    for entry in layers:
        if entry.attention is None:
            raise LmforgeError(f"layer {entry.index}: no lmforge::attention op was captured")
        _, kv_heads, _, head_dim = entry.attention.args[1].meta["val"].shape
        layout.append({"layer": entry.index, "cache": entry.index, "kv_heads": int(kv_heads), "head_dim": int(head_dim)})
    return layout


def _select_positions_before_lm_head(graph_module: fx.GraphModule, vocab_size: int) -> None:
    """Route the LM head's input through `lmforge::last_position`, so that a prefill the
    runtime only needs the next token of computes one row of logits instead of one per
    prompt token."""
    graph = graph_module.graph
    heads = [node for node in graph.nodes if node.target is torch.ops.aten.linear.default
             and node.meta.get("val") is not None and node.meta["val"].shape[-1] == vocab_size]
    if not heads:
        raise LmforgeError("capture: no LM-head projection (a linear layer to the vocabulary) was found")
    head = heads[-1]
    with graph.inserting_before(head):
        selected = graph.call_function(last_position, (head.args[0],))
    head.replace_input_with(head.args[0], selected)
    graph_module.recompile()


def capture(model: nn.Module) -> Program:
    """Export `model` with dynamic batch and sequence sizes into a Program."""
    spec = spec_for(model.config)
    max_len = getattr(model.config, "max_position_embeddings", None) or 4096
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max(max_len, 16))
    device = next(model.parameters()).device  # export traces on the model's device
    example_ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    example_positions = torch.arange(8, device=device).repeat(2, 1)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    with _routed_through_lmforge(model), torch.no_grad():
        exported = torch.export.export(
            _LogitsOnly(model), (example_ids, example_positions), dynamic_shapes=dynamic, strict=False
        )
    graph_module = plain_graph_module(exported.module())
    _select_positions_before_lm_head(graph_module, model.config.vocab_size)
    num_layers = model.config.num_hidden_layers
    layers = build_layer_map(graph_module, spec, num_layers)
    program = Program(
        graph_module=graph_module,
        layers=layers,
        config=model.config,
        meta={
            "architecture": model.config.model_type,
            "model_name": Path(getattr(model.config, "_name_or_path", "") or model.config.model_type).name,
            "num_layers": num_layers,
            "kv_cache": kv_cache_layout(layers),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
    )
    return program
