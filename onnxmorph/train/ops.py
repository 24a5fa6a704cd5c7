"""Torch implementations of the ONNX tensor, shape and mask ops that exported language models use (for onnxmorph.train).

Each entry of `OPS` is `function(node, attrs, inputs, opset)` like those in `onnxmorph.train`;
it returns a tensor, or a tuple for an op with several outputs (Split). Shape computations run on
the device of the tensors they read, so a module moved to a GPU stays there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnxmorph.errors import UsageError

__all__ = ["OPS", "torch_dtype"]


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type (through numpy)."""
    return torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _constant(node: onnx.NodeProto, a: dict[str, Any]) -> torch.Tensor:
    attr = node.attribute[0] if node.attribute else None
    if attr is None or attr.name not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        raise UsageError(f"node {node.name}: Constant without a dense value is not supported by onnxmorph.train")
    if attr.name == "value":
        return torch.from_numpy(np.array(numpy_helper.to_array(a["value"])))
    dtype = np.float32 if attr.name.startswith("value_float") else np.int64
    return torch.from_numpy(np.array(a[attr.name], dtype=dtype))


def _constant_of_shape(a: dict[str, Any], shape: torch.Tensor) -> torch.Tensor:
    value = np.array(numpy_helper.to_array(a["value"])) if "value" in a else np.zeros(1, np.float32)
    fill = torch.from_numpy(value.reshape(-1)[:1]).to(shape.device)
    return fill.reshape(()).expand(_ints(shape)).clone()


def _gather(a: dict[str, Any], data: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = a.get("axis", 0) % data.dim()
    size = data.shape[axis]
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + size, flat)
    picked = data.index_select(axis, flat)
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))


def _slice(node: onnx.NodeProto, a: dict[str, Any], inputs: Sequence[Any], opset: int) -> torch.Tensor:
    x = inputs[0]
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 else None
        steps = _ints(inputs[4]) if len(inputs) > 4 else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index: list[Any] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 1:
            raise UsageError(f"node {node.name}: Slice with step {step} is not supported by onnxmorph.train")
        size = x.shape[axis]
        # ONNX clamps out-of-range starts and ends (exporters write INT64_MAX for "to the end").
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        index[axis] = slice(start, max(start, end))
    return x[tuple(index)]


def _split(a: dict[str, Any], inputs: Sequence[Any], opset: int, count: int) -> tuple[torch.Tensor, ...]:
    x = inputs[0]
    axis = a.get("axis", 0)
    sizes = a.get("split") if opset < 13 else _ints(inputs[1]) if len(inputs) > 1 else None
    if sizes is None:
        length = x.shape[axis]
        part = -(-length // count)  # opset 18's num_outputs: equal parts, the last one smaller
        sizes = [min(part, length - k * part) for k in range(count)]
    return tuple(torch.split(x, sizes, dim=axis))


def _expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    # ONNX Expand broadcasts both ways: a dimension of 1 in `shape` keeps the input's size.
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _range(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


def _trilu(a: dict[str, Any], inputs: Sequence[Any]) -> torch.Tensor:
    k = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    return torch.triu(inputs[0], k) if a.get("upper", 1) else torch.tril(inputs[0], k)


def _div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Integer Div truncates in ONNX (shape arithmetic such as width // heads), float Div does not.
    if x.dtype.is_floating_point or y.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _reduce_extreme(a: dict[str, Any], inputs: Sequence[Any], opset: int, largest: bool) -> torch.Tensor:
    x = inputs[0]
    axes = a.get("axes") if opset < 18 else _ints(inputs[1]) if len(inputs) > 1 else None
    dims = list(range(x.dim())) if not axes else [int(d) for d in axes]
    keep = bool(a.get("keepdims", 1))
    return torch.amax(x, dim=dims, keepdim=keep) if largest else torch.amin(x, dim=dims, keepdim=keep)


def _topk(node: onnx.NodeProto, a: dict[str, Any], inputs: Sequence[Any], opset: int) -> tuple[torch.Tensor, ...]:
    x = inputs[0]
    k = a["k"] if opset < 10 else int(inputs[1].reshape(-1)[0])
    values, indices = torch.topk(x, k, dim=a.get("axis", -1), largest=bool(a.get("largest", 1)),
                                 sorted=bool(a.get("sorted", 1)))
    return values, indices


def _scatter_elements(node: onnx.NodeProto, a: dict[str, Any], inputs: Sequence[Any]) -> torch.Tensor:
    data, indices, updates = inputs
    axis = a.get("axis", 0) % data.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    reduction = a.get("reduction", b"none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction == "none":
        return torch.scatter(data, axis, indices, updates)  # out of place: the gradient reaches `updates`
    known = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}
    if reduction not in known:
        raise UsageError(f"node {node.name}: ScatterElements with reduction {reduction} is not supported")
    return torch.scatter_reduce(data, axis, indices, updates, known[reduction], include_self=True)


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def apply(n: onnx.NodeProto, a: dict[str, Any], i: Sequence[Any], o: int) -> torch.Tensor:
        out = i[0]
        for other in i[1:]:
            out = fn(out, other)
        return out
    return apply


OPS: dict[str, Callable[..., Any]] = {
    "Constant": lambda n, a, i, o: _constant(n, a),
    "ConstantOfShape": lambda n, a, i, o: _constant_of_shape(a, i[0]),
    "Shape": lambda n, a, i, o: torch.tensor(i[0].shape[a.get("start", 0):a.get("end", None)], dtype=torch.int64,
                                             device=i[0].device),
    "Size": lambda n, a, i, o: torch.tensor(i[0].numel(), dtype=torch.int64, device=i[0].device),
    "Cast": lambda n, a, i, o: i[0].to(torch_dtype(a["to"])),
    "CastLike": lambda n, a, i, o: i[0].to(i[1].dtype),
    "Gather": lambda n, a, i, o: _gather(a, i[0], i[1]),
    "Slice": lambda n, a, i, o: _slice(n, a, i, o),
    "Split": lambda n, a, i, o: _split(a, i, o, len(n.output)),
    "Expand": lambda n, a, i, o: _expand(i[0], i[1]),
    "Tile": lambda n, a, i, o: i[0].repeat(*_ints(i[1])),
    "Range": lambda n, a, i, o: _range(*i),
    "Trilu": lambda n, a, i, o: _trilu(a, i),
    "Where": lambda n, a, i, o: torch.where(i[0], i[1], i[2]),
    "Equal": lambda n, a, i, o: torch.eq(i[0], i[1]),
    "Less": lambda n, a, i, o: torch.lt(i[0], i[1]),
    "LessOrEqual": lambda n, a, i, o: torch.le(i[0], i[1]),
    "Greater": lambda n, a, i, o: torch.gt(i[0], i[1]),
    "GreaterOrEqual": lambda n, a, i, o: torch.ge(i[0], i[1]),
    "Not": lambda n, a, i, o: torch.logical_not(i[0]),
    "And": lambda n, a, i, o: torch.logical_and(i[0], i[1]),
    "Or": lambda n, a, i, o: torch.logical_or(i[0], i[1]),
    "Xor": lambda n, a, i, o: torch.logical_xor(i[0], i[1]),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Div": lambda n, a, i, o: _div(i[0], i[1]),
    "Reciprocal": lambda n, a, i, o: torch.reciprocal(i[0]),
    "Floor": lambda n, a, i, o: torch.floor(i[0]),
    "Ceil": lambda n, a, i, o: torch.ceil(i[0]),
    "ReduceMax": lambda n, a, i, o: _reduce_extreme(a, i, o, True),
    "ReduceMin": lambda n, a, i, o: _reduce_extreme(a, i, o, False),
    # Routing of a mixture of experts: the chosen logits' values carry the gradient to the router.
    "TopK": lambda n, a, i, o: _topk(n, a, i, o),
    "ScatterElements": lambda n, a, i, o: _scatter_elements(n, a, i),
}
