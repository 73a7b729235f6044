"""Recipe errors name the file, the line, the field and the valid choices."""

import pytest

from lmforge.compiler.recipe import Recipe, load_recipe, parse_recipe
from lmforge.errors import LmforgeError
from lmforge.passes import PASSES


def _error(text: str, tmp_path) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(LmforgeError) as info:
        load_recipe(str(path))
    return str(info.value)


def test_unknown_pass_lists_registered_passes_with_hint(tmp_path):
    message = _error("passes:\n  - name: cleanup\n  - name: clenaup\n", tmp_path)
    assert message.startswith(f"{tmp_path / 'r.yaml'}:3: passes[1].name: unknown pass 'clenaup'")
    assert "did you mean 'cleanup'?" in message
    assert f"Registered passes: {', '.join(sorted(PASSES))}" in message


def test_wrong_type_names_field_and_line(tmp_path):
    message = _error("passes:\n  - name: verify\n    greedy_tokens: many\n", tmp_path)
    assert ":3: passes[0].greedy_tokens:" in message and "valid integer" in message and "'many'" in message


def test_unknown_option_lists_valid_options(tmp_path):
    message = _error("passes:\n  - name: verify\n    max_error: 1\n", tmp_path)
    assert ":3: passes[0].max_error: unknown option 'max_error' for pass 'verify'" in message
    assert "did you mean 'max_logit_error'?" in message
    assert "Valid options: fail, greedy_tokens, lowered, max_logit_error, padded_rows" in message


def test_missing_name_field(tmp_path):
    message = _error("passes:\n  - cse: true\n", tmp_path)
    assert ":2: passes[0]: missing field 'name'; registered passes:" in message


def test_bad_yaml_gives_line_and_column(tmp_path):
    message = _error("passes:\n  - name: cleanup\n   bad: [\n", tmp_path)
    assert "r.yaml:3:" in message and "invalid YAML" in message


def test_bad_section_and_codegen_choice(tmp_path):
    assert ":1: pases: unknown section; did you mean 'passes'?" in _error("pases: []\n", tmp_path)
    message = _error("codegen:\n  backend: tvm\n", tmp_path)
    assert ":2: codegen.backend:" in message and "'aten', 'fx', 'inductor', 'cpp' or 'triton'" in message


def test_yaml_text_default_and_round_trip():
    recipe = load_recipe("passes:\n  - name: cleanup\n    cse: false\n")
    assert recipe.instantiate()[0].config.cse is False
    assert [p["name"] for p in load_recipe(None).passes] == ["cleanup", "fuse_projections", "verify"]
    assert parse_recipe(recipe.to_yaml()) == recipe
    assert isinstance(load_recipe(recipe), Recipe)
