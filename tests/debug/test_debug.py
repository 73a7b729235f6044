"""Pass-level debugging: provenance, dumps, diffs, verify-each, bisect, CLI, report."""

import json
import shutil
import subprocess

import pytest
from tiny_models import tiny_model
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.compiler.layermap import role_of
from lmforge.compiler.pipeline import provenance
from lmforge.debug.bisect import BisectBudget, bisect
from lmforge.debug.session import debug_compile
from lmforge.errors import LmforgeError
from lmforge.passes import PASSES, Pass, PassResult, register_pass

runner = CliRunner()
FUSE_ATTENTION = "passes:\n  - name: fuse_projections\n    ffn: false\n"


@pytest.fixture
def breaking_pass():
    """A pass that rescales every layer's output projection by 1 (harmless) except layer 2's,
    which it scales by 1.5: a bug bisect must pin to this pass and layer 2."""

    @register_pass("rescale_outputs")
    class RescaleOutputs(Pass):
        description = "test-only pass with a bug in layer 2"

        def apply(self, program, ctx):
            done = 0
            for entry in program.layers:
                node = entry.projections["o"]
                if not ctx.allow_rewrite(self.name, f"rescale {node.name}", entry.index):
                    continue
                weight = node.args[1]
                factor = 1.5 if entry.index == 2 else 1.0
                program.add_weight(weight.target, getattr(program.graph_module, weight.target) * factor)
                done += 1
            return PassResult(rewrites=done)

    yield RescaleOutputs
    del PASSES["rescale_outputs"]


def test_bisect_pins_the_broken_pass_and_layer(breaking_pass):
    model = tiny_model("llama", num_layers=4)
    recipe = "passes:\n  - name: cleanup\n  - name: rescale_outputs\n  - name: fuse_projections\n  - name: verify\n"
    result = bisect(model, recipe, BisectBudget())
    assert result.culprit["pass"] == "rescale_outputs" and result.culprit["layer"] == 2
    assert "pass rescale_outputs, layer 2" in result.message
    assert result.before["max_logit_error"] <= 1e-3 < result.after["max_logit_error"]
    passes_in_log = [probe["limit"] for probe in result.probes]
    assert len(passes_in_log) <= result.total_rewrites.bit_length() + 1


def test_bisect_reports_a_clean_pipeline(breaking_pass):
    result = bisect(tiny_model("llama", num_layers=2), "passes: [{name: cleanup}, {name: fuse_projections}]", BisectBudget())
    assert result.culprit is None and "stays within the budget" in result.message


def test_verify_each_names_the_first_divergent_layer(tmp_path, breaking_pass):
    model = tiny_model("llama", num_layers=4)
    run = debug_compile(model, "passes: [{name: cleanup}, {name: rescale_outputs}]", tmp_path)
    cleanup, rescale = run.records
    assert cleanup["status"] == "ok" and cleanup["first_divergent_layer"] is None and cleanup["max_logit_error"] < 1e-4
    assert rescale["first_divergent_layer"]["layer"] == 2
    assert rescale["status"] in ("error", "logit drift") and rescale["max_logit_error"] > 1e-3


def test_dump_diff_and_provenance_of_a_known_rewrite(tmp_path):
    model = tiny_model("llama", num_layers=2)
    run = debug_compile(model, FUSE_ATTENTION, tmp_path)
    program = run.compiled.program
    fused = [node for node in program.graph_module.graph.nodes if role_of(node)[1] == "qkv"]
    assert len(fused) == 2 and all(provenance(node) == "fuse_projections" for node in fused)
    attention = [entry.attention for entry in program.layers]
    assert all(provenance(node) == "capture" for node in attention)  # still reads the same k/v views
    diff = program.history[0]["diff"]
    # per layer: three linears and their three weights out; one weight, one linear, one split, three getitems in;
    # the pass's dead-code elimination also drops the one constant nothing reads (RoPE's original_inv_freq)
    assert (diff["added"], diff["removed"]) == (12, 13)
    assert "model_model_rotary_emb_original_inv_freq" in diff["examples"]["removed"]
    assert diff["by_place"]["layer 0 qkv"]["added"] == 1 and diff["by_place"]["layer 1 q"]["removed"] == 1
    assert diff["rewired"] == 6  # the three views per layer that read q, k and v now read the split
    dump = (tmp_path / "01-fuse_projections.py").read_text()
    assert "split_with_sizes" in dump and "# layer 0 qkv, from fuse_projections" in dump
    assert "split_with_sizes" not in (tmp_path / "00-capture.py").read_text()
    stats = json.loads((tmp_path / "01-fuse_projections.stats.json").read_text())
    assert stats["by_provenance"]["fuse_projections"] == diff["added"] + diff["rewired"]


def test_stop_after_and_print_after(tmp_path):
    model = tiny_model("llama", num_layers=2)
    recipe = "passes: [{name: cleanup}, {name: fuse_projections}, {name: verify}]"
    run = debug_compile(model, recipe, tmp_path, print_after={"cleanup"}, stop_after="fuse_projections")
    assert [entry["pass"] for entry in run.compiled.program.history] == ["cleanup", "fuse_projections"]
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["00-capture.py", "01-cleanup.py"]
    with pytest.raises(LmforgeError, match="no pass named 'kv_share' in the recipe"):
        debug_compile(model, recipe, tmp_path, stop_after="kv_share")


def _tiny_checkpoint(tmp_path, name="ckpt"):
    path = tmp_path / name
    tiny_model("llama", num_layers=2).save_pretrained(path)
    return path


def test_debug_json_holds_per_pass_records(tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path)
    result = runner.invoke(app, ["debug", str(checkpoint), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [entry["pass"] for entry in record["history"]] == ["cleanup", "fuse_projections", "verify"]
    assert all({"diff", "verify_each"} <= set(entry) for entry in record["history"])
    assert record["rewrite_log"][0]["pass"] == "cleanup" and (tmp_path / "out" / "report.html").is_file()
    assert json.loads((tmp_path / "out" / "debug.json").read_text())["history"] == record["history"]


def test_debug_bisect_command(tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path)
    result = runner.invoke(app, ["debug", "bisect", str(checkpoint), "--budget", "max_kl=0.001,min_top1=0.99", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["culprit"] is None
    wrong = runner.invoke(app, ["debug", "bisect", str(checkpoint), "--budget", "max_klx=1"])
    assert wrong.exit_code == 1 and "unknown limit 'max_klx'; choose from max_logit_error, max_kl" in wrong.stderr


def test_diff_of_two_artifacts(tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path)
    plain, fused = tmp_path / "plain.yaml", tmp_path / "fused.yaml"
    plain.write_text("passes: [{name: cleanup}]\n")
    fused.write_text("passes: [{name: cleanup}, {name: fuse_projections}]\n")
    for recipe, out in ((plain, "a"), (fused, "b")):
        assert runner.invoke(app, ["compile", str(checkpoint), "-r", str(recipe), "-o", str(tmp_path / out)]).exit_code == 0
    result = runner.invoke(app, ["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    record = json.loads(result.stdout)
    assert record["passes"] == [["cleanup"], ["cleanup", "fuse_projections"]]
    assert "+- name: fuse_projections" in record["recipe_diff"]
    assert any("q_proj" in name for name in record["weights"]["only_in_first"])
    assert any("fused_qkv" in name for name in record["weights"]["only_in_second"])
    assert record["weights"]["changed"] == {}
    text = runner.invoke(app, ["diff", str(tmp_path / "a"), str(tmp_path / "b")]).stdout
    assert "B: cleanup → fuse_projections" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    run = debug_compile(tiny_model("llama", num_layers=2), FUSE_ATTENTION, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") >= 3 and "<script" not in html and "http" not in html.split("<svg", 1)[0]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                    f"--screenshot={shot}", (tmp_path / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600) and len(image.getcolors(1 << 20)) > 50  # text, tables and plots, not a blank page
    assert run.compiled.program.history[0]["pass"] == "fuse_projections"


def test_compile_with_a_rewrite_limit_applies_only_that_many(tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path)
    result = runner.invoke(app, ["compile", str(checkpoint), "-o", str(tmp_path / "a"), "--bisect", "5", "--json"])
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)["history"]
    assert [entry["rewrites"] for entry in history] == [5, 0, 0]  # cleanup's first five, then nothing
