"""A `triton` artifact end to end: `lmforge compile` with examples/recipes/triton.yaml on a CPU
without Triton's interpreter (so the ahead-of-time compile runs in that process, and verify
checks the aten lowering and says so), `lmforge info --json`, then a load under the
interpreter (this pytest process has TRITON_INTERPRET=1 from conftest) decoding as Hugging
Face does; the load-time check of the stored kernel sources against tampering.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

import lmforge
from lmforge.codegen.gpu_targets import TARGETS
from lmforge.errors import LmforgeError

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "triton.yaml"
TARGET_NAMES = ("sm_80", "sm_90")


def lmforge_cli(*args: str) -> subprocess.CompletedProcess:
    """The `lmforge` command in a process started without TRITON_INTERPRET."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True,
                         env=environment, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=1).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "artifact"
    lmforge_cli("compile", str(checkpoint), "--recipe", str(RECIPE), "-o", str(out), "--json")
    return out


@pytest.fixture(scope="module")
def manifest(artifact) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


@pytest.fixture(scope="module")
def info(artifact) -> dict:
    return json.loads(lmforge_cli("info", str(artifact), "--json").stdout)


def test_kernels_holds_sources_and_binaries_for_both_targets(artifact, manifest):
    generated, library = manifest["kernels"], manifest["library_kernels"]
    assert generated and [entry["name"] for entry in library] == [
        "decode_attention_partial", "decode_attention_partial_captured", "decode_attention_partial_own_keys",
        "decode_attention_combine", "prefill_attention_kernel", "prefill_attention_kernel_captured",
        "prefill_attention_kernel_own_keys", "paged_attention_kernel_decode", "paged_attention_kernel_chunk"]
    for entry in generated:
        assert entry["file"] == f"kernels/{entry['name']}.py" and entry["file"] in manifest["files"]
    for entry in generated + library:
        assert set(entry["targets"]) == set(TARGET_NAMES)
        for target, report in entry["targets"].items():
            for kind in ("ptx", "cubin"):
                path = artifact / report[kind]
                assert report[kind] == f"kernels/{entry['name']}.{target}.{kind}"
                assert manifest["files"][report[kind]] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert (artifact / report["cubin"]).read_bytes().startswith(b"\x7fELF")
            assert f".target {'sm_90a' if target == 'sm_90' else target}" in (artifact / report["ptx"]).read_text()
            assert report["spills"] == report["spill_loads"] == 0
            assert 0 < report["registers"] <= 255
            assert report["shared_bytes"] + report["static_shared_bytes"] <= TARGETS[target].shared_per_block


def test_info_json_lists_every_kernel_with_its_report(info, manifest):
    names = [entry["name"] for entry in manifest["kernels"] + manifest["library_kernels"]]
    assert [kernel["name"] for kernel in info["kernels"]] == names
    for kernel in info["kernels"]:
        assert kernel["ops"] and set(kernel["targets"]) == set(TARGET_NAMES)
        assert {"registers", "spills", "shared_bytes", "occupancy_fraction"} <= set(kernel["targets"]["sm_90"])
    launches = info["decode_launches"]
    # RMSNorm (+ residual), RoPE, attention, RMSNorm + residual, SiLU·mul
    assert launches["besides_matmuls"]["0"] == launches["most_in_a_layer_besides_matmuls"] == 5
    roofline = info["decode_attention_roofline"]
    assert roofline["context"] == 4096 and roofline["useful_fraction"] >= 0.8


def test_verify_says_the_triton_program_was_not_run_here(manifest):
    verify = next(entry for entry in manifest["history"] if entry["pass"] == "verify")
    lowered = verify["measurements"]["lowered"]
    assert lowered["not_run"].startswith("the triton program was not run on this machine")
    assert lowered["codegen"].startswith("codegen aten") and verify["measurements"]["status"] == "passed"


def test_load_under_the_interpreter_decodes_as_hugging_face(artifact, checkpoint):
    from transformers import AutoModelForCausalLM

    model = lmforge.load(artifact)
    assert model.recipe.codegen.backend == "triton"
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12), expected)


def test_compiling_again_gives_byte_identical_kernel_sources(artifact, checkpoint, tmp_path):
    """The same program compiled in this process (interpreted, no targets) stores the very
    sources the CLI stored in its own process."""
    recipe = "passes: [{name: cleanup}, {name: fuse_projections}]\ncodegen: {backend: triton, targets: []}\n"
    again = lmforge.optimize(checkpoint, recipe).save(tmp_path / "again")
    sources = sorted(path.name for path in (artifact / "kernels").glob("*.py"))
    assert sources and sources == sorted(path.name for path in (again / "kernels").glob("*.py"))
    for name in sources:
        assert (again / "kernels" / name).read_bytes() == (artifact / "kernels" / name).read_bytes()
    manifest = json.loads((again / "manifest.json").read_text())
    assert all(entry["targets"] == {} for entry in manifest["kernels"]) and manifest["library_kernels"] == []
    assert not list((again / "kernels").glob("*.cubin"))


def test_a_tampered_kernel_source_is_refused(artifact, manifest, tmp_path):
    """An attacker edits a stored kernel and updates its hash in the manifest: the hashes
    pass, and the load refuses it because the source is not what the program generates."""
    copy = tmp_path / "tampered"
    shutil.copytree(artifact, copy)
    name = manifest["kernels"][0]["file"]
    path = copy / name
    path.write_text(path.read_text() + "\nimport os\nos.system('echo owned')\n")
    forged = json.loads((copy / "manifest.json").read_text())
    forged["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(forged))
    with pytest.raises(LmforgeError, match=f"{name} differs from the kernel lmforge generates"):
        lmforge.load(copy)


def test_an_unknown_target_is_refused_with_the_valid_ones(checkpoint):
    recipe = "codegen:\n  backend: triton\n  targets: [sm_80, sm_70]\n"
    with pytest.raises(LmforgeError, match=r"<recipe>:3: codegen.targets: .*unknown target 'sm_70'; valid targets: "
                                           r"sm_80, sm_90"):
        lmforge.optimize(checkpoint, recipe)
