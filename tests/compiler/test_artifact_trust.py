"""An artifact from a stranger cannot run code on load, and a damaged one is refused with one
clear LmforgeError. The attacks update the manifest hashes, as an attacker would."""

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

import lmforge
from lmforge.compiler.artifact import MAX_MANIFEST_BYTES, PROGRAM, WEIGHTS, _export_graph
from lmforge.errors import LmforgeError


class OpensMarker:
    """Unpickling this creates the marker file: the payload a pickle-bearing artifact could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def compiled():
    return lmforge.optimize(tiny_model("llama"), "passes: []\n")


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    return compiled.save(tmp_path_factory.mktemp("trust") / "artifact")


@pytest.fixture
def artifact(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "artifact"))


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def write_manifest(artifact: Path, manifest: dict) -> None:
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def rehash(artifact: Path, *added: str) -> None:
    """Make the manifest vouch for the files as they are now, plus `added`."""
    manifest = manifest_of(artifact)
    for name in [*manifest["files"], *added]:
        manifest["files"][name] = hashlib.sha256((artifact / name).read_bytes()).hexdigest()
    write_manifest(artifact, manifest)


def edit_program(artifact: Path, edit) -> None:
    document = json.loads((artifact / PROGRAM).read_text())
    edit(document)
    (artifact / PROGRAM).write_text(json.dumps(document))
    rehash(artifact)


def nodes(document: dict) -> list[dict]:
    return document["graph_module"]["graph"]["nodes"]


@pytest.fixture(scope="module")
def torch_pt2(compiled) -> bytes:
    """What torch.export.save writes for the program (the format lmforge used to store)."""
    buffer = io.BytesIO()
    torch.export.save(_export_graph(compiled.program.graph_module), buffer)
    return buffer.getvalue()


def pickle_bearing_pt2(torch_pt2: bytes, marker: Path) -> bytes:
    """torch_pt2 with its example-inputs entry swapped for a pickle payload."""
    payload = io.BytesIO()
    torch.save(OpensMarker(marker), payload)
    source, crafted = zipfile.ZipFile(io.BytesIO(torch_pt2)), io.BytesIO()
    with zipfile.ZipFile(crafted, "w") as out:
        for entry in source.infolist():
            data = payload.getvalue() if "sample_inputs" in entry.filename else source.read(entry)
            out.writestr(entry, data)
    return crafted.getvalue()


def test_the_pickle_payload_is_live_against_torch_export_load(torch_pt2, tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "program.pt2").write_bytes(pickle_bearing_pt2(torch_pt2, marker))
    try:
        torch.export.load(tmp_path / "program.pt2")
    except Exception:
        pass
    assert marker.exists(), "torch.export.load no longer unpickles: the attack below proves less"


def test_a_pickle_bearing_program_is_refused_without_unpickling(torch_pt2, artifact, tmp_path):
    marker = tmp_path / "marker"
    (artifact / PROGRAM).write_bytes(pickle_bearing_pt2(torch_pt2, marker))
    rehash(artifact)
    with pytest.raises(LmforgeError, match=f"{PROGRAM}: not valid JSON"):
        lmforge.load(artifact)
    assert not marker.exists()


def test_an_old_format_artifact_with_a_pickle_is_told_to_recompile(torch_pt2, artifact, tmp_path):
    marker = tmp_path / "marker"
    (artifact / "program.pt2").write_bytes(pickle_bearing_pt2(torch_pt2, marker))
    rehash(artifact, "program.pt2")
    manifest = manifest_of(artifact)
    manifest["format_version"] = 1
    write_manifest(artifact, manifest)
    with pytest.raises(LmforgeError, match="artifact format 1 is not the supported format .*recompile"):
        lmforge.load(artifact)
    assert not marker.exists()


def test_a_shape_expression_that_sympy_would_evaluate_is_refused(artifact, tmp_path):
    marker = tmp_path / "marker"
    payload = f"open({str(marker)!r}, 'w') and "

    def inject(document):
        text = json.dumps(document).replace('"expr_str": "Symbol(', f'"expr_str": "{payload}Symbol(', 1)
        document.clear()
        document.update(json.loads(text))

    edit_program(artifact, inject)
    with pytest.raises(LmforgeError, match="shape expression .*open"):
        lmforge.load(artifact)
    assert not marker.exists()
    try:  # what torch alone would do with this file
        document = json.loads((artifact / PROGRAM).read_text())
        ExportedProgramDeserializer().deserialize(_dict_to_dataclass(schema.ExportedProgram, document), {}, {}, None)
    except Exception:
        pass
    assert marker.exists(), "sympy no longer evaluates shape expressions: the attack proves less"


@pytest.mark.parametrize("target", [
    "torch.load",
    "builtins.exec",
    "torch.ops.myns.evil.default",
    "torch.ops.aten.from_file.default",
    "torch.ops.aten.__class__.__init__",
    "#extension:op",
])
def test_a_graph_calling_outside_the_allowed_ops_is_refused(artifact, target):
    def retarget(document):
        node = next(n for n in nodes(document) if n["target"] == "torch.ops.aten.mul.Tensor")
        node["target"] = target

    edit_program(artifact, retarget)
    with pytest.raises(LmforgeError, match=f"calls '{target}'"):
        lmforge.load(artifact)


def test_a_node_name_that_is_not_an_identifier_is_refused(artifact):
    """torch pastes node names into Python source it compiles."""
    edit_program(artifact, lambda d: nodes(d)[3].update(name="x = __import__('os').getcwd(); y"))
    with pytest.raises(LmforgeError, match="is not a plain identifier"):
        lmforge.load(artifact)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(guards_code=["__import__('os').getcwd()"]), "carries guard code"),
    (lambda d: nodes(d)[0]["metadata"].update(stack_trace="File x"), "metadata 'stack_trace'"),
    (lambda d: nodes(d)[0]["inputs"].append({"name": "obj", "arg": {"as_custom_obj": {"name": "o", "class_fqn": "x"}}}),
     "as_custom_obj"),
    (lambda d: d["graph_module"]["signature"]["input_specs"].append(
        {"custom_obj": {"arg": {"name": "o", "class_fqn": "x"}, "custom_obj_name": "o"}}), "not a plain input"),
    (lambda d: d.update(graph_module=[]), "not a serialized program"),
    (lambda d: nodes(d)[5]["metadata"].update(custom='{"lmforge_role": "q\\nimport os"}'),
     "annotation 'lmforge_role' is not a short line of printable text"),
])
def test_code_bearing_program_entries_are_refused(artifact, edit, message):
    edit_program(artifact, edit)
    with pytest.raises(LmforgeError, match=message):
        lmforge.load(artifact)


def test_a_tokenizer_naming_its_own_code_is_refused_without_importing_it(artifact, tmp_path):
    marker = tmp_path / "marker"
    (artifact / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (artifact / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}}))
    rehash(artifact, "evil_tokenizer.py", "tokenizer_config.json")
    with pytest.raises(LmforgeError, match="tokenizer files do not load without remote code"):
        lmforge.load(artifact)
    assert not marker.exists()


def test_unlisted_files_are_never_read(compiled, torch_pt2, artifact, tmp_path):
    marker = tmp_path / "marker"
    (artifact / "program.pt2").write_bytes(pickle_bearing_pt2(torch_pt2, marker))
    for name in ("tokenizer_config.json", "tokenizer.json", "attention_patterns.json", "drafter.safetensors"):
        (artifact / name).write_text("{not json")
    loaded = lmforge.load(artifact)
    assert loaded.tokenizer is None and loaded.program.drafter == {} and not marker.exists()
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded(ids).logits, compiled(ids).logits)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def list_twice(artifact: Path) -> None:
    text = (artifact / "manifest.json").read_text()
    digest = manifest_of(artifact)["files"]["config.json"]
    (artifact / "manifest.json").write_text(text.replace('"files": {', f'"files": {{"config.json": "{digest}", ', 1))


def entry(name: str):
    def add(artifact: Path) -> None:
        manifest = manifest_of(artifact)
        manifest["files"][name] = "0" * 64
        write_manifest(artifact, manifest)

    return add


def link_outside(artifact: Path) -> None:
    outside = artifact.parent / "outside.json"
    shutil.move(artifact / "config.json", outside)
    os.symlink(outside, artifact / "config.json")


def link_folder_outside(artifact: Path) -> None:
    outside = artifact.parent / "elsewhere"
    outside.mkdir()
    (outside / "notes.txt").write_text("hello")
    os.symlink(outside, artifact / "linked")
    rehash(artifact, "linked/notes.txt")


def edit_manifest(edit):
    def apply(artifact: Path) -> None:
        manifest = manifest_of(artifact)
        edit(manifest)
        write_manifest(artifact, manifest)

    return apply


def huge_manifest(artifact: Path) -> None:
    with open(artifact / "manifest.json", "r+b") as handle:
        handle.truncate(MAX_MANIFEST_BYTES + 1)


def swap_weights(artifact: Path) -> None:
    import safetensors.torch

    tensors = safetensors.torch.load_file(artifact / WEIGHTS)
    name = next(iter(tensors))
    tensors[name] = tensors[name][:-1].contiguous()
    safetensors.torch.save_file(tensors, artifact / WEIGHTS)
    rehash(artifact)


@pytest.mark.parametrize("damage, message", [
    (lambda a: truncate(a / WEIGHTS), "weights.safetensors is corrupted"),
    (lambda a: (truncate(a / WEIGHTS), rehash(a)), "weights.safetensors: not a readable safetensors file"),
    (lambda a: (truncate(a / PROGRAM), rehash(a)), f"{PROGRAM}: not valid JSON"),
    (lambda a: truncate(a / "manifest.json"), "corrupted manifest: not valid JSON"),
    (lambda a: (a / "manifest.json").write_text("[1, 2]"), r"corrupted manifest \(not a JSON object\)"),
    (edit_manifest(lambda m: m.update(files=["config.json"])), r"'files' is not a JSON object"),
    (edit_manifest(lambda m: m["files"].update({"config.json": "abc"})), "sha256 of 'config.json' is not 64 hex"),
    (edit_manifest(lambda m: m["files"].pop(PROGRAM)), f"the manifest does not list {PROGRAM}"),
    (edit_manifest(lambda m: m["meta"].update(dtype="load")), "dtype 'load' is not a torch dtype"),
    (lambda a: (a / "config.json").unlink(), "config.json is missing"),
    (entry("../../etc/passwd"), "'../../etc/passwd' is not a plain relative path"),
    (entry("/etc/passwd"), "'/etc/passwd' is not a plain relative path"),
    (entry("kernels/./x.py"), "not a plain relative path"),
    (link_outside, "config.json is a symbolic link"),
    (link_folder_outside, "linked/notes.txt is a symbolic link"),
    (list_twice, "key 'config.json' appears more than once"),
    (huge_manifest, "more than the .* a manifest may take"),
    (swap_weights, "is torch.float32 .* not what program.json expects"),
])
def test_damaged_artifacts_are_refused_with_one_clear_error(artifact, damage, message):
    damage(artifact)
    with pytest.raises(LmforgeError, match=message) as raised:
        lmforge.load(artifact)
    assert "\n" not in str(raised.value)


def test_hashes_are_checked_before_anything_is_read(artifact):
    """Had the program been parsed first, the error would be about its JSON."""
    (artifact / PROGRAM).write_text("{not json")
    with pytest.raises(LmforgeError, match=f"{PROGRAM} is corrupted .*sha256"):
        lmforge.load(artifact)
