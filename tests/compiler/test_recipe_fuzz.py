"""Fuzzed recipes: whatever a recipe file holds, loading it either gives a Recipe whose passes
instantiate, or one `LmforgeError` line naming the file and the problem — never another
exception type, a traceback, or a message that grows with the input.

Documents come from five generators: arbitrary nested YAML values, recipe-shaped documents
whose known fields get values of every type, raw YAML text with duplicate keys, deep nesting
and alias bombs, non-mapping documents, and binary garbage. Each file runs in a few seconds
(bounded `max_examples`); `lmforge compile` reads recipes through the same `load_recipe`.
"""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.compiler.recipe import CodegenConfig, Recipe, RuntimeConfig, load_recipe
from lmforge.errors import LmforgeError
from lmforge.passes import PASSES
from lmforge.passes.calibrate import CalibrationConfig, QualityBudget

MAX_MESSAGE = 1000  # an error names the problem; it does not echo a whole document back
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])

SECTIONS = {"codegen": CodegenConfig, "runtime": RuntimeConfig, "calibration": CalibrationConfig,
            "quality_budget": QualityBudget}

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 2**63, -(2**63) - 1, 10**100, 2**31 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),  # unicode, control characters and newlines included
    st.sampled_from(["", "~", "null", "yes", "on", "1e400", "0x1F", "\u202e", "a\nb", "\x00", "\ud7ff"]),
)
keys = st.one_of(st.text(max_size=12), st.sampled_from([*Recipe.model_fields, *PASSES, "name"]),
                 st.integers(), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


def _field_names(model) -> list[str]:
    return list(model.model_fields)


@st.composite
def pass_entries(draw) -> object:
    """A pass entry with a known or near-miss name and any value for its real options."""
    name = draw(st.one_of(st.sampled_from(sorted(PASSES)), st.text(max_size=10), values))
    entry = {"name": name} if draw(st.booleans()) else {}
    options = _field_names(PASSES[name].Config) if isinstance(name, str) and name in PASSES else []
    for option in draw(st.lists(st.sampled_from(options), max_size=3, unique=True)) if options else []:
        entry[option] = draw(values)
    entry.update(draw(st.dictionaries(keys, values, max_size=2)))
    return entry if draw(st.integers(0, 9)) else draw(values)


@st.composite
def recipe_shaped(draw) -> dict:
    """Every known section, each known field given a value of any type (often the wrong one)."""
    document: dict = {}
    if draw(st.booleans()):
        document["passes"] = draw(st.one_of(st.lists(pass_entries(), max_size=4), values))
    for section, model in SECTIONS.items():
        if draw(st.booleans()):
            fields = draw(st.lists(st.sampled_from(_field_names(model)), max_size=3, unique=True))
            document[section] = {field: draw(values) for field in fields} if draw(st.integers(0, 5)) else draw(values)
    if draw(st.integers(0, 4)) == 0:
        document[draw(keys)] = draw(values)
    return document


def _dump(document) -> str:
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False)


@st.composite
def raw_yaml(draw) -> str:
    """YAML text no dumper writes: duplicate keys, deep nesting, alias bombs, odd tags, tabs."""
    kind = draw(st.sampled_from(["duplicate", "nested", "aliases", "tags", "lines"]))
    if kind == "duplicate":
        section = draw(st.sampled_from(["passes: []", "runtime: {max_seq_len: 8}", "codegen: {backend: aten}"]))
        key = section.split(":")[0]
        inner = draw(st.sampled_from(["", f"runtime:\n  max_seq_len: 4\n  max_seq_len: 5\n",
                                      "passes:\n  - name: verify\n    fail: true\n    fail: false\n"]))
        return inner or f"{section}\n{key}: {draw(st.sampled_from(['[]', '{}', '1', 'x']))}\n"
    if kind == "nested":
        depth = draw(st.integers(50, 1500))  # past the interpreter's recursion limit
        opener = draw(st.sampled_from(["[", "{a: "]))
        closer = "]" if opener == "[" else "}"
        return f"passes: {opener * depth}1{closer * depth}\n"
    if kind == "aliases":  # a "billion laughs" value: each level repeats the one before `width` times
        width, levels, leaf = draw(st.integers(2, 12)), draw(st.integers(2, 9)), draw(st.sampled_from(["1", "x", "{}"]))
        bomb = f"&a0 [{', '.join([leaf] * width)}]"
        for level in range(1, levels):
            bomb = f"&a{level} [{bomb}{f', *a{level - 1}' * (width - 1)}]"
        site = draw(st.sampled_from(["passes: {}", "codegen: {{targets: {}}}", "passes: [{{name: verify, fail: {}}}]",
                                     "passes: [{{name: kv_share, mode: explicit, groups: {}}}]",
                                     "passes: [{{name: draft_heads, path: x, tree: {}}}]", "runtime: {{max_seq_len: {}}}"]))
        return site.format(bomb) + "\n"
    if kind == "tags":
        tag = draw(st.sampled_from(["!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "!!set {a, b}",
                                    "!!timestamp 2001-12-14", "!custom x", "!!float nan", "!!int 0b101", "!!str 1"]))
        return f"{draw(st.sampled_from(['passes', 'runtime', 'x']))}: {tag}\n"
    return "\n".join(draw(st.lists(st.text(alphabet=st.characters(), max_size=30), max_size=5)))


documents = st.one_of(
    recipe_shaped().map(_dump),
    values.map(_dump),  # not a mapping, or a mapping of anything
    raw_yaml(),
    st.text(max_size=200),
)


def _assert_one_line_error(error: LmforgeError, name: str) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert len(message) <= MAX_MESSAGE, message[:200]
    assert message.startswith(name), message


def _load_or_refuse(path) -> None:
    """The contract: a Recipe whose passes instantiate, or one LmforgeError line naming the file."""
    try:
        recipe = load_recipe(str(path))
    except LmforgeError as error:
        _assert_one_line_error(error, str(path))
        return
    recipe.instantiate()


@FUZZ
@given(text=documents)
def test_fuzzed_recipe_text_loads_or_fails_with_one_line(tmp_path, text):
    """Found before the fixes in recipe.py: RecursionError on deep nesting, TypeError on non-string
    option names or a list as a pass name, two-line messages from PyYAML's reader errors and
    keys holding newlines, and messages echoing whole documents (an alias bomb's repr would
    not finish)."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_or_refuse(path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_binary_garbage_is_refused_with_one_line(tmp_path, data):
    """Bytes that are not UTF-8 are refused before YAML sees them (they raised UnicodeDecodeError)."""
    path = tmp_path / "garbage.yaml"
    path.write_bytes(data)
    _load_or_refuse(path)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("passes:\n  - name: verify\n    fail: true\n    fail: false\n")
    with pytest.raises(LmforgeError) as info:
        load_recipe(str(path))
    assert str(info.value) == f"{path}:4: passes[0].fail: duplicate key 'fail' (first at line 3)"


def test_values_pydantic_accepts_load_and_bounds_name_nan(tmp_path):
    """A huge cache length is a number the recipe may hold (the Engine refuses the cache it
    would need before allocating it); NaN where a bound applies is refused at its line."""
    assert load_recipe(f"runtime: {{max_seq_len: {10**30}}}\n").runtime.max_seq_len == 10**30
    path = tmp_path / "nan.yaml"
    path.write_text("passes:\n  - name: verify\n    max_logit_error: .nan\n")
    with pytest.raises(LmforgeError, match=r"nan.yaml:3: passes\[0\]\.max_logit_error: Input should be greater than 0 \(got nan\)$"):
        load_recipe(str(path))


def test_an_alias_bomb_is_quoted_in_a_bounded_line(tmp_path):
    """Nine levels of ten aliases are 10**9 elements once expanded: the error must not print them."""
    bomb = "&a0 [" + ", ".join(["x"] * 10) + "]"
    for level in range(1, 9):
        bomb = f"&a{level} [{bomb}{f', *a{level - 1}' * 9}]"
    path = tmp_path / "bomb.yaml"
    path.write_text(f"passes: [{{name: verify, fail: {bomb}}}]\n")
    with pytest.raises(LmforgeError) as info:
        load_recipe(str(path))
    _assert_one_line_error(info.value, f"{path}:1: passes[0].fail: Input should be a valid boolean (got [[[")


runner = CliRunner()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=documents)
def test_lmforge_compile_reports_a_bad_recipe_in_one_line(tmp_path, text):
    """Through the command: a bad recipe is one stderr line and exit 1; a good one gets as far
    as the checkpoint (absent here), which is one line too (`--json`: no progress bar)."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = runner.invoke(app, ["compile", str(tmp_path / "no-checkpoint"), "-r", str(path), "-o",
                                 str(tmp_path / "out"), "--json"], catch_exceptions=True)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
