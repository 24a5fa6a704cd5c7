"""The registry of morph passes, and the one place in the core that loads `onnxmorph.passes`.

A pass registers itself with `@register` when its module is imported; `load()` imports the
passes package once and returns the registry. Everything else in the core asks for passes
through `load()` or `get_pass()`, so no core module depends on the passes' modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from onnxmorph.errors import UsageError

if TYPE_CHECKING:
    from onnxmorph.contract.passinfra import MorphPass

# name -> pass class, filled by the passes' @register as their modules are imported
REGISTRY: dict[str, type[MorphPass]] = {}
_loaded = False


def register(cls: type[MorphPass]) -> type[MorphPass]:
    """Class decorator adding a pass to the registry under its `name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def load() -> dict[str, type[MorphPass]]:
    """The registry, with every pass of `onnxmorph.passes` in it."""
    global _loaded
    if not _loaded:
        _import_passes()
        _loaded = True
    return REGISTRY


def get_pass(name: str) -> type[MorphPass]:
    """The pass registered as `name`; a UsageError listing the known ones otherwise."""
    try:
        return load()[name]
    except KeyError:
        raise UsageError(f"unknown morph '{name}' (known: {', '.join(sorted(REGISTRY))})") from None


def _import_passes() -> None:
    """Import onnxmorph.passes, also from a source checkout shadowing a non-editable install.

    setup.cfg maps the top-level `passes/` folder to `onnxmorph.passes`; run from the project
    root, Python may find the bare `onnxmorph/` folder first, which has no `passes` inside.
    """
    try:
        importlib.import_module("onnxmorph.passes")
    except ModuleNotFoundError as exc:
        source = Path(__file__).resolve().parents[2] / "passes" / "__init__.py"
        if exc.name != "onnxmorph.passes" or not source.is_file():
            raise
        spec = importlib.util.spec_from_file_location(
            "onnxmorph.passes", source, submodule_search_locations=[str(source.parent)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["onnxmorph.passes"] = module
        spec.loader.exec_module(module)
        package = sys.modules["onnxmorph"]
        package.passes = module  # type: ignore[attr-defined]  (what the import system does for a subpackage)
