"""Normalisation for morphing: weights computed by Constant and data-movement ops become initializers."""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Container

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmorph import limits
from onnxmorph.errors import InvalidModelError, UnsafeModelError, one_line
from onnxmorph.io.proto import declared_bytes, itemsize, iter_graphs
from onnxmorph.io.safety import memory_limit

log = logging.getLogger("onnxmorph")


def is_normalized(model: onnx.ModelProto) -> bool:
    """True when `model` needs no normalisation (see `normalize`)."""
    constants = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if not node.name:
            return False
        if foldable(node, constants, outputs):
            return False
    return True


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return `model` ready for morphing (a copy when anything changes; `model` is untouched).

    * weights made by Constant, ConstantOfShape or Identity-of-a-weight nodes become initializers;
    * unnamed nodes get a stable name derived from their first output;
    * in IR version < 4, where every initializer must also be a graph input, new initializers
      are listed as inputs too (true inputs are the graph inputs that are not initializers).
    """
    if is_normalized(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    normalize_in_place(copy)
    return copy


def foldable(node: onnx.NodeProto, constants: Container[str], outputs: set[str]) -> bool:
    if len(node.output) != 1 or node.output[0] in outputs or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Constant":
        return bool(node.attribute) and node.attribute[0].name in _CONSTANT_ATTRS
    if node.op_type in ("ConstantOfShape", "Identity"):
        return len(node.input) >= 1 and node.input[0] in constants
    if node.op_type in _SHAPE_OPS:
        # A weight reshaped or transposed from a constant (converters emit these) is a weight too.
        return bool(node.input) and all(name in constants for name in node.input if name)
    return False


_SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast")


_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def normalize_in_place(model: onnx.ModelProto) -> None:
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded_inputs: set[str] = set()
    kept: list[onnx.NodeProto] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    new: dict[str, onnx.TensorProto] = {}
    # Readers left for each tensor: a folded intermediate (a chain of Casts, say) is freed as soon
    # as its last reader is folded, so a chain costs two tensors of memory, not its length.
    readers = collections.Counter(name for g in iter_graphs(graph) for n in g.node for name in n.input)
    readers.update(outputs)
    budget = memory_limit()
    for node in graph.node:
        if not foldable(node, initializers, outputs):
            kept.append(node)
            continue
        try:
            tensor = _fold(node, initializers, budget, opset)
        except _NotFoldable as exc:
            log.debug("not folding %s: %s", node.name or node.output[0], one_line(exc))
            kept.append(node)
            continue
        # The budget is for all folds together: many fills just under it would exhaust the memory too.
        budget -= declared_bytes(tensor) or 0
        tensor.name = node.output[0]
        initializers[tensor.name] = tensor
        new[tensor.name] = tensor
        folded_inputs.update(node.input)
        for name in node.input:
            readers[name] -= 1
            if readers[name] <= 0 and name in new:
                budget += declared_bytes(new.pop(name)) or 0
                del initializers[name]
    new_tensors = list(new.values())
    if new_tensors:
        used = {name for node in kept for name in node.input} | outputs
        # Subgraphs may read outer-scope weights by name.
        for sub in iter_graphs(graph):
            if sub is not graph:
                used.update(name for node in sub.node for name in node.input)
        del graph.node[:]
        graph.node.extend(kept)
        dead = {name for name in folded_inputs if name not in used}
        survivors = [t for t in graph.initializer if t.name not in dead]
        survivors.extend(t for t in new_tensors if t.name in used)
        del graph.initializer[:]
        graph.initializer.extend(survivors)
        inputs = [i for i in graph.input if i.name not in dead]
        del graph.input[:]
        graph.input.extend(inputs)
        if model.ir_version < 4:
            list_initializers_as_inputs(model)
    name_nodes(graph)


def _fold(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], budget: int,
          opset: int) -> onnx.TensorProto:
    if node.op_type == "Constant":
        attr = node.attribute[0]
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        value = onnx.helper.get_attribute_value(attr)
        dtype = np.float32 if attr.name.startswith("value_float") else np.int64
        return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    if node.op_type == "Identity":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(initializers[node.input[0]])
        return tensor
    if node.op_type in _SHAPE_OPS:
        size = declared_bytes(initializers[node.input[0]]) or 0
        if node.op_type == "Cast":
            size = size * 8 // max(1, itemsize(initializers[node.input[0]].data_type))
        if size > budget:
            raise UnsafeModelError(
                f"node '{limits.quote(node.name or node.output[0])}': folding its {node.op_type} would allocate "
                f"{size} bytes, more than this machine can hold; refused "
                f"(set {limits.MODEL_BYTES.variable} to raise it)"
            )
        return numpy_helper.from_array(fold_shape_op(node, initializers, opset))
    # ConstantOfShape
    shape = numpy_helper.to_array(initializers[node.input[0]]).astype(np.int64).reshape(-1)
    if (shape < 0).any():
        raise InvalidModelError(f"node '{node.name or node.output[0]}': negative shape {shape.tolist()}")
    fill = np.zeros(1, dtype=np.float32)
    for attr in node.attribute:
        if attr.name == "value":
            fill = numpy_helper.to_array(attr.t).reshape(-1)
    count = int(np.prod(shape, dtype=np.float64))
    if count * fill.dtype.itemsize > budget:
        raise UnsafeModelError(
            f"node '{node.name or node.output[0]}': ConstantOfShape of shape {shape.tolist()} would "
            f"allocate {count * fill.dtype.itemsize} bytes; refused"
        )
    return numpy_helper.from_array(np.full(tuple(shape), fill[0], dtype=fill.dtype))


def fold_shape_op(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], opset: int) -> np.ndarray:
    """Evaluate a pure data-movement op on constant inputs (nothing else is ever evaluated).

    Cast is left to onnxruntime itself: numpy's conversions differ from onnxruntime's where it
    matters (float8 saturation, out-of-range floats to integers), and the child is verified
    against what onnxruntime computes from the parent.
    """
    where = f"node '{limits.quote(node.name or node.output[0])}'"
    if node.op_type == "Cast":
        return _cast_in_onnxruntime(node, initializers[node.input[0]], opset, where)
    args = [numpy_helper.to_array(initializers[name]) if name else None for name in node.input]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    x = args[0]
    try:
        if node.op_type == "Reshape":
            shape = [int(d) for d in args[1].reshape(-1)]
            if not attrs.get("allowzero", 0):
                shape = [x.shape[k] if d == 0 else d for k, d in enumerate(shape)]
            return x.reshape(shape)
        if node.op_type == "Transpose":
            return np.transpose(x, attrs.get("perm"))
        if node.op_type in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes")
            if axes is None and len(args) > 1 and args[1] is not None:
                axes = [int(a) for a in args[1].reshape(-1)]
            if node.op_type == "Squeeze":
                return np.squeeze(x, axis=tuple(axes) if axes is not None else None)
            out = x
            rank = x.ndim + len(axes)
            for axis in sorted(a % rank for a in axes):
                out = np.expand_dims(out, axis)
            return out
        # Flatten: axis in [-rank, rank]; axis == rank gives [size, 1], axis 0 gives [1, size].
        axis = attrs.get("axis", 1)
        if not -x.ndim <= axis <= x.ndim:
            raise ValueError(f"axis {axis} is outside [-{x.ndim}, {x.ndim}]")
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise InvalidModelError(f"{where}: cannot apply {node.op_type} to its constant input ({exc})") from exc


class _NotFoldable(Exception):
    """onnxruntime cannot evaluate this node on its own: it stays in the graph."""


def _cast_in_onnxruntime(node: onnx.NodeProto, source: onnx.TensorProto, opset: int, where: str) -> np.ndarray:
    import onnxruntime as ort

    cast = onnx.NodeProto()
    cast.CopyFrom(node)
    cast.ClearField("name")
    del cast.input[:]
    del cast.output[:]
    cast.input.append("x")
    cast.output.append("y")
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    if to is None:
        raise InvalidModelError(f"{where}: Cast without a 'to' attribute")
    graph = onnx.helper.make_graph(
        [cast], "fold", [onnx.helper.make_tensor_value_info("x", source.data_type, list(source.dims))],
        [onnx.helper.make_tensor_value_info("y", to, list(source.dims))],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", max(opset, 6))])
    model.ir_version = min(model.ir_version, 10)
    x = numpy_helper.to_array(source)
    try:
        expected = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        result = session.run(None, {"x": x})[0]
        if result.dtype != expected:
            # onnxruntime hands float8 results to numpy as their bits (uint8).
            if result.dtype.itemsize != expected.itemsize:
                raise TypeError(f"onnxruntime returned {result.dtype} for {expected}")
            result = result.view(expected)
        return result
    except Exception:
        pass
    # Types onnxruntime's Python binding cannot return (bfloat16, float8e5m2, 4-bit): the ONNX
    # reference implementation follows the specification's table (saturation included).
    try:
        from onnx.reference import ReferenceEvaluator

        return np.asarray(ReferenceEvaluator(model).run(None, {"x": x})[0])
    except Exception as exc:
        raise _NotFoldable(one_line(exc)) from exc


def name_nodes(graph: onnx.GraphProto) -> None:
    taken = {node.name for node in graph.node if node.name}
    for node in graph.node:
        if node.name:
            continue
        base = node.output[0] if node.output and node.output[0] else node.op_type
        name = base if base not in taken else f"{base}/{node.op_type}"
        k = 1
        while name in taken:
            k += 1
            name = f"{base}/{node.op_type}_{k}"
        node.name = name
        taken.add(name)


def list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input: add the missing ones."""
    listed = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor.name not in listed:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )


def true_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that a caller must feed (initializers listed as inputs are weights)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]
