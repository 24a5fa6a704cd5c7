"""onnxmorph: network morphism for ONNX models (grow a trained network, keep its function).

    import onnxmorph
    parent = onnxmorph.load("model.onnx")
    child = onnxmorph.deepen(parent, layer="conv2", kernel=3, activation="relu")
    report = onnxmorph.verify(parent, child)      # truthy when equal; str() is the table
    onnxmorph.save(child, "child.onnx")

Every registered morph is a function here with the parameters of its CLI subcommand, plus the
verification options of `morph`; none of them changes its argument.
"""

from __future__ import annotations

import inspect as _inspect
from typing import Any

from onnxmorph.contract.passinfra import MorphPass, Param, PassResult
from onnxmorph.contract.registry import REGISTRY, get_pass
from onnxmorph.contract.registry import load as _load_passes
from onnxmorph.errors import (
    InvalidModelError,
    NotApplicable,
    OnnxMorphError,
    UnsafeModelError,
    UsageError,
    VerificationFailed,
)
from onnxmorph.io.loading import digest, load, normalize, save
from onnxmorph.lazy import lazy_attributes
from onnxmorph.version import __version__ as __version__

# Loaded when first used: a command that does not verify (`inspect`) never loads onnxruntime's side.
__getattr__ = lazy_attributes(__name__, {
    "inspect": "onnxmorph.pipeline.inspection",
    "history": "onnxmorph.pipeline.receipt",
    "read_recipe": "onnxmorph.pipeline.recipe",
    "MorphOutcome": "onnxmorph.pipeline.run",
    "VerifyOptions": "onnxmorph.pipeline.run",
    "morph": "onnxmorph.pipeline.run",
    "run_passes": "onnxmorph.pipeline.run",
    "plan": "onnxmorph.pipeline.run",
    "Report": "onnxmorph.verification.report",
    "Verifier": "onnxmorph.verification.verifier",
    "verify": "onnxmorph.verification.verifier",
})


def apply(model: Any, recipe: Any, *, verify: bool = True, verify_each: bool = False, **options: Any) -> Any:
    """Apply a recipe (path or list of steps) to `model`; returns the child (see `run_passes`)."""
    from onnxmorph.pipeline.recipe import read_recipe
    from onnxmorph.pipeline.run import VerifyOptions, run_passes

    opts = VerifyOptions(enabled=verify, **options)
    return run_passes(model, read_recipe(recipe), opts, verify_each=verify_each).child


_VERIFY_KWARGS = ("verify", "atol", "rtol", "trials", "verify_seed", "shapes", "inputs")


def _make_morph_function(name: str, cls: type[MorphPass]) -> Any:
    def function(model: Any, **kwargs: Any) -> Any:
        from onnxmorph.pipeline.run import morph

        child, _ = morph(model, name, **kwargs)
        return child

    params = [_inspect.Parameter("model", _inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for p in cls.params:
        default = _inspect.Parameter.empty if p.required else p.default
        params.append(_inspect.Parameter(p.name, _inspect.Parameter.KEYWORD_ONLY, default=default))
    for key in _VERIFY_KWARGS:
        default = True if key == "verify" else None
        params.append(_inspect.Parameter(key, _inspect.Parameter.KEYWORD_ONLY, default=default))
    function.__signature__ = _inspect.Signature(params)  # type: ignore[attr-defined]
    function.__name__ = function.__qualname__ = name
    lines = [f"{cls.summary}", "", "Returns the verified child (raises VerificationFailed otherwise).", "",
             "Parameters:"]
    lines += [f"    {p.name}: {p.help}" for p in cls.params]
    function.__doc__ = "\n".join(lines)
    return function


for _name, _cls in _load_passes().items():
    globals()[_name] = _make_morph_function(_name, _cls)

__all__ = [
    "InvalidModelError", "MorphOutcome", "MorphPass", "NotApplicable", "OnnxMorphError", "Param",
    "PassResult", "REGISTRY", "Report", "UnsafeModelError", "UsageError", "VerificationFailed",
    "Verifier", "VerifyOptions", "apply", "digest", "get_pass", "history", "inspect", "load",
    "morph", "normalize", "plan", "read_recipe", "run_passes", "save", "verify", *REGISTRY,
]
