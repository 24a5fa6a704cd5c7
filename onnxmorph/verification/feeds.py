"""What verification feeds a model: sizes for dynamic axes, token ids within their vocabulary, masks of ones.

Works on the model's header (weights' dims without their data), so `verify` by path never reads
the weights. Rules, stated in the README:

* A dynamic axis 0 is the batch: DEFAULT_BATCH. A dynamic sequence axis (axis 1 of an input of
  rank 2 or 3, or an axis named like `seq`, `len`, `time`, `token`, `position`) is
  DEFAULT_SEQUENCE. Inputs whose dynamic axes share a name share a size; a size given with
  `--shape` for one input is taken by the same-named axes of the others, and by the same axis of
  inputs of the same rank that name theirs differently (the dynamo exporter does).
* An integer input that indexes a `Gather` (directly or through Reshape, Cast, Unsqueeze,
  Squeeze, Flatten, Identity) is drawn within the table's first axis: token ids in the vocabulary.
* An attention mask (an input named like `mask`, or an integer/bool input that feeds mask
  arithmetic: Where, And, Or, Not, a comparison, `1 - m`) is all ones.
* Other integers are drawn from [0, 10), booleans uniformly, floats uniformly from INPUT_RANGE.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxmorph import limits
from onnxmorph.errors import UnsafeModelError, UsageError
from onnxmorph.io import loading as mio
from onnxmorph.numerics.dtypes import is_float
from onnxmorph.verification.interface import declared_dims

DEFAULT_BATCH = 2
DEFAULT_SEQUENCE = 16
INPUT_RANGE = (-1.0, 1.0)
INTEGER_RANGE = (0, 10)

_SEQUENCE_NAME = re.compile(r"seq|len|time|token|position|past|frame", re.IGNORECASE)
# Ops that carry values through unchanged (up to layout) between an input and its real use.
_PASS_THROUGH = {"Reshape", "Cast", "CastLike", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand",
                 "Transpose", "Slice"}
_INDEX_PASS_THROUGH = _PASS_THROUGH - {"Expand", "Transpose", "Slice"}
_MASK_OPS = {"Where", "And", "Or", "Not", "Xor", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"}
_SEARCH_DEPTH = 8


@dataclass(frozen=True)
class Draw:
    """How one input is drawn: kind 'float', 'ids', 'mask', 'int' or 'bool', with its range."""

    kind: str
    low: float = 0
    high: float = 0
    source: str = ""

    def describe(self, dtype: np.dtype) -> str:
        if self.kind == "float":
            return f"uniform [{self.low:g}, {self.high:g})"
        if self.kind == "ids":
            return f"token ids in [0, {int(self.high)}) ({self.source})"
        if self.kind == "mask":
            return f"ones ({self.source})"
        if self.kind == "bool":
            return "random booleans"
        return f"integers in [{int(self.low)}, {int(self.high)})"


def _is_sequence_axis(axis: int, rank: int, name: str | None) -> bool:
    return (axis == 1 and rank in (2, 3)) or bool(name and _SEQUENCE_NAME.search(name))


def _check_given(info: onnx.ValueInfoProto, declared: list, given: list[int]) -> None:
    if len(given) != len(declared) and info.type.tensor_type.HasField("shape"):
        raise UsageError(f"--shape {info.name}: {len(given)} dimensions given, the input has {len(declared)}")
    for axis, (want, have) in enumerate(zip(declared, given)):
        if isinstance(want, int) and want != have:
            raise UsageError(f"--shape {info.name}: dimension {axis} is fixed at {want}, not {have}")


def resolve_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Concrete input shapes: declared static dims, then `shapes`, then the stated defaults (see module doc)."""
    shapes = {k: list(v) for k, v in (shapes or {}).items()}
    inputs = mio.true_inputs(model)
    names = {i.name for i in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise UsageError(
            f"--shape names input '{unknown[0]}', which the model does not have (inputs: {', '.join(sorted(names))})"
        )
    bound: dict[str, int] = {}  # dim name -> size, from the user's shapes first
    by_axis: dict[tuple[int, int], set[int]] = {}  # (rank, axis) -> sizes the user gave there
    for info in inputs:
        if not info.type.HasField("tensor_type"):
            raise UsageError(f"input '{info.name}' is not a tensor; verification needs --inputs")
        if info.name in shapes:
            declared = declared_dims(info)
            _check_given(info, declared, shapes[info.name])
            for axis, (d, size) in enumerate(zip(declared, shapes[info.name])):
                if isinstance(d, str):
                    bound.setdefault(d, size)
                by_axis.setdefault((len(declared), axis), set()).add(size)
    resolved: dict[str, list[int]] = {}
    for info in inputs:
        if info.name in shapes:
            resolved[info.name] = shapes[info.name]
            continue
        declared = declared_dims(info)
        dims = []
        for axis, d in enumerate(declared):
            if isinstance(d, int):
                dims.append(d)
                continue
            size = bound.get(d) if isinstance(d, str) else None
            same_axis = by_axis.get((len(declared), axis), set())
            if size is None and len(same_axis) == 1:
                size = next(iter(same_axis))
            if size is None and axis == 0:
                size = DEFAULT_BATCH
            elif size is None and _is_sequence_axis(axis, len(declared), d):
                size = DEFAULT_SEQUENCE
            elif size is None:
                example = "x".join(str(x) if isinstance(x, int) else str(DEFAULT_BATCH if k == 0 else 32)
                                   for k, x in enumerate(declared))
                raise UsageError(
                    f"input '{info.name}' has a dynamic dimension {d or '?'} at axis {axis} with no default "
                    f"(only batch and sequence axes have one); give its size, e.g. --shape {info.name}:{example}"
                )
            if isinstance(d, str):
                bound.setdefault(d, size)
            dims.append(size)
        resolved[info.name] = dims
    return resolved


class _Uses:
    """Who reads each tensor of a model's main graph, and its constant tables' dims (no data needed)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((node, k))
        self.dims = {t.name: list(t.dims) for t in model.graph.initializer}
        self.constants: set[str] = set(self.dims)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                self.constants.add(node.output[0])
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None and value.HasField("t"):
                    self.dims[node.output[0]] = list(value.t.dims)

    def walk(self, name: str, through: set[str]) -> list[tuple[onnx.NodeProto, int]]:
        """Every (node, input index) that reads `name`'s values, looking through `through` ops."""
        found, frontier, seen = [], [name], {name}
        for _ in range(_SEARCH_DEPTH):
            following = []
            for tensor in frontier:
                for node, k in self.readers.get(tensor, []):
                    if node.op_type in through and k == 0:
                        following += [o for o in node.output if o and o not in seen]
                        seen.update(node.output)
                    else:
                        found.append((node, k))
            frontier = following
            if not frontier:
                break
        return found


def _gather_bound(uses: _Uses, name: str) -> tuple[int, str] | None:
    """The smallest table size among the Gathers that `name` indexes (through layout ops), with the first's name."""
    best: tuple[int, str] | None = None
    for node, k in uses.walk(name, _INDEX_PASS_THROUGH):
        if node.op_type != "Gather" or k != 1 or node.input[0] not in uses.dims:
            continue
        dims = uses.dims[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if not dims or not -len(dims) <= axis < len(dims):
            continue
        size = max(1, int(dims[axis]))
        if best is None or size < best[0]:
            best = (size, f"the {size}-row table of Gather '{node.name or node.output[0]}'")
    return best


def _feeds_mask_arithmetic(uses: _Uses, name: str) -> bool:
    for node, k in uses.walk(name, _PASS_THROUGH):
        if node.op_type in _MASK_OPS and not (node.op_type == "Where" and k != 0):
            return True
        if node.op_type == "Sub" and k == 1 and node.input[0] in uses.constants:
            return True  # 1 - mask
    return False


def input_draws(model: onnx.ModelProto) -> dict[str, Draw]:
    """How `random_inputs` draws each input of `model` (see the module doc)."""
    uses = _Uses(model)
    draws = {}
    for info in mio.true_inputs(model):
        dtype = np_dtype(info.type.tensor_type.elem_type, info.name)
        masky = "mask" in info.name.lower()
        if is_float(dtype):
            draws[info.name] = Draw("float", *INPUT_RANGE)
        elif dtype.kind not in "iub":
            raise UsageError(f"input '{info.name}' of type {dtype} needs --inputs")
        elif dtype.kind in "iu" and (bound := _gather_bound(uses, info.name)) is not None:
            draws[info.name] = Draw("ids", 0, bound[0], bound[1])
        elif masky or _feeds_mask_arithmetic(uses, info.name):
            draws[info.name] = Draw("mask", source="an attention mask" if masky else "it feeds mask arithmetic")
        elif dtype.kind == "b":
            draws[info.name] = Draw("bool")
        else:
            draws[info.name] = Draw("int", *INTEGER_RANGE)
    return draws


def np_dtype(elem_type: int, name: str = "") -> np.dtype:
    """The numpy type of an ONNX element type; UsageError when numpy has none."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception as exc:
        which = f"input '{name}' type" if name else "input type"
        raise UsageError(f"{which} {onnx.TensorProto.DataType.Name(elem_type)} is not supported") from exc


def integer_bounds(model: onnx.ModelProto, name: str) -> tuple[int, int]:
    """A valid range [low, high) for integer input `name`: its vocabulary when it indexes a table."""
    bound = _gather_bound(_Uses(model), name)
    return (0, bound[0]) if bound is not None else INTEGER_RANGE


def random_inputs(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], rng: np.random.Generator,
    draws: Mapping[str, Draw] | None = None,
) -> dict[str, np.ndarray]:
    """One feed of seeded inputs, drawn as `input_draws` says."""
    draws = draws if draws is not None else input_draws(model)
    feed = {}
    for info in mio.true_inputs(model):
        dtype = np_dtype(info.type.tensor_type.elem_type, info.name)
        shape = tuple(shapes[info.name])
        # A declared or --shape size can be absurd; refuse it rather than let numpy try.
        limits.INPUT_BYTES.check(math.prod(shape) * max(dtype.itemsize, 8),
                                 f"input '{info.name}' of shape {list(shape)}", UnsafeModelError)
        draw = draws[info.name]
        # np.asarray: a 0-d draw is a numpy scalar, which onnxruntime does not take as a tensor.
        if draw.kind == "float":
            feed[info.name] = np.asarray(rng.uniform(draw.low, draw.high, size=shape), dtype=dtype)
        elif draw.kind == "mask":
            feed[info.name] = np.ones(shape, dtype)
        elif draw.kind == "bool":
            feed[info.name] = np.asarray(rng.random(size=shape) < 0.5)
        else:
            feed[info.name] = np.asarray(rng.integers(int(draw.low), int(draw.high), size=shape), dtype=dtype)
    return feed


def describe_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                    draws: Mapping[str, Draw] | None = None) -> str:
    """One phrase per input saying what was drawn: `input_ids int64[2x16] token ids in [0, 100) (...)`."""
    draws = draws if draws is not None else input_draws(model)
    parts = []
    for info in mio.true_inputs(model):
        dtype = np_dtype(info.type.tensor_type.elem_type, info.name)
        shape = "x".join(map(str, shapes[info.name])) or "scalar"
        parts.append(f"{info.name} {dtype}[{shape}] {draws[info.name].describe(dtype)}")
    return "; ".join(parts)
