"""The `lmforge` command through typer's runner."""

import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def compiled_dir(ref_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ref"
    result = runner.invoke(app, ["compile", str(ref_path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [h["pass"] for h in record["history"]] == ["cleanup", "fuse_projections", "verify"]
    return out


def test_run_json(compiled_dir):
    result = runner.invoke(app, ["run", str(compiled_dir), "--prompt", "import os\n", "-n", "12", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["new_tokens"] == 12 and record["completion"]


def test_run_streams_text(compiled_dir):
    result = runner.invoke(app, ["run", str(compiled_dir), "--prompt", "def main():", "-n", "8", "-t", "0.7", "--seed", "1"])
    assert result.exit_code == 0 and result.stdout.startswith("def main():")


def test_bench_times_hf_and_lmforge_on_the_same_prompts(compiled_dir):
    result = runner.invoke(app, ["bench", str(compiled_dir), "--prompt-len", "16", "-n", "6", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["identical_tokens"] and record["prompt_len"] == 16 and record["ratio"] > 0
    assert record["cuda_graphs"] == "cuda graphs: off (device cpu: CUDA graphs need a CUDA device)"


def test_info_reports_bytes(compiled_dir, ref_hf):
    result = runner.invoke(app, ["info", str(compiled_dir), "--context", "1024", "--json"])
    record = json.loads(result.stdout)
    # ref-llama-py: 8 layers x 4 KV heads x 32 dims, K and V, fp32
    assert record["kv_cache_bytes"] == 8 * 2 * 4 * 1024 * 32 * 4
    # every parameter once (fusion concatenates, it does not copy) plus the RoPE frequency table
    expected = sum(p.nbytes for p in ref_hf.parameters()) + ref_hf.model.rotary_emb.inv_freq.nbytes
    assert record["weight_bytes"] == expected and [p["pass"] for p in record["passes"]] == ["cleanup", "fuse_projections", "verify"]


def test_passes_lists_options():
    record = json.loads(runner.invoke(app, ["passes", "--json"]).stdout)
    cleanup = next(p for p in record if p["name"] == "cleanup")
    assert {o["name"] for o in cleanup["options"]} == {"remove_checks", "fold_identities", "cse"}
    assert all(o["description"] for p in record for o in p["options"])


def test_errors_are_one_line_without_traceback(tmp_path, ref_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - name: cleanupp\n")
    result = runner.invoke(app, ["compile", str(ref_path), "--recipe", str(bad), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "bad.yaml:2: passes[0].name: unknown pass 'cleanupp'" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["compile", str(tmp_path), "-o", str(tmp_path / "y")])
    assert result.exit_code == 1 and "not a checkpoint directory (no config.json)" in result.stderr
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "not an lmforge artifact" in result.stderr
