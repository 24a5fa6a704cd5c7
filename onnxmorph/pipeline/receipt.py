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
from typing import Any

import onnx

from onnxmorph.errors import InvalidModelError
from onnxmorph.fields import Malformed, as_digest, as_integer, as_list, as_number, as_object, as_string
from onnxmorph.limits import quote

HISTORY_KEY = "onnxmorph.history"

# Numbers of a verification or a training result that the formatters print with `:.2e`/`:.4f`.
_REQUIRED_FIGURES = ("max_abs_error", "max_rel_error")
_OUTPUT_FIGURES = ("max_abs_error", "max_rel_error", "atol", "rtol")


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
        for k, record in enumerate(as_list(data, "the receipt"), 1):
            _check_record(record, f"record {k}")
    except Malformed as exc:
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


def _check_record(record: Any, where: str) -> None:
    record = as_object(record, where)
    for key in ("tool", "kind"):
        if key in record:
            as_string(record[key], f"{where}: {key}")
    if "parent_sha256" in record:
        as_digest(record["parent_sha256"], f"{where}: parent_sha256")
    for j, step in enumerate(as_list(record.get("steps", []), f"{where}: steps"), 1):
        step = as_object(step, f"{where}, step {j}")
        as_string(step.get("pass"), f"{where}, step {j}: pass")
        as_object(step.get("params"), f"{where}, step {j}: params")
    verification = record.get("verification")
    if verification is not None:
        _check_verification(as_object(verification, f"{where}: verification"), f"{where}: verification")
    if "result" in record:
        for name, value in as_object(record["result"], f"{where}: result").items():
            as_number(value, f"{where}: result {quote(name, 40)}")


def _check_verification(ver: dict[str, Any], where: str) -> None:
    if not isinstance(ver.get("passed"), bool):
        raise Malformed(f"{where}: passed is {'missing' if 'passed' not in ver else 'not true or false'}")
    for key in _REQUIRED_FIGURES:
        if key not in ver:
            raise Malformed(f"{where}: {key} is missing")
        as_number(ver[key], f"{where}: {key}")
    for key in ("trials", "seed"):
        if key in ver:
            as_integer(ver[key], f"{where}: {key}")
    if ver.get("inputs") is not None:
        as_string(ver["inputs"], f"{where}: inputs")
    for j, output in enumerate(as_list(ver.get("outputs", []), f"{where}: outputs"), 1):
        output = as_object(output, f"{where}, output {j}")
        if "name" in output:
            as_string(output["name"], f"{where}, output {j}: name")
        for key in _OUTPUT_FIGURES:
            as_number(output.get(key), f"{where}, output {j}: {key}", optional=True)
