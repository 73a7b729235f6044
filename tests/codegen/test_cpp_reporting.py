"""What the `cpp` backend reports about its buckets: each bucket's phases as it compiles (the
CLI's progress bars) or loads from the cache, and `lmforge info` listing the buckets compiled
on this machine with their first compile times.

AOTInductor is replaced by a stand-in that keeps the exported step and runs it eagerly, so
the runner, the cache and its records are the real ones but no C++ is built."""

import json

import pytest
import torch
from typer.testing import CliRunner

import lmforge
from lmforge import cli
from lmforge.cli import app
from lmforge.codegen.cpp_backend import bucket_progress
from tests.tiny_models import tiny_model

RECIPE = "passes: [{name: cleanup}]\ncodegen: {backend: cpp}\nruntime: {max_seq_len: 32}\n"


@pytest.fixture
def eager_aotinductor(tmp_path, monkeypatch):
    """An empty lmforge cache; 'compiling' a package writes a stand-in file and keeps the
    exported step, 'loading' it gives that step to run eagerly."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    exported_steps = {}

    def compile_(exported, package_path, inductor_configs):
        exported_steps[package_path.replace(".partial", "").rsplit(".", 2)[0]] = exported
        open(package_path, "wb").write(b"stand-in package")

    def load(path):
        return exported_steps[path.rsplit(".", 1)[0]].module()

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)


def test_each_bucket_reports_its_phases_then_its_compile_time(eager_aotinductor):
    compiled = lmforge.optimize(tiny_model("llama"), RECIPE)
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(0))
    heard = []
    with bucket_progress(lambda description, done, total: heard.append((description, done, total))):
        compiled.generate(ids, max_new_tokens=2, eos_token_id=[])
    threads = torch.get_num_threads()
    for bucket in (f"batch=1 tokens=any threads={threads}", f"batch=1 tokens=1 threads={threads}"):
        phases = [(description.split(": ", 1)[1], done) for description, done, total in heard
                  if description.startswith(f"cpp bucket {bucket}: ") and total == 3]
        assert [phase for phase, _ in phases[:3]] == [
            "exporting", "compiling (AOTInductor: lowering, code generation, C++ build)", "loading"]
        assert [done for _, done in phases] == [0, 1, 2, 3] and phases[3][0].startswith("first compile ")
    heard.clear()
    again = lmforge.optimize(tiny_model("llama"), RECIPE)  # the same program: its buckets are in the cache
    with bucket_progress(lambda description, done, total: heard.append((description.split(": ", 1)[1], done))):
        again.generate(ids, max_new_tokens=2, eos_token_id=[])
    assert [done for _, done in heard] == [2, 3, 2, 3] and heard[0][0] == "loading from the cache"
    assert all("; cache in " in description for description, done in heard if done == 3)


def test_info_lists_the_buckets_compiled_on_this_machine(eager_aotinductor, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 200)  # the table's title on one line
    compiled = lmforge.optimize(tiny_model("llama"), RECIPE)
    artifact = compiled.save(tmp_path / "artifact")
    before = json.loads(CliRunner().invoke(app, ["info", str(artifact), "--json"]).stdout)
    assert before["cpp_buckets"] == []
    compiled.generate(torch.randint(3, 200, (1, 6)), max_new_tokens=2, eos_token_id=[])
    result = CliRunner().invoke(app, ["info", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    buckets = json.loads(result.stdout)["cpp_buckets"]
    threads = torch.get_num_threads()
    assert [bucket["bucket"] for bucket in buckets] == [f"batch=1 tokens=any threads={threads}",
                                                        f"batch=1 tokens=1 threads={threads}"]
    records = compiled.engine.runner.compile_records
    for bucket in buckets:
        assert bucket["compile_seconds"] == records[bucket["bucket"]]["compile_seconds"] >= bucket["export_seconds"] > 0
    table = CliRunner().invoke(app, ["info", str(artifact)]).stdout
    assert "cpp buckets compiled on this machine" in table and f"batch=1 tokens=any threads={threads}" in table
