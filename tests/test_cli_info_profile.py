"""`lmforge info --profile`: a decode step of the artifact split into matrix products,
attention and the rest, with the limit the measured memory bandwidth puts on it."""

import json

import pytest
from typer.testing import CliRunner

import lmforge
from lmforge import cli
from lmforge.cli import app
from tests.tiny_models import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    recipe = "passes: [{name: cleanup}]\ncodegen: {backend: aten}\nruntime: {max_seq_len: 48}\n"
    return lmforge.optimize(tiny_model("llama"), recipe).save(tmp_path_factory.mktemp("info") / "tiny")


def test_info_profile_prints_the_breakdown_and_the_limit(tiny_artifact, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 200)  # every column title on one line
    result = runner.invoke(app, ["info", str(tiny_artifact), "--profile"])
    assert result.exit_code == 0, result.output
    assert "a decode step after 30 tokens" in result.stdout
    for column in ("matmuls", "attention", "rest", "of which Python"):
        assert column in result.stdout
    assert "tok/s at batch 1" in result.stdout and "this step alone" in result.stdout


def test_info_profile_json_holds_the_parts_and_the_limit(tiny_artifact):
    result = runner.invoke(app, ["info", str(tiny_artifact), "--profile", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    profile = record["profile"]
    embedding_table = 256 * 64 * 4  # tiny llama: vocabulary x hidden, fp32; a step reads one row of it
    assert profile["step_weight_bytes"] == record["weight_bytes"] - embedding_table
    part = profile["step_breakdown"]
    assert part["matmul_us"] > 0 and part["attention_us"] > 0 and part["consistent"]
    assert part["profiled_step_us"] == pytest.approx(part["matmul_us"] + part["attention_us"] + part["rest_us"])
    assert profile["limit_tokens_per_second"] == pytest.approx(
        profile["read_bandwidth_gb_per_s"] * 1e9 / profile["step_weight_bytes"])


def test_info_without_profile_runs_nothing(tiny_artifact):
    record = json.loads(runner.invoke(app, ["info", str(tiny_artifact), "--json"]).stdout)
    assert "profile" not in record
