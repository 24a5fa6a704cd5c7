"""The receipt: what was done to a child, recorded in its metadata_props, and the one parser that reads it back.

A receipt is a JSON list of records, oldest first. A morph run's record:

    {"tool": "onnxmorph X.Y", "parent_sha256": "<64 hex>",
     "steps": [{"pass": NAME, "params": {...}}, ...],
     "verification": null | {"passed": bool, "max_abs_error": number, "max_rel_error": number,
                             "trials": int, "seed": int, "inputs": str,
                             "outputs": [{"name": str, "max_abs_error": number, ...}, ...]}}

A search's training run adds `"kind": "train"` and `"result": {name: number}`. Everything that
reads a receipt (`inspect`, `diff`, its page, the search, `append`) goes through `history`, which
checks this shape and refuses anything else in one line (InvalidModelError): a receipt is read
from a file that anyone may have edited, and a record that is not what the formatters expect
must not reach them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import onnx

from onnxmorph.errors import InvalidModelError
from onnxmorph.limits import quote

HISTORY_KEY = "onnxmorph.history"

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Numbers of a verification or a training result that the formatters print with `:.2e`/`:.4f`.
_REQUIRED_FIGURES = ("max_abs_error", "max_rel_error")
_OUTPUT_FIGURES = ("max_abs_error", "max_rel_error", "atol", "rtol")


class _Malformed(Exception):
    """A record that is not a receipt record; the message says where and why."""


def history(model: onnx.ModelProto, source: str = "the model") -> list[dict[str, Any]]:
    """Every run recorded in `model`'s receipt, oldest first (empty for a model onnxmorph never touched).

    Raises InvalidModelError, naming `source`, when the receipt is there but malformed.
    """
    for prop in model.metadata_props:
        if prop.key == HISTORY_KEY:
            return parse(prop.value, source)
    return []


def parse(text: str | bytes, source: str = "the model") -> list[dict[str, Any]]:
    """The records of a receipt's JSON text, each checked (see the module's docstring)."""
    where = f"{source}: its onnxmorph receipt (metadata '{HISTORY_KEY}')"
    if isinstance(text, bytes):  # protobuf hands back a string field that is not UTF-8 as bytes
        raise InvalidModelError(f"{where} is not UTF-8 text")
    try:
        data = json.loads(text)
    except RecursionError:
        raise InvalidModelError(f"{where} is nested too deeply to be a receipt") from None
    except ValueError as exc:  # invalid JSON, or an integer of more digits than Python converts
        raise InvalidModelError(f"{where} is not valid JSON ({quote(exc, 120)})") from None
    try:
        if not isinstance(data, list):
            raise _Malformed(f"is a JSON {_kind(data)}, not a list of records")
        for k, record in enumerate(data, 1):
            _check_record(record, f"record {k}")
    except _Malformed as exc:
        raise InvalidModelError(f"{where} is malformed: {exc}") from None
    return data


def append(model: onnx.ModelProto, record: dict[str, Any], source: str = "the parent") -> None:
    """Add `record` to the history stored in `model` (which the caller owns)."""
    records = history(model, source) + [record]
    text = json.dumps(records, sort_keys=True, default=_jsonable)
    for prop in model.metadata_props:
        if prop.key == HISTORY_KEY:
            prop.value = text
            return
    model.metadata_props.add(key=HISTORY_KEY, value=text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# --------------------------------------------------------------------------- the checks


def _kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{where} is a {_kind(value)}, not an object")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"{where} is a {_kind(value)}, not a string")
    return value


def _number(value: Any, where: str, *, optional: bool = False) -> None:
    """A JSON number that prints as a float: not a boolean, not an integer too large for a float."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed(f"{where} is a {_kind(value)}, not a number")
    try:
        float(value)
    except OverflowError:
        raise _Malformed(f"{where} is a number too large to print") from None


def _integer(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Malformed(f"{where} is a {_kind(value)}, not a whole number")


def _check_record(record: Any, where: str) -> None:
    record = _object(record, where)
    for key in ("tool", "kind"):
        if key in record:
            _string(record[key], f"{where}: {key}")
    if "parent_sha256" in record and not _SHA256.fullmatch(_string(record["parent_sha256"], f"{where}: parent_sha256")):
        raise _Malformed(f"{where}: parent_sha256 is not a SHA-256 digest (64 hexadecimal digits)")
    steps = record.get("steps", [])
    if not isinstance(steps, list):
        raise _Malformed(f"{where}: steps is a {_kind(steps)}, not a list")
    for j, step in enumerate(steps, 1):
        step = _object(step, f"{where}, step {j}")
        _string(step.get("pass"), f"{where}, step {j}: pass")
        _object(step.get("params"), f"{where}, step {j}: params")
    verification = record.get("verification")
    if verification is not None:
        _check_verification(_object(verification, f"{where}: verification"), f"{where}: verification")
    if "result" in record:
        for name, value in _object(record["result"], f"{where}: result").items():
            _number(value, f"{where}: result {quote(name, 40)}")


def _check_verification(ver: dict[str, Any], where: str) -> None:
    if not isinstance(ver.get("passed"), bool):
        raise _Malformed(f"{where}: passed is {'missing' if 'passed' not in ver else 'not true or false'}")
    for key in _REQUIRED_FIGURES:
        if key not in ver:
            raise _Malformed(f"{where}: {key} is missing")
        _number(ver[key], f"{where}: {key}")
    for key in ("trials", "seed"):
        if key in ver:
            _integer(ver[key], f"{where}: {key}")
    if ver.get("inputs") is not None:
        _string(ver["inputs"], f"{where}: inputs")
    outputs = ver.get("outputs", [])
    if not isinstance(outputs, list):
        raise _Malformed(f"{where}: outputs is a {_kind(outputs)}, not a list")
    for j, output in enumerate(outputs, 1):
        output = _object(output, f"{where}, output {j}")
        if "name" in output:
            _string(output["name"], f"{where}, output {j}: name")
        for key in _OUTPUT_FIGURES:
            _number(output.get(key), f"{where}, output {j}: {key}", optional=True)
