"""What an artifact declares is checked against what it holds before anything is built from
it: Hydra heads in drafter.safetensors (names, dtypes, shapes against the model and the
manifest's head count), the KV cache layout and its size against the memory there is, the
manifest's weight_bytes against weights.safetensors, tensor sizes in a safetensors header
against the file. Each refusal is one LmforgeError naming the file and the field."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_models import tiny_model

import lmforge
from lmforge.compiler.artifact import DRAFTER, WEIGHTS, hydra_problem, hydra_shapes, read_manifest
from lmforge.errors import LmforgeError
from lmforge.runtime.kv_cache import available_memory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    compiled = lmforge.optimize(tiny_model("llama"), "passes: []\nruntime: {max_seq_len: 64}\n")
    return compiled.save(tmp_path_factory.mktemp("declared") / "artifact")


@pytest.fixture
def artifact(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "artifact"))


def _edit_manifest(artifact: Path, edit) -> None:
    """Apply `edit` to the manifest and make its hashes vouch for every file as it is now,
    as a crafted artifact would."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    edit(manifest)
    for name in list(manifest["files"]):
        manifest["files"][name] = hashlib.sha256((artifact / name).read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _with_drafter(artifact: Path, tensors: dict[str, torch.Tensor], count: int = 2) -> None:
    safetensors.torch.save_file(tensors, artifact / DRAFTER)

    def declare(manifest):
        manifest["files"][DRAFTER] = ""
        manifest["meta"]["speculation"] = {"draft_heads": {"count": count, "kind": "hydra", "tree": None,
                                                           "vocab_size": manifest_vocab(artifact)}}
    _edit_manifest(artifact, declare)


def manifest_vocab(artifact: Path) -> int:
    return json.loads((artifact / "config.json").read_text())["vocab_size"]


def _hydra(artifact: Path, count: int = 2) -> dict[str, torch.Tensor]:
    config = json.loads((artifact / "config.json").read_text())
    return {name: torch.randn(shape) * 0.01
            for name, shape in hydra_shapes(count, config["hidden_size"], config["vocab_size"]).items()}


def test_well_formed_hydra_heads_load_and_draft(artifact):
    _with_drafter(artifact, _hydra(artifact))
    model = lmforge.load(artifact)
    assert model.engine.drafter.count == 2


@pytest.mark.parametrize("break_heads, problem", [
    (lambda t: t.update(extra=torch.zeros(1)), "tensor 'extra' is not a Hydra head tensor"),
    (lambda t: t.update(block_bias=t["block_bias"].long()), "tensor 'block_bias' is torch.int64, not floating point"),
    (lambda t: t.update(output=t["output"][:, :-1]), "tensor 'output' has shape (2, 255, 64), not (2, 256, 64)"),
    (lambda t: t.update(block_weight=t["block_weight"][0]), "tensor 'block_weight' has shape (64, 128), not (0, 64, 128)"),
], ids=["extra", "dtype", "vocabulary", "rank"])
def test_what_is_wrong_with_hydra_tensors_is_named(break_heads, problem):
    tensors = {name: torch.zeros(shape) for name, shape in hydra_shapes(2, 64, 256).items()}
    assert hydra_problem(tensors, 64, 256) is None
    break_heads(tensors)
    assert hydra_problem(tensors, 64, 256) == problem


def test_malformed_hydra_heads_are_refused_on_load_naming_file_and_tensor(artifact):
    """`HydraHeads(**tensors)` raised TypeError on a missing tensor; the loader refuses first."""
    tensors = _hydra(artifact)
    del tensors["embedding"]
    _with_drafter(artifact, tensors)
    with pytest.raises(LmforgeError) as info:
        lmforge.load(artifact)
    assert str(info.value) == f"{artifact / DRAFTER}: not Hydra heads for this model: tensor 'embedding' is missing"


def test_a_head_count_other_than_the_manifest_says_is_refused(artifact):
    _with_drafter(artifact, _hydra(artifact, count=3), count=2)
    with pytest.raises(LmforgeError, match="holds 3 heads, the manifest's speculation.draft_heads.count says 2"):
        lmforge.load(artifact)


def test_a_cache_larger_than_memory_is_refused_before_it_is_allocated(artifact):
    """A recipe.yaml from a stranger may ask for any cache length: the figure is computed
    and compared with the memory available before any buffer exists."""
    available = available_memory(torch.device("cpu"))
    assert available is not None  # Linux: /proc/meminfo
    recipe = (artifact / "recipe.yaml").read_text().replace("max_seq_len: 64", f"max_seq_len: {available}")
    (artifact / "recipe.yaml").write_text(recipe)
    _edit_manifest(artifact, lambda manifest: None)
    with pytest.raises(LmforgeError, match=rf"KV cache for {available:,} tokens at batch 1 needs [0-9,]+ bytes; "
                                           r"cpu has [0-9,]+ available: lower runtime.max_seq_len"):
        lmforge.load(artifact)


@pytest.mark.parametrize("field, value, problem", [
    ("kv_heads", -1, "entry 0: kv_heads is -1, not an integer >= 0"),
    ("head_dim", "64", "entry 0: head_dim is 64, not an integer >= 1"),
    ("cache", 10**12, "entry 0: cache is 1000000000000, not an integer 0..3"),  # a list that long was allocated
])
def test_a_kv_layout_with_impossible_entries_is_refused(artifact, field, value, problem):
    _edit_manifest(artifact, lambda manifest: manifest["meta"]["kv_cache"][0].update({field: value}))
    with pytest.raises(LmforgeError) as info:
        read_manifest(artifact)  # what load, info and diff read first
    assert str(info.value) == (f"{artifact / 'manifest.json'}: corrupted manifest (meta.kv_cache {problem}); "
                               "recompile or restore the artifact")


def test_a_kv_layout_no_tensor_can_hold_is_refused_on_load(artifact):
    _edit_manifest(artifact, lambda manifest: manifest["meta"]["kv_cache"][0].update(kv_heads=10**40))
    with pytest.raises(LmforgeError) as info:
        lmforge.load(artifact)
    assert str(info.value) == "a KV cache of 64 tokens at batch 1 is larger than a tensor can hold"


def test_weight_bytes_must_match_the_weights_file(artifact):
    _edit_manifest(artifact, lambda manifest: manifest.update(weight_bytes=manifest["weight_bytes"] * 1000))
    read_manifest(artifact)  # hashes and shape hold: only loading compares the figure with the file
    with pytest.raises(LmforgeError, match=r"weight_bytes says [0-9,]+, weights.safetensors holds [0-9,]+ bytes"):
        lmforge.load(artifact)


def test_a_safetensors_header_declaring_huge_tensors_is_refused(artifact):
    """The header claims a 2**40-element tensor in a file of a few hundred bytes."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}}).encode()
    (artifact / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    _edit_manifest(artifact, lambda manifest: None)
    with pytest.raises(LmforgeError, match=r"weights.safetensors: not a readable safetensors file"):
        lmforge.load(artifact)
