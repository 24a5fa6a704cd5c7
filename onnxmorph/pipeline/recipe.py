"""Recipes: a JSON (or YAML) list of morph steps applied in order with one verification."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from onnxmorph import limits
from onnxmorph.contract.passinfra import MorphPass
from onnxmorph.contract.registry import get_pass
from onnxmorph.errors import UsageError


def read_recipe(source: str | os.PathLike | list[Any]) -> list[MorphPass]:
    """Parse a recipe into passes. A recipe is a list of `{"morph": NAME, PARAM: VALUE, ...}`.

    A top-level object `{"steps": [...]}` is accepted too. YAML files (.yaml/.yml) need PyYAML.
    """
    label = "recipe"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = limits.quote(path)
        data = _parse(path, _read_text(path, label), label)
    else:
        data = source
    if isinstance(data, dict) and "steps" in data:
        data = data["steps"]
    if not isinstance(data, list) or not data:
        raise UsageError(f"{label}: a recipe is a non-empty list of steps")
    limits.RECIPE_STEPS.check(len(data), f"{label}: {len(data)} steps")
    passes = []
    for k, step in enumerate(data, 1):
        if not isinstance(step, dict):
            raise UsageError(f"{label}: step {k} is a {type(step).__name__}, not an object")
        params = dict(step)
        name = params.pop("morph", None)
        if not isinstance(name, str):
            raise UsageError(f"{label}: step {k} has no \"morph\" name")
        _check_values(params, f"{label}: step {k}")
        if "output" in params or "model" in params:
            raise UsageError(f"{label}: step {k}: a step takes morph parameters, not files")
        try:
            passes.append(get_pass(name)(**params))
        except UsageError as exc:
            raise UsageError(f"{label}: step {k}: {exc}") from None
    return passes


def _read_text(path: Path, label: str) -> str:
    if not path.is_file():
        raise UsageError(f"{label}: no such recipe file")
    limits.RECIPE_BYTES.check(path.stat().st_size, label)
    with open(path, "rb") as f:  # the size may have changed since stat(): read no more than the limit
        data = f.read(limits.RECIPE_BYTES.value() + 1)
    limits.RECIPE_BYTES.check(len(data), label)
    return data.decode("utf-8", errors="replace")


def _parse(path: Path, text: str, label: str) -> Any:
    _check_nesting(text, label)
    if path.suffix.lower() in (".yaml", ".yml"):
        return _parse_yaml(text, label)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{label}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except ValueError as exc:
        raise UsageError(f"{label}: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid value in a recipe")


def _check_nesting(text: str, label: str) -> None:
    """Refuse brackets nested deeper than a recipe needs, before a recursive parser sees them."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    # Counted naively (brackets inside strings too): only ever an overestimate.
    if deepest > limits.MAX_RECIPE_DEPTH:
        raise UsageError(f"{label}: nested {deepest} deep; a recipe is a list of flat steps "
                         f"(at most {limits.MAX_RECIPE_DEPTH} levels)")


def _parse_yaml(text: str, label: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UsageError(f"{label}: YAML recipes need PyYAML (pip install pyyaml); use JSON") from None
    try:
        # Aliases can expand a few hundred bytes into gigabytes ("billion laughs"): refused outright,
        # and so is deep block nesting, which has no brackets for _check_nesting to count.
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise UsageError(f"{label}: YAML aliases (*name) are not allowed in a recipe")
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > limits.MAX_RECIPE_DEPTH:
                    raise UsageError(f"{label}: nested more than {limits.MAX_RECIPE_DEPTH} levels deep")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{label}: not valid YAML ({limits.quote(str(exc).splitlines()[0])})") from None


def _check_values(params: dict[str, Any], where: str) -> None:
    """Parameters are names, whole numbers, finite numbers or short lists of them."""
    for key, value in params.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise UsageError(f"{where}: {limits.quote(key, 60)} is {item}, not a finite number")
            if isinstance(item, (dict, list)):
                raise UsageError(f"{where}: {limits.quote(key, 60)} holds a nested value")
