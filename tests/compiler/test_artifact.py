"""Artifact round trip, hash checks, and no pickle anywhere."""

import json

import pytest
import torch

import lmforge
from lmforge.compiler.artifact import PROGRAM, WEIGHTS, read_manifest
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def saved(ref_compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifacts") / "ref"
    ref_compiled.save(path)
    return path


def test_round_trip_gives_identical_tokens(saved, ref_compiled, heldout_prompts):
    loaded = lmforge.load(saved)
    ids = torch.tensor([heldout_prompts[2]])
    assert torch.equal(loaded.generate(ids, max_new_tokens=24), ref_compiled.generate(ids, max_new_tokens=24))
    assert loaded.tokenizer is not None
    def shape(program):  # node names may change through export; roles and counts may not
        return [(sorted(e.projections), bool(e.ffn), len(e.norms), len(e.residual_adds)) for e in program.layers]

    assert shape(loaded.program) == shape(ref_compiled.program)
    assert all(e.attention is not None for e in loaded.program.layers)


def test_manifest_records_versions_history_and_hashes(saved):
    manifest = read_manifest(saved)
    assert manifest["architecture"] == "llama" and set(manifest["versions"]) == {"lmforge", "torch", "transformers"}
    assert [h["pass"] for h in manifest["history"]] == ["cleanup", "fuse_projections", "verify"]
    assert {WEIGHTS, PROGRAM, "config.json", "recipe.yaml", "tokenizer.json"} <= set(manifest["files"])
    assert (saved / "kernels").is_dir()
    # weights live once, in safetensors: the graph file is far smaller than the weights
    assert (saved / PROGRAM).stat().st_size < manifest["weight_bytes"] / 4


def test_flipped_weight_byte_is_refused(saved, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    data = bytearray((broken / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (broken / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="weights.safetensors is corrupted"):
        lmforge.load(broken)


def test_missing_file_and_wrong_format_are_refused(saved, tmp_path):
    import shutil

    broken = tmp_path / "incomplete"
    shutil.copytree(saved, broken)
    (broken / PROGRAM).unlink()
    with pytest.raises(LmforgeError, match=f"{PROGRAM} is missing"):
        lmforge.load(broken)
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["format_version"] = 999
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmforgeError, match="artifact format 999"):
        lmforge.load(broken)


def test_save_replaces_atomically_and_leaves_no_temp_dirs(ref_compiled, tmp_path):
    target = tmp_path / "out"
    ref_compiled.save(target)
    ref_compiled.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    read_manifest(target)
