"""The receipt: what was done to a child, recorded in its metadata_props."""

from __future__ import annotations

import json
from typing import Any

import onnx

HISTORY_KEY = "onnxmorph.history"


def history(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Every morph recorded in `model`, oldest first (empty for a model onnxmorph never touched)."""
    for prop in model.metadata_props:
        if prop.key == HISTORY_KEY:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError:
                return []
            return data if isinstance(data, list) else []
    return []


def append(model: onnx.ModelProto, record: dict[str, Any]) -> None:
    """Add `record` to the history stored in `model` (which the caller owns)."""
    records = history(model) + [record]
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
