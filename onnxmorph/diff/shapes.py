"""Tensor shapes at concrete input sizes, to count FLOPs: onnx shape inference, then node by node where it stops.

`diff` counts FLOPs at the sizes verification feeds (`counting_sizes`: a dynamic batch is 1, per
example; a dynamic sequence axis 16, onnxmorph.verification.feeds' default; `--shape` sets them).
With concrete inputs, onnx's shape inference still leaves sizes unknown after a Reshape, Slice,
Expand or Range whose operands are computed from `Shape` at run time (every attention block of an
exported transformer): its data propagation stops at Cast, Div and most other ops. Those operands
are small integer tensors, so `concrete_shapes` walks the graph once in order, infers each node's
outputs with onnx's per-node inference given the values computed so far, and computes the values
of small outputs (numpy for the usual shape ops, onnx's reference implementation for the rest).
Only the header is needed (weights' dims, small constants' data); no tensor of more than
VALUE_LIMIT elements is computed, whatever sizes the input asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmorph import limits
from onnxmorph.errors import UsageError, one_line
from onnxmorph.io import loading as mio
from onnxmorph.verification import feeds

Dims = tuple[Union[int, str, None], ...]

# Values are computed for outputs of at most this many elements (shape tensors have a few); float
# outputs only when tiny (a Range's float bounds), so rotary tables and masks are not computed.
VALUE_LIMIT = 4096
FLOAT_VALUE_LIMIT = 16
# The most elements an input may have at the sizes asked for: ONNX's sizes are int64.
MAX_ELEMENTS = 2**63 - 1


def counting_sizes(header: onnx.ModelProto, given: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """The input sizes FLOPs are counted at: verification's (see module doc), with every batch axis 1.

    UsageError when `given` does not fit the model or an input has a dynamic axis with no default.
    """
    resolved = feeds.resolve_shapes(header, given)
    for name, dims in resolved.items():
        # onnx holds sizes as int64: a --shape beyond that stopped shape inference with an internal error
        if math.prod(int(d) for d in dims) > MAX_ELEMENTS:
            raise UsageError(f"--shape {limits.quote(name, 80)}:{limits.quote('x'.join(map(str, dims)), 80)}: "
                             f"{math.prod(int(d) for d in dims):.3g} elements, more than an ONNX tensor can have "
                             "(2**63 - 1)")
    inputs = mio.true_inputs(header)
    batch = set()  # the names of axis 0 of the inputs: the batch wherever it appears
    declared = {info.name: feeds.declared_dims(info) for info in inputs}
    for dims in declared.values():
        if dims and not isinstance(dims[0], int):
            batch.add(dims[0])
    out = {}
    for name, dims in resolved.items():
        out[name] = [1 if (axis == 0 and not isinstance(d, int)) or (isinstance(d, str) and d in batch) else size
                     for axis, (d, size) in enumerate(zip(declared[name], dims))]
    return out


def has_dynamic_inputs(header: onnx.ModelProto, beyond_batch: bool = False) -> bool:
    """Whether any input of the model has a size that is not a number (`beyond_batch`: on an axis but the first)."""
    return any(not isinstance(d, int) for info in mio.true_inputs(header)
               for d in feeds.declared_dims(info)[1 if beyond_batch else 0:])


def concrete_shapes(header: onnx.ModelProto, sizes: Mapping[str, Sequence[int]]) -> tuple[dict[str, Dims | None], str]:
    """{tensor: dims} of the main graph with its inputs at `sizes`, and a note when some stay unknown."""
    probe = onnx.ModelProto()
    probe.CopyFrom(header)
    for info in mio.true_inputs(probe):
        if info.name in sizes and info.type.HasField("tensor_type"):
            shape = info.type.tensor_type.shape
            shape.ClearField("dim")
            for size in sizes[info.name]:
                shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=False, strict_mode=False, data_prop=True)
        shapes = _shapes_of(inferred)
    except Exception:  # inference raises many types; the walk below infers node by node
        shapes = _shapes_of(probe)
    if all(_static(shapes.get(out)) for node in probe.graph.node for out in node.output if out):
        return shapes, ""
    walked, failed = _walk(probe)
    for name, dims in walked.items():
        if _static(dims) or shapes.get(name) is None:
            shapes[name] = dims
    note = f"shapes at these sizes not inferred for {len(failed)} node(s), e.g. {failed[0]}" if failed else ""
    return shapes, note


def _static(dims: Dims | None) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def _shapes_of(model: onnx.ModelProto) -> dict[str, Dims | None]:
    graph = model.graph
    shapes: dict[str, Dims | None] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tt = info.type.tensor_type
        shapes[info.name] = _dims(info.type) if tt.HasField("shape") else shapes.get(info.name)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes


def _dims(tp: onnx.TypeProto) -> Dims | None:
    tt = tp.tensor_type
    if not tp.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


def _walk(model: onnx.ModelProto) -> tuple[dict[str, Dims | None], list[str]]:
    """Every tensor's dims inferred node by node with the small values computed on the way; nodes that failed."""
    graph = model.graph
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    types: dict[str, onnx.TypeProto] = {}
    values: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        types[tensor.name] = onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
        value = _tensor_value(tensor)
        if value is not None:
            values[tensor.name] = value
    for info in graph.input:
        if info.name not in types:
            types[info.name] = info.type
    failed: list[str] = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = _constant(node)
            if value is not None and node.output:
                values[node.output[0]] = value
                types[node.output[0]] = onnx.helper.make_tensor_type_proto(
                    onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
                continue
        inputs = [name for name in node.input if name]
        if any(name not in types for name in inputs):
            continue  # an input is unknown (a failed node before): so are the outputs
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain or "ai.onnx", 1), node.domain)
            data = {name: numpy_helper.from_array(values[name], name) for name in inputs if name in values}
            outputs = onnx.shape_inference.infer_node_outputs(
                schema, node, {name: types[name] for name in inputs}, data, opset_imports=list(model.opset_import))
        except Exception as exc:  # an op onnx has no schema or inference for, or one it rejects
            failed.append(f"{node.name or node.output[0]} ({node.op_type}: {one_line(exc)[:80]})")
            continue
        types.update(outputs)
        computed = _evaluate(node, [values.get(name) if name else None for name in node.input],
                             [types.get(name) if name else None for name in node.input],
                             [outputs.get(name) for name in node.output], opsets)
        for name, value in zip(node.output, computed):
            if name and value is not None:
                values[name] = value
    return {name: _dims(tp) for name, tp in types.items()}, failed


def _tensor_value(tensor: onnx.TensorProto) -> np.ndarray | None:
    """A small initializer's value, when the header holds its data (large ones have theirs skipped)."""
    count = math.prod(tensor.dims)
    if count > VALUE_LIMIT or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    try:
        value = numpy_helper.to_array(tensor)
    except Exception:  # data skipped or malformed: the value is unknown
        return None
    return value if value.size == count else None


def _constant(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return _tensor_value(attr.t)
        if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
            kind = np.int64 if "int" in attr.name else np.float32
            value = np.asarray(onnx.helper.get_attribute_value(attr), kind)
            return value if value.size <= VALUE_LIMIT else None
    return None


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], in_types: list[onnx.TypeProto | None],
              out_types: list[onnx.TypeProto | None], opsets: dict[str, int]) -> list[np.ndarray | None]:
    """The node's outputs when they are small and computable from what is known; None for each otherwise."""
    nothing: list[np.ndarray | None] = [None] * len(node.output)
    if node.domain not in ("", "ai.onnx") or not out_types or any(
            t is None or not _small(t) for t in out_types):
        return nothing
    if node.op_type in ("Shape", "Size"):
        dims = _dims(in_types[0]) if in_types and in_types[0] is not None else None
        if not _static(dims):
            return nothing
        if node.op_type == "Size":
            return [np.asarray(math.prod(dims), np.int64)]  # type: ignore[arg-type]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))  # type: ignore[arg-type]
        return [np.asarray(dims[slice(start, end)], np.int64)]  # type: ignore[index]
    if any(value is None for value, name in zip(inputs, node.input) if name):
        return nothing
    args = [value for value in inputs]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    try:
        rule = _NUMPY.get(node.op_type)
        results = [rule(args, attrs)] if rule is not None else _reference(node, args, opsets)
        outs = [np.asarray(r) for r in results]
    except Exception:  # an operand numpy or the reference rejects: the value stays unknown
        return nothing
    expected = [_dims(t) for t in out_types]  # type: ignore[arg-type]
    if len(outs) != len(node.output) or any(o.shape != tuple(d) for o, d in zip(outs, expected)):
        return nothing  # disagrees with onnx's inference: trust neither
    return outs  # type: ignore[return-value]


def _small(tp: onnx.TypeProto) -> bool:
    dims = _dims(tp)
    if not _static(dims):
        return False
    count = math.prod(dims)  # type: ignore[arg-type]
    elem = tp.tensor_type.elem_type
    floating = elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                        onnx.TensorProto.BFLOAT16)
    return count <= (FLOAT_VALUE_LIMIT if floating else VALUE_LIMIT)


def _reference(node: onnx.NodeProto, args: list[Any], opsets: dict[str, int]) -> list[Any]:
    from onnx.reference import ReferenceEvaluator  # imported on first use: it takes a while

    names = [name for name in node.input if name]
    feed = {name: value for name, value in zip(node.input, args) if name}
    evaluator = ReferenceEvaluator(node, opsets={"": opsets.get("ai.onnx", 1)})
    return list(evaluator.run(None, {name: feed[name] for name in names}))


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not np.all(b):
        raise ZeroDivisionError("a size divided by 0")  # the value stays unknown
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(np.result_type(a, b))
    return a / b


def _axes(args: list[Any], attrs: dict[str, Any]) -> list[int] | None:
    if "axes" in attrs:
        return list(attrs["axes"])
    return None if len(args) < 2 or args[1] is None else [int(a) for a in np.asarray(args[1]).reshape(-1)]


def _unsqueeze(args: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    x, axes = args[0], _axes(args, attrs)
    rank = x.ndim + len(axes)  # type: ignore[arg-type]
    for axis in sorted(a % rank for a in axes):  # type: ignore[union-attr]
        x = np.expand_dims(x, axis)
    return x


def _squeeze(args: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    axes = _axes(args, attrs)
    return np.squeeze(args[0], axis=None if axes is None else tuple(a % args[0].ndim for a in axes))


def _reshape(args: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    x, target = args[0], [int(d) for d in args[1]]
    if not attrs.get("allowzero", 0):
        target = [x.shape[k] if d == 0 else d for k, d in enumerate(target)]
    return x.reshape(target)


def _slice(args: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    x = args[0]
    starts, ends = (list(attrs["starts"]), list(attrs["ends"])) if "starts" in attrs else \
        ([int(v) for v in args[1]], [int(v) for v in args[2]])
    axes = list(attrs.get("axes", [])) or ([int(v) for v in args[3]] if len(args) > 3 and args[3] is not None
                                           else list(range(len(starts))))
    steps = [int(v) for v in args[4]] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis % x.ndim] = slice(start, end, step)  # numpy clamps out-of-range bounds as ONNX does
    return x[tuple(index)]


def _range(args: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    start, limit, delta = (np.asarray(a).reshape(()) for a in args)
    return np.arange(start, limit, delta).astype(np.result_type(start, limit, delta))


def _constant_of_shape(args: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    return np.full([int(d) for d in args[0]], value.reshape(-1)[0], value.dtype)


def _expand(args: list[Any], attrs: dict[str, Any]) -> np.ndarray:
    x = args[0]  # ONNX Expand broadcasts both ways: a 1 in the target keeps the input's size
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in args[1]))).copy()


_NUMPY: dict[str, Callable[[list[Any], dict[str, Any]], np.ndarray]] = {
    "Identity": lambda a, _: a[0],
    "Cast": lambda a, attrs: a[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])),
    "Gather": lambda a, attrs: np.take(a[0], a[1].astype(np.int64), axis=attrs.get("axis", 0)),
    "Concat": lambda a, attrs: np.concatenate(a, axis=attrs["axis"]),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Slice": _slice,
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Add": lambda a, _: a[0] + a[1],
    "Sub": lambda a, _: a[0] - a[1],
    "Mul": lambda a, _: a[0] * a[1],
    "Div": lambda a, _: _int_div(a[0], a[1]),
    "Neg": lambda a, _: -a[0],
    "Equal": lambda a, _: np.equal(a[0], a[1]),
    "Less": lambda a, _: np.less(a[0], a[1]),
    "Greater": lambda a, _: np.greater(a[0], a[1]),
    "Where": lambda a, _: np.where(a[0], a[1], a[2]),
    "LessOrEqual": lambda a, _: np.less_equal(a[0], a[1]),
    "GreaterOrEqual": lambda a, _: np.greater_equal(a[0], a[1]),
    "Not": lambda a, _: np.logical_not(a[0]),
    "And": lambda a, _: np.logical_and(a[0], a[1]),
    "Or": lambda a, _: np.logical_or(a[0], a[1]),
    "Max": lambda a, _: np.maximum.reduce(np.broadcast_arrays(*a)) if len(a) > 1 else a[0],
    "Min": lambda a, _: np.minimum.reduce(np.broadcast_arrays(*a)) if len(a) > 1 else a[0],
}


def describe_sizes(sizes: Mapping[str, Sequence[int]]) -> str:
    """`input_ids 1x16, attention_mask 1x16`."""
    return ", ".join(f"{name} {'x'.join(map(str, dims)) or 'scalar'}" for name, dims in sizes.items())


def counting_shapes(header: onnx.ModelProto, given: Mapping[str, Sequence[int]] | None
                    ) -> tuple[dict[str, list[int]], dict[str, Dims | None] | None, str]:
    """(input sizes, tensor dims at them, note) for counting FLOPs; (sizes or {}, None, why) to count symbolically.

    A model without dynamic inputs is counted at its declared shapes. UsageError only for `given`
    sizes that do not fit the model (a user's --shape); a dynamic axis without a default is noted.
    """
    if not given and not has_dynamic_inputs(header):
        return {}, None, ""
    try:
        sizes = counting_sizes(header, given)
    except UsageError as exc:
        if given:
            raise
        return {}, None, f"FLOPs counted with symbolic sizes ({one_line(exc)})"
    shapes, note = concrete_shapes(header, sizes)
    return sizes, shapes, note
