"""Fuzzed command lines: every `lmforge` subcommand, given random arguments, either succeeds or
exits non-zero with one error line — never a Python traceback, never an exception other than
SystemExit escaping the command, never an error that is not an `LmforgeError` or a usage error.

Arguments mix each command's real options (read from the command itself, so new options are
fuzzed too) with values of every kind: huge and negative integers, NaN, unicode, empty strings,
paths to nothing, to a text file, to an empty directory, and to a real artifact and checkpoint
built once from a tiny random Llama with the reference tokenizer. `bench` and `train-heads` get
no real checkpoint: a random step or token count would make them run for minutes.
LMFORGE_FUZZ_EXAMPLES=500 runs a longer search by hand.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_config
from typer.main import get_command
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()
COMMANDS = get_command(app).commands
SLOW_WITH_REAL_INPUTS = {"bench", "train-heads", "compile", "debug", "serve"}  # serve on a real artifact never returns
EXAMPLES = int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "40"))  # raise it to fuzz longer by hand
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def places(tmp_path_factory, ref_path) -> dict[str, str]:
    """Paths the arguments may name: a tiny checkpoint (reference tokenizer, vocabulary to
    match), its artifact (a cache of 64 tokens, so `run` stays fast), a text file, an empty
    directory, nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("cli-fuzz")
    config = tiny_config("llama")
    config.vocab_size = AutoTokenizer.from_pretrained(ref_path).vocab_size
    checkpoint = root / "checkpoint"
    AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(ref_path).save_pretrained(checkpoint)
    recipe = root / "recipe.yaml"
    recipe.write_text("passes: []\nruntime: {max_seq_len: 64}\n")
    artifact = root / "artifact"
    result = runner.invoke(app, ["compile", str(checkpoint), "-r", str(recipe), "-o", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("some text\n" * 20)
    return {"checkpoint": str(checkpoint), "artifact": str(artifact), "recipe": str(recipe),
            "file": str(root / "notes.txt"), "empty": str(root / "empty"), "missing": str(root / "missing"),
            "output": str(root / "out")}


numbers = st.one_of(st.integers(-5, 100), st.sampled_from([0, -1, 2**31, 2**63, 10**30, -(10**30)]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["nan", "inf", "-inf", "1e400"]))
words = st.one_of(st.text(max_size=12), st.sampled_from(["", "-", "--", "-x", "--nope", "bisect", "\x00", "a\nb", "é"]))


def _value(draw, places: dict[str, str], real: bool) -> str:
    kinds = ["missing", "file", "empty", "recipe", "output"] + (["checkpoint", "artifact"] if real else [])
    value = draw(st.one_of(numbers, floats, words, st.sampled_from(kinds).map(places.get)))
    return str(value).replace("\x00", "")  # a NUL cannot reach argv: the OS ends the string there


@st.composite
def command_lines(draw, places: dict[str, str]) -> list[str]:
    name = draw(st.sampled_from(sorted(COMMANDS)))
    real = name not in SLOW_WITH_REAL_INPUTS
    params = COMMANDS[name].params
    args: list[str] = [name]
    for param in params:
        if param.param_type_name == "argument" and draw(st.integers(0, 5)):
            args.append(_value(draw, places, real))
    options = [param for param in params if param.param_type_name == "option"]
    for param in draw(st.lists(st.sampled_from(options), max_size=5)) if options else []:
        args.append(draw(st.sampled_from(param.opts + param.secondary_opts)))
        if not param.is_flag:
            args.append(_value(draw, places, real))
    if draw(st.integers(0, 3)) == 0:
        args.insert(draw(st.integers(1, len(args))), _value(draw, places, real))
    return args


def _check(result, args: list[str]) -> None:
    shown = f"lmforge {' '.join(args)!r}:\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    if result.exit_code == 0:
        return
    lines = result.stderr.splitlines()
    if result.exit_code == 2:  # click's usage errors: the usage line, then the problem
        assert any(line.startswith("Usage: ") for line in lines) and "Error" in result.stderr, shown
        return
    assert result.exit_code == 1, shown
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and errors[0] == lines[-1], shown
    assert errors[0].startswith("error: "), shown  # "error (TypeError): …" is a bug that escaped as a non-LmforgeError


@FUZZ
@given(data=st.data())
def test_random_command_lines_fail_with_one_line(places, data):
    args = data.draw(command_lines(places))
    if args[0] == "run" and "--json" not in args:
        args.append("--json")  # the streamed completion and its timing line are not errors
    result = runner.invoke(app, args, catch_exceptions=True)
    _check(result, args)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=st.one_of(numbers, st.integers()), json_flag=st.booleans())
def test_info_context_of_any_size(places, context, json_flag):
    """`info --context N` sizes the KV cache of the artifact's layout for N tokens: any N either
    prints the figure or says the cache is too large to count."""
    args = ["info", places["artifact"], "--context", str(context), *(["--json"] if json_flag else [])]
    result = runner.invoke(app, args, catch_exceptions=True)
    _check(result, args)
    if result.exit_code == 0 and json_flag:
        assert json.loads(result.stdout)["kv_cache_bytes"] > 0
