"""program.json: an artifact's graph as torch.export's JSON schema, checked before torch reads it.

`torch.export.save` writes a zip whose state-dict, constants and example-input entries are
`torch.save` pickles even when empty, and `torch.export.load` unpickles them (retrying with
`weights_only=False`). Its JSON is not inert either: torch parses symbolic shapes with
`sympy.sympify` (which calls `eval`), resolves node targets by walking attributes of `torch`,
`operator` and `math`, pastes node names into Python source it compiles, and compiles
`guards_code` strings into a function. An artifact may come from a stranger, so lmforge stores
only the JSON (weights live in safetensors) and, before torch sees it, refuses anything outside
what lmforge itself writes: ops outside `aten` and `lmforge` (plus `torch.cond` and integer
arithmetic on sizes), custom-class objects, operator-valued arguments, names that are not
plain identifiers, shape expressions that are not sympy constructor calls over symbols and
literals, guard code, node metadata other than the two keys lmforge reads, and metadata text
with line breaks (code generators copy node annotations into comments of the source they run).
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass, serialize

import lmforge.compiler.ops  # noqa: F401  (registers the lmforge ops that programs call)
from lmforge.errors import LmforgeError

MAX_PROGRAM_BYTES = 256 << 20
KEPT_METADATA = ("custom", "nn_module_stack")  # node roles and the module path, read by layermap
OP_NAMESPACES = ("aten", "lmforge")
DENIED_ATEN_OPS = frozenset({"from_file", "save", "_print", "warn"})  # they touch files or print
HIGHER_ORDER_OPS = frozenset({"torch.ops.higher_order.cond"})
SIZE_ARITHMETIC = frozenset(
    f"_operator.{name}"
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "eq", "ne", "lt", "le", "gt",
                 "ge")
)
REFUSED_ARGUMENTS = ("as_custom_obj", "as_operator", "as_string_to_argument")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f\x85\u2028\u2029]*")  # no line breaks or other control characters
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?")
_NAME_LISTS = ("forward_arg_names",)
_NAMED_VALUES = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values")

# What sympy's srepr writes for the shape expressions torch.export produces.
SYMPY_CONSTRUCTORS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity",
})  # no powers or shifts: Pow(10, 10**18) would make sympy compute for ever
SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "True", "False"})
SYMPY_ASSUMPTIONS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "nonzero", "zero", "integer", "real", "finite", "even",
    "odd", "precision",
})
MAX_EXPRESSION_CHARS = 4096


def _refuse(where: str, problem: str) -> LmforgeError:
    return LmforgeError(f"{where}: {problem}; lmforge refuses to load it (an artifact may not carry code)")


def parse_json(data: bytes, where: str) -> Any:
    """JSON that is UTF-8 and has no duplicate keys (the one a reader keeps is a guess)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        mapping = dict(pairs)
        if len(mapping) != len(pairs):
            seen: set[str] = set()
            repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise LmforgeError(f"{where}: key {repeated[:80]!r} appears more than once")
        return mapping

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LmforgeError(f"{where}: not valid JSON ({str(exc).splitlines()[0]})") from None


def check_op(target: Any, where: str) -> None:
    """Refuse a node target unless it names an op lmforge programs may call."""
    if not isinstance(target, str):
        raise _refuse(where, "a node target is not a string")
    if target in HIGHER_ORDER_OPS or target in SIZE_ARITHMETIC:
        return
    parts = target.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"] or parts[2] not in OP_NAMESPACES:
        raise _refuse(where, f"it calls {target!r}, outside the namespaces {', '.join(OP_NAMESPACES)}")
    namespace, name, overload = parts[2:]
    if namespace == "aten" and name in DENIED_ATEN_OPS:
        raise _refuse(where, f"it calls {target!r}, an op with effects outside its tensors")
    try:
        resolved = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        resolved = None
    qualified = f"{namespace}::{name}" + ("" if overload == "default" else f".{overload}")
    if not isinstance(resolved, torch._ops.OpOverload) or resolved.name() != qualified:
        raise _refuse(where, f"it calls {target!r}, which is not a registered {namespace} operator")


def check_expression(text: Any, where: str) -> None:
    """Refuse a shape expression unless it is sympy constructor calls over symbols and literals.

    torch hands these strings to `sympy.sympify`, which evaluates them as Python."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
        raise _refuse(where, "a shape expression is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _refuse(where, f"shape expression {text[:80]!r} is not an expression") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load, ast.USub)):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SYMPY_CONSTRUCTORS:
            continue
        if isinstance(node, ast.Name) and node.id in SYMPY_CONSTRUCTORS | SYMPY_CONSTANTS:
            continue
        if isinstance(node, ast.keyword) and node.arg in SYMPY_ASSUMPTIONS:
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            continue
        if isinstance(node, ast.Constant) and _plain_constant(node.value):
            continue
        raise _refuse(where, f"shape expression {text[:80]!r} holds {ast.unparse(node)[:60]!r}")


def _plain_constant(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < 1 << 63
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return bool(_IDENTIFIER.fullmatch(value) or _NUMBER.fullmatch(value))
    return False


def check_name(name: Any, where: str) -> None:
    """torch pastes node and attribute names into Python source it compiles."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name) or keyword.iskeyword(name):
        raise _refuse(where, f"{str(name)[:80]!r} is not a plain identifier")


def _check_node(node: dict, where: str) -> None:
    check_op(node.get("target"), where)
    metadata = node.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _refuse(where, "node metadata is not a mapping")
    extra = sorted(set(metadata) - set(KEPT_METADATA))
    if extra:
        raise _refuse(where, f"node metadata {extra[0]!r} is not one lmforge writes")
    for key, value in metadata.items():
        if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
            raise _refuse(where, f"node metadata {key!r} is not a line of printable text")
    if "custom" in metadata:
        _check_annotations(metadata["custom"], where)


def _check_annotations(text: str, where: str) -> None:
    """`custom` holds lmforge's per-node annotations (layer, role, pass). Code generators write
    them into comments of the source they compile, so they must be flat, short and printable."""
    try:
        annotations = json.loads(text)
    except ValueError:
        raise _refuse(where, "node annotations are not JSON") from None
    if not isinstance(annotations, dict):
        raise _refuse(where, "node annotations are not a JSON object")
    for key, value in annotations.items():
        check_name(key, where)
        if isinstance(value, str) and (len(value) > 200 or not _PRINTABLE.fullmatch(value)):
            raise _refuse(where, f"node annotation {key!r} is not a short line of printable text")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise _refuse(where, f"node annotation {key!r} is not a single value")


def _walk(value: Any, where: str) -> None:
    """Check every node, name and shape expression anywhere in the document."""
    if isinstance(value, list):
        for item in value:
            _walk(item, where)
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if key == "nodes":
            for node in item:
                _check_node(node, f"{where} node {str(node.get('name'))[:80]!r}")
        elif key in REFUSED_ARGUMENTS:
            raise _refuse(where, f"it holds an {key} argument (custom objects and operator references)")
        elif key in ("name", "as_name") and item is not None and not (item == "" and "arg" in value):
            check_name(item, where)  # (a positional argument of a higher-order op has the name "")
        elif key == "expr_str":
            check_expression(item, where)
        elif key in _NAME_LISTS:
            for name in item or ():
                check_name(name, where)
        elif key in _NAMED_VALUES:
            for name in item:
                check_name(name, where)
        elif key == "custom_obj_values" and item:
            raise _refuse(where, "it holds custom-class objects")
        if key != "metadata":
            _walk(item, where)


def check_program(document: Any, where: str) -> None:
    """Refuse a serialized program that could make torch run code while reading it."""
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise LmforgeError(f"{where}: not a serialized program")
    try:
        _check_document(document, where)
    except RecursionError:
        raise LmforgeError(f"{where}: the program is nested too deeply") from None
    except (AttributeError, KeyError, TypeError) as exc:
        raise LmforgeError(f"{where}: malformed program ({type(exc).__name__}: {str(exc)[:80]})") from None


def _check_document(document: dict, where: str) -> None:
    if document.get("guards_code"):
        raise _refuse(where, "it carries guard code")
    module = document["graph_module"]
    if module.get("treespec_namedtuple_fields"):
        raise _refuse(where, "it declares namedtuple types")
    signature = module.get("signature") or {}
    for spec in signature.get("input_specs", []):
        if not isinstance(spec, dict) or set(spec) != {"user_input"}:
            raise _refuse(where, f"input {str(spec)[:80]} is not a plain input (weights live in safetensors)")
    for spec in signature.get("output_specs", []):
        if not isinstance(spec, dict) or set(spec) != {"user_output"}:
            raise _refuse(where, f"output {str(spec)[:80]} is not a plain output")
    for name in document.get("range_constraints") or {}:
        check_name(name, where)
    _walk(module, where)


def program_bytes(exported: torch.export.ExportedProgram) -> bytes:
    """The JSON of an exported program whose weights are all inputs, as lmforge stores it."""
    if exported.state_dict or exported.constants:
        names = sorted([*exported.state_dict, *exported.constants])
        raise LmforgeError(f"the program holds tensors outside its weights ({', '.join(names[:3])}); "
                           "they cannot be stored without pickle")
    artifact = serialize(
        exported, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    )
    document = json.loads(artifact.exported_program)
    document["guards_code"] = []  # export re-derives shape guards; lmforge's runtime owns its inputs

    def keep_read_metadata(graph: dict) -> None:
        for node in graph["nodes"]:
            node["metadata"] = {key: node["metadata"][key] for key in KEPT_METADATA if key in node["metadata"]}
            for argument in node["inputs"]:
                if "as_graph" in argument["arg"]:
                    keep_read_metadata(argument["arg"]["as_graph"]["graph"])

    keep_read_metadata(document["graph_module"]["graph"])
    check_program(document, "program")  # a program lmforge could not load again is refused now
    return json.dumps(document, separators=(",", ":")).encode()


def read_program(path: Path) -> torch.export.ExportedProgram:
    """The exported program stored at `path`, after `check_program`; torch reads only the JSON."""
    where, size = str(path), path.stat().st_size
    if size > MAX_PROGRAM_BYTES:
        raise LmforgeError(f"{where}: {size:,} bytes, more than the {MAX_PROGRAM_BYTES:,} a program may take")
    document = parse_json(path.read_bytes(), where)
    check_program(document, where)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, document)
        return ExportedProgramDeserializer().deserialize(serialized, {}, {}, None)
    except Exception as exc:  # torch's own checks: schema version, unknown fields, verifier
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise LmforgeError(f"{where}: torch {torch.__version__} cannot read this program "
                           f"({type(exc).__name__}: {message[:200]}); recompile the artifact") from None
