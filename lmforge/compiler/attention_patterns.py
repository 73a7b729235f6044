"""The attention-pattern file: which heads stream and which prefill patterns each head uses.

`streaming_heads` and `sparse_prefill` decide per (layer, head) on calibration data; the
decisions live in `meta` and, in an artifact, also in `attention_patterns.json`, a versioned
file that names the model it was made for (name, layer count, head counts). A recipe can
hand that file (or an artifact holding it) back to the passes to reuse the decisions
without calibrating again; a file made for another model is refused, naming both models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

FILENAME = "attention_patterns.json"
FORMAT = "lmforge-attention-patterns"
VERSION = 1
SECTIONS = ("streaming_heads", "sparse_prefill")


def model_identity(meta: dict, config: Any) -> dict:
    """What a pattern file must match: the model's name (recorded at capture) and its
    attention shape."""
    heads = config.num_attention_heads
    return {
        "name": meta.get("model_name", config.model_type),
        "architecture": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
    }


def patterns_document(meta: dict, config: Any) -> dict | None:
    """The file's content for a program's decisions, or None when no pass made any."""
    sections = {name: meta[name] for name in SECTIONS if name in meta}
    if not sections:
        return None
    return {"format": FORMAT, "version": VERSION, "model": model_identity(meta, config), **sections}


def load_patterns(path: str | Path, meta: dict, config: Any) -> dict:
    """A pattern file (or an artifact directory holding one) checked against the model of
    `meta` and `config`."""
    path = Path(path)
    file = path / FILENAME if path.is_dir() else path
    if not file.is_file():
        raise LmforgeError(f"attention patterns: {file} does not exist (give an {FILENAME} or an artifact holding one)")
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"attention patterns: {file} is not valid JSON ({exc})") from None
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise LmforgeError(f"attention patterns: {file} is not an {FORMAT} file of version {VERSION} "
                           f"(format {document.get('format')!r}, version {document.get('version')!r})")
    check_identity(document["model"], meta, config, str(file))
    return document


def check_identity(recorded: dict, meta: dict, config: Any, where: str) -> None:
    current = model_identity(meta, config)
    if recorded != current:
        def describe(identity: dict) -> str:
            return (f"'{identity['name']}' ({identity['architecture']}, {identity['num_layers']} layers, "
                    f"{identity['num_heads']} heads / {identity['num_kv_heads']} KV heads)")
        raise LmforgeError(f"attention patterns: {where} was made for model {describe(recorded)}, "
                           f"not for {describe(current)}; calibrate the patterns for this model")
