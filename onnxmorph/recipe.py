"""Recipes: a JSON (or YAML) list of morph steps applied in order with one verification."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onnxmorph.errors import UsageError
from onnxmorph.passinfra import MorphPass, get_pass


def read_recipe(source: str | os.PathLike | list[Any]) -> list[MorphPass]:
    """Parse a recipe into passes. A recipe is a list of `{"morph": NAME, PARAM: VALUE, ...}`.

    A top-level object `{"steps": [...]}` is accepted too. YAML files (.yaml/.yml) need PyYAML.
    """
    label = "recipe"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise UsageError(f"{path}: no such recipe file")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"{path}: YAML recipes need PyYAML (pip install pyyaml); use JSON") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    else:
        data = source
    if isinstance(data, dict) and "steps" in data:
        data = data["steps"]
    if not isinstance(data, list) or not data:
        raise UsageError(f"{label}: a recipe is a non-empty list of steps")
    passes = []
    for k, step in enumerate(data, 1):
        if not isinstance(step, dict):
            raise UsageError(f"{label}: step {k} is a {type(step).__name__}, not an object")
        params = dict(step)
        name = params.pop("morph", None)
        if not isinstance(name, str):
            raise UsageError(f"{label}: step {k} has no \"morph\" name")
        if "output" in params or "model" in params:
            raise UsageError(f"{label}: step {k}: a step takes morph parameters, not files")
        try:
            passes.append(get_pass(name)(**params))
        except UsageError as exc:
            raise UsageError(f"{label}: step {k}: {exc}") from None
    return passes
