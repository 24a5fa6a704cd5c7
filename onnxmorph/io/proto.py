"""ModelProto helpers that never copy a weight: graph and tensor walkers, declared sizes, skeletons, metadata."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

# Metadata keys written by onnxmorph into a model it loaded.
SOURCE_DIGEST_KEY = "onnxmorph.source_sha256"


SOURCE_EXTERNAL_KEY = "onnxmorph.source_external_data"


_TRANSIENT_KEYS = (SOURCE_DIGEST_KEY, SOURCE_EXTERNAL_KEY)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    # Iterative: subgraph nesting can be deep and recursion is not safe on generated models.
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


# Element types whose raw_data holds exactly itemsize bytes per element (sub-byte types pack).
WHOLE_BYTE_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def declared_bytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,):
        return None
    return math.prod(int(d) for d in tensor.dims) * itemsize  # exact: int64 products of dims can wrap


def itemsize(data_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:
        return 1


# Weights at least this large are left out of a skeleton.
_SKELETON_MIN_BYTES = 1024


def _left_out(tensor: onnx.TensorProto) -> bool:
    # Only types whose byte count check_declared_sizes verifies, and the references of a model that
    # streams (see onnxmorph.io.streaming), whose sizes the loader checked against their files.
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return True
    return (tensor.data_type in WHOLE_BYTE_TYPES and tensor.HasField("raw_data")
            and (declared_bytes(tensor) or 0) >= _SKELETON_MIN_BYTES)


def skeleton(model: onnx.ModelProto, *, keep_dims: bool = True) -> onnx.ModelProto:
    """A copy of `model` whose large main-graph weights have no data (the weights are not copied).

    With `keep_dims` the stand-ins keep their dims (for shape inference); without, they are
    empty (dims [0]), which onnx.checker accepts.
    """
    out = shell(model)
    graph = out.graph
    for tensor in model.graph.initializer:
        if _left_out(tensor):
            stub = graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
            stub.dims.extend(tensor.dims if keep_dims else [0])
        else:
            graph.initializer.append(tensor)
    return out


def shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its main graph's initializers (nothing large is copied)."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    return out


def _copy_field(target: Any, fd: Any, value: Any) -> None:
    if fd.is_repeated:
        getattr(target, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


def approx_size(model: onnx.ModelProto) -> int:
    """The serialised size of `model` to within a few bytes per weight, without serialising it.

    `ModelProto.ByteSize()` serialises the whole model under protobuf's upb backend (seconds
    and a transient copy for a 500 MB model); this sizes the skeleton and adds the weights' bytes.
    """
    weights = sum(declared_bytes(t) or 0 for t in model.graph.initializer if _left_out(t))
    return skeleton(model).ByteSize() + weights


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def had_external_data(model: onnx.ModelProto) -> bool:
    """Whether `model` was loaded from a file that kept its weights in external data."""
    return any(p.key == SOURCE_EXTERNAL_KEY and p.value == "1" for p in model.metadata_props)


def strip_transient_metadata(model: onnx.ModelProto) -> None:
    """Drop the load-time bookkeeping that must not be written into a saved model."""
    keep = [p for p in model.metadata_props if p.key not in _TRANSIENT_KEYS]
    if len(keep) != len(model.metadata_props):
        del model.metadata_props[:]
        model.metadata_props.extend(keep)
