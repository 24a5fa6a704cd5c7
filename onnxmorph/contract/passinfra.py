"""The pass contract: parameters, applicability checks (requires/call/ensures), results, size estimates."""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from onnxmorph.errors import OnnxMorphError, UsageError
from onnxmorph.graph.core import (
    LayerInfo,
    ModelOrAnalysis,
    dtype_of,
    find_layer,
    model_of,
    opset,
    read_view,
    weight_index,
)
from onnxmorph.limits import quote
from onnxmorph.verification.interface import interface_problems

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a pass: its Python name, CLI flag, parser, default and help."""

    name: str
    parse: Callable[[Any], Any]
    help: str
    default: Any = REQUIRED
    choices: Sequence[str] | None = None
    flag: str | None = None
    metavar: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class PassResult:
    """What a pass returns: the new model and whether it differs from the input."""

    model: onnx.ModelProto
    modified: bool


class MorphPass(abc.ABC):
    """Base class of a morph: parameters in __init__, checks in requires(), work in call().

    The contract (after onnx-ir's pass infrastructure and onnxscript's rewrite rules):
    `requires(model)` does every check and returns the plan, or raises NotApplicable with a
    one-line reason naming the node or tensor in the way; `call(model, plan)` only applies the
    plan: it never mutates `model` and returns a PassResult with a new model; `ensures` checks
    the post-conditions. `model` may be an `Analysis` (graph.Analysis), which shares the graph
    view, shapes and memoised facts among the passes that look at one model.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        known = {p.name for p in self.params}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(
                f"{self.name}: unknown parameter '{unknown[0]}' (known: {', '.join(sorted(known))})"
            )
        self.config: dict[str, Any] = {}
        for p in self.params:
            if p.name in kwargs and kwargs[p.name] is not None:
                raw = kwargs[p.name]
                try:
                    value = p.parse(raw)
                except UsageError:
                    raise
                except (TypeError, ValueError) as exc:
                    raise UsageError(f"{self.name}: bad value {raw!r} for {p.name}: {exc}") from exc
            elif p.required:
                raise UsageError(f"{self.name}: missing parameter '{p.name}' ({p.cli_flag})")
            else:
                value = p.default
            if p.choices is not None and value is not None and value not in p.choices:
                raise UsageError(
                    f"{self.name}: {p.name} must be one of {', '.join(p.choices)}, not {value!r}"
                )
            self.config[p.name] = value
            setattr(self, p.name, value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    @abc.abstractmethod
    def requires(self, model: ModelOrAnalysis) -> Any:
        """The plan of this morph on `model`; NotApplicable unless it can morph `model` exactly."""

    @abc.abstractmethod
    def call(self, model: ModelOrAnalysis, plan: Any) -> PassResult:
        """Apply `plan` (from `requires(model)`) to a copy of `model`."""

    def ensures(self, model: ModelOrAnalysis, result: PassResult) -> None:
        """The post-conditions of every pass; a failure is a bug in onnxmorph, not bad input."""
        parent = model_of(model)
        if result.model is parent:
            raise OnnxMorphError(f"{self!r} returned its input instead of a copy (a bug in onnxmorph)")
        problems = interface_problems(parent, result.model)
        if problems:
            raise OnnxMorphError(f"{self!r} changed the model's interface: {problems[0]} (a bug in onnxmorph)")
        version = opset(parent)
        for node in result.model.graph.node:
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, version, ""):
                raise OnnxMorphError(f"{self!r} made a {node.op_type} node, which opset {version} does not "
                                     "have (a bug in onnxmorph)")
        if result.modified != differs(parent, result.model):
            raise OnnxMorphError(f"{self!r} said modified={result.modified} wrongly (a bug in onnxmorph)")

    def apply(self, model: ModelOrAnalysis) -> PassResult:
        """requires, call, ensures: the whole pass on `model`."""
        plan = self.requires(model)
        result = self.call(model, plan)
        self.ensures(model, result)
        return result

    def new_weights(self, model: onnx.ModelProto) -> tuple[int, int]:
        """(bytes, layers) this pass will add, sized from its parameters before anything is allocated.

        `run_passes` refuses a pass over `limits.NEW_BYTES` or `limits.NEW_LAYERS` before its
        `requires` runs: a width of 10^8 must be refused, not attempted. An estimate within a
        small factor is enough; (0, 0) when the layer is not found (requires says why).
        """
        return 0, 0

    def __call__(self, model: ModelOrAnalysis) -> PassResult:
        return self.apply(model)

    @classmethod
    def probe(cls, model: onnx.ModelProto, layer: LayerInfo) -> MorphPass | None:
        """A pass instance that `inspect` uses to ask whether this morph applies to `layer`.

        None when the pass is not about one layer (inspect then says nothing for it).
        """
        return None

    def describe(self, plan: Any) -> dict[str, Any]:
        """Extra facts `inspect` shows when this pass applies, from its plan (e.g. the coupled layers)."""
        return {}


def differs(before: onnx.ModelProto, after: onnx.ModelProto) -> bool:
    """Whether `after` computes with other nodes or weights than `before` (`modified`, computed)."""
    if len(before.graph.node) != len(after.graph.node) or len(before.graph.initializer) != len(after.graph.initializer):
        return True
    if any(a != b for a, b in zip(before.graph.node, after.graph.node)):
        return True
    return any(a is not b and a != b for a, b in zip(before.graph.initializer, after.graph.initializer))


def layer_weight(model: onnx.ModelProto, layer: str) -> tuple[tuple[int, ...], int] | None:
    """(shape, itemsize) of the weight of `layer`, or None when it is not a layer with a constant weight."""
    try:
        node = find_layer(read_view(model), layer)
    except Exception:
        return None
    k = weight_index(node)
    if k is None or len(node.inputs) <= k or not isinstance(node.inputs[k], gs.Constant):
        return None
    weight = node.inputs[k]
    return tuple(int(d) for d in weight.shape), dtype_of(weight).itemsize


def new_layer_bytes(model: onnx.ModelProto, layer: str, width: int | None, kernel: Sequence[int] | None,
                    count: int = 1) -> int:
    """An upper estimate of the bytes of `count` new layers of `width` channels beside `layer`.

    Each new layer reads or writes the layer's input and output channels through `width`
    channels with kernels no larger than the layer's or `kernel`: width * (in + out) * taps.
    """
    found = layer_weight(model, layer)
    if found is None or len(found[0]) < 2:
        return 0
    (a, b, *k), itemsize = found
    taps = max(math.prod(k), math.prod(kernel)) if k and kernel else math.prod(k)
    return count * (width or max(a, b)) * (a + b) * taps * itemsize


# --------------------------------------------------------------------------- parameter parsers


def positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise UsageError(f"expected a positive whole number, got {value!r}")
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"expected a positive whole number, got {quote(repr(value), 60)}") from None
    if number <= 0:
        raise UsageError(f"expected a positive whole number, got {value!r}")
    return number


def non_negative_int(value: Any) -> int:
    if value in (0, "0"):
        return 0
    return positive_int(value)


def layer_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"expected a layer name, got {value!r}")
    return value


def dims(value: Any) -> tuple[int, ...]:
    """`5`, `"5"`, `"1x7"`, `[1, 7]` -> a tuple of positive ints (one per spatial axis or one for all)."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\s*[xX,]\s*-?\d+)*\s*", value):
        parts = [int(p) for p in re.split(r"[xX,]", value)]
    else:
        raise UsageError(f"expected a size like 3 or 1x7, got {value!r}")
    return tuple(positive_int(p) for p in parts)


def int_list(value: Any) -> tuple[int, ...]:
    """`"1,3,5"` or `[1, 3, 5]` -> (1, 3, 5), each positive."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if not parts:
        raise UsageError("expected a comma-separated list of sizes")
    return tuple(positive_int(p) for p in parts)


def seed(value: Any) -> int:
    return non_negative_int(value)


SEED = Param("seed", seed, "random seed of the new weights", default=0, metavar="S")
