"""The op table of onnxmorph.train: each ONNX op, per domain and opset, as a function on torch tensors.

An op is registered once per opset where its interface changed (an attribute that became an input,
a new attribute), so a model runs the variant of its own opset:

    @op("Squeeze", since=1)                      # axes is an attribute
    def _squeeze_1(call, x): ...
    @op("Squeeze", since=13)                     # axes is an input
    def _squeeze_13(call, x, axes=None): ...

A function takes the node's `Call` (attributes, opset, a way to refuse) and the node's inputs in
order, None for an omitted optional input; it returns a tensor, or a tuple for several outputs.
The functions live in the modules named after their kind (`ops_elementwise`, `ops_shape`,
`ops_reduce`, `ops_nn`, `ops_norm`, `ops_attention`); `onnxmorph.train.ops` imports them all and
answers which function runs a node, or why none does.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import onnx
import torch
from onnx import helper

from onnxmorph import limits
from onnxmorph.errors import UsageError

__all__ = ["Call", "OpFunction", "Variant", "broadcast", "op", "torch_dtype", "variants"]

OpFunction = Callable[..., Any]


@dataclass(frozen=True)
class Variant:
    """One implementation of an op: from opset `since` on, returning at most `outputs` outputs."""

    since: int
    function: OpFunction
    outputs: int


# (domain, op_type) -> variants sorted by `since`. Filled once, at import, by the `op` decorators.
_TABLE: dict[tuple[str, str], list[Variant]] = {}


def op(*op_types: str, since: int = 1, outputs: int = 1, domain: str = "") -> Callable[[OpFunction], OpFunction]:
    """Register the decorated function for `op_types` from opset `since` on (see the module docstring)."""

    def register(function: OpFunction) -> OpFunction:
        for op_type in op_types:
            found = _TABLE.setdefault((domain, op_type), [])
            if any(v.since == since for v in found):
                raise RuntimeError(f"{domain or 'ai.onnx'}:{op_type} since {since} is registered twice")
            bisect.insort(found, Variant(since, function, outputs), key=lambda v: v.since)
        return function

    return register


def variants(domain: str, op_type: str) -> list[Variant]:
    """The registered variants of an op (empty when the op is not supported)."""
    return list(_TABLE.get(("" if domain == "ai.onnx" else domain, op_type), ()))


def registered() -> list[tuple[str, str]]:
    """Every registered (domain, op_type)."""
    return sorted(_TABLE)


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type."""
    if onnx_type == onnx.TensorProto.BFLOAT16:
        return torch.bfloat16
    try:
        return torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(onnx_type))).dtype
    except (KeyError, TypeError, ValueError):
        known = onnx_type in onnx.TensorProto.DataType.values()
        name = onnx.TensorProto.DataType.Name(onnx_type) if known else onnx_type
        raise UsageError(f"element type {name} has no torch counterpart in onnxmorph.train") from None


def broadcast(*shapes: Sequence[int]) -> list[int]:
    """The numpy broadcast of `shapes`, for sizing (torch.broadcast_shapes costs 30 us a call; this, 1).

    Axes that do not broadcast get the larger size: the op itself then refuses them.
    """
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for shape in shapes:
        for axis, size in enumerate(shape, rank - len(shape)):
            if size != 1 and size > out[axis]:
                out[axis] = size
    return out


def _decoded(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Call:
    """What an op function knows of its node: attributes (strings decoded), opset, outputs wanted.

    `max_bytes` bounds one tensor the node makes (ONNXMORPH_MAX_MODEL_BYTES, read when the module is
    built): an op whose output can be larger than its inputs (sizes read from a tensor's values, a
    broadcast, a gather, a product) calls `room` with the output's shape before allocating it.
    """

    node: onnx.NodeProto
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    max_bytes: int = 0

    @classmethod
    def of(cls, node: onnx.NodeProto, opset: int, max_bytes: int | None = None) -> Call:
        attrs = {a.name: _decoded(helper.get_attribute_value(a)) for a in node.attribute}
        return cls(node, opset, attrs, limits.MODEL_BYTES.value() if max_bytes is None else max_bytes)

    def room(self, shape: Sequence[int], dtype: torch.dtype, what: str = "its output") -> None:
        """Refuse (before it is allocated) a tensor of `shape` and `dtype` over `max_bytes`, or of a negative size."""
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            self.refuse(f"{what} would have the negative size {limits.quote(dims, 120)}")
        nbytes = math.prod(dims) * dtype.itemsize
        if nbytes > self.max_bytes:
            limits.MODEL_BYTES.check(nbytes, f"node '{limits.quote(self.name, 120)}' ({self.node.op_type}): {what} "
                                             f"{limits.quote(dims, 120)}", UsageError)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    @property
    def name(self) -> str:
        return self.node.name or (self.node.output[0] if self.node.output else self.node.op_type)

    @property
    def outputs(self) -> int:
        """How many outputs the node lists (trailing optional ones may be empty names)."""
        return len(self.node.output)

    def wants(self, k: int) -> bool:
        """True when the node's output `k` is used (listed with a name)."""
        return k < len(self.node.output) and bool(self.node.output[k])

    def refuse(self, why: str) -> NoReturn:
        raise UsageError(f"node '{self.name}' ({self.node.op_type}): {why}")
