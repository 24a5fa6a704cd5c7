"""A model as `diff` sees it, read from its header: nodes, weights, shapes, parameter and FLOP counts."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import onnx
from onnx import numpy_helper

from onnxmorph.diff.shapes import counting_shapes, has_dynamic_inputs
from onnxmorph.errors import one_line
from onnxmorph.io import folding
from onnxmorph.io import loading as mio
from onnxmorph.pipeline import receipt
from onnxmorph.verification.verifier import read_model_file

Source = Union[str, os.PathLike, onnx.ModelProto]
Dims = tuple[Union[int, str, None], ...]

# Node names a pass makes: `<layer or tensor>/morph_<kind>[_k]/...` (see graph.Namer, build.fresh_scope).
MORPH_SCOPE = re.compile(r"/morph_([a-z]+)(?:_\d+)?(?=/|$)")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class NodeView:
    """One node of the main graph as the diff sees it (weights are inputs named in ModelView.weights)."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, str]


@dataclass
class ModelView:
    """A model's main graph without its weights' values: nodes, weight dims, inferred shapes, receipt."""

    path: str
    nodes: dict[str, NodeView]
    weights: dict[str, Dims | None]  # None: a folded weight whose shape could not be inferred
    float_weights: set[str]
    shapes: dict[str, Dims | None]
    batch_dims: set[str]
    history: list[dict[str, Any]]
    unnamed_nodes: int = 0
    shape_note: str = ""
    # FLOPs are counted at these input sizes (verification's: batch 1, sequence 16, or --shape) with
    # the tensors' dims at them; None: counted from `shapes`, a symbolic batch as 1 (see node_flops)
    flop_inputs: dict[str, list[int]] = field(default_factory=dict)
    flop_shapes: dict[str, Dims | None] | None = None
    flop_note: str = ""
    flop_sequence: bool = False  # whether an input has a dynamic axis besides the batch (sized like verify's)
    producer: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.nodes.values():
            for out in node.outputs:
                self.producer[out] = node.name
            for name in node.inputs:
                self.consumers.setdefault(name, []).append(node.name)

    def data_inputs(self, node: NodeView) -> list[str]:
        """The inputs of `node` that are not weights (the edges of the drawn graph)."""
        return [name for name in node.inputs if name and name not in self.weights]

    def node_weights(self, node: NodeView) -> list[tuple[int, str, Dims | None]]:
        """(input slot, weight name, dims) of every weight `node` reads."""
        return [(k, name, self.weights[name]) for k, name in enumerate(node.inputs) if name in self.weights]


# --------------------------------------------------------------------------- reading


def model_view(source: Source, shapes: Mapping[str, Sequence[int]] | None = None) -> ModelView:
    """Read a model for the diff: from a path its header only (weights' bytes skipped), or a ModelProto.

    FLOPs are counted at `shapes` (input name -> dims, as `verify --shape` takes them) and the
    defaults verification uses for the dynamic axes they leave open (onnxmorph.diff.shapes).

    Weights made by Constant/ConstantOfShape/shape ops become weights and unnamed nodes get the
    names `onnxmorph.io.loading.normalize` gives them, without evaluating anything: a parent file and the
    normalised child it made then use the same names. Shapes come from onnx shape inference on
    the weightless header; where it fails or leaves a dimension open, the shape stays unknown.
    """
    if isinstance(source, onnx.ModelProto):
        header, path = mio.skeleton(source), "<model>"
    else:
        header, path = read_model_file(source, check=False).header, str(source)
    flop_inputs, flop_shapes, flop_note = counting_shapes(header, shapes)
    inferred, elem_types, note = _infer_shapes(header)
    graph = header.graph
    weights: dict[str, Dims | None] = {t.name: tuple(int(d) for d in t.dims) for t in graph.initializer}
    for t in graph.initializer:
        elem_types[t.name] = t.data_type
    outputs = {o.name for o in graph.output}
    kept = onnx.GraphProto()
    constants = set(weights)
    for node in graph.node:
        if folding.foldable(node, constants, outputs):
            # A scalar's dims are (), which is known: only a missing shape falls back to the node's own.
            dims = inferred.get(node.output[0])
            weights[node.output[0]] = dims if dims is not None else _constant_dims(node, graph)
            constants.add(node.output[0])
        else:
            kept.node.append(node)
    unnamed = sum(1 for node in kept.node if not node.name)
    folding.name_nodes(kept)
    nodes: dict[str, NodeView] = {}
    for n in kept.node:
        name, k = n.name, 1
        while name in nodes:  # names should be unique, but the format does not enforce it
            k += 1
            name = f"{n.name}#{k}"
        nodes[name] = NodeView(name, _op_label(n), list(n.input), list(n.output), _attrs(n))
    batch = set()
    for info in mio.true_inputs(header):
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            batch.add(dims[0].dim_param)
    return ModelView(
        path=path, nodes=nodes, weights=weights,
        float_weights={w for w in weights if elem_types.get(w) in _FLOAT_TYPES},
        shapes=inferred, batch_dims=batch, history=receipt.history(header, path), unnamed_nodes=unnamed,
        shape_note=note, flop_inputs=flop_inputs, flop_shapes=flop_shapes, flop_note=flop_note,
        flop_sequence=has_dynamic_inputs(header, beyond_batch=True),
    )


def _infer_shapes(header: onnx.ModelProto) -> tuple[dict[str, Dims | None], dict[str, int], str]:
    """{tensor: dims} (int, symbol or None per axis), {tensor: element type}, and why shapes are missing."""
    note = ""
    try:
        inferred = onnx.shape_inference.infer_shapes(header, check_type=False, strict_mode=False)
    except Exception as exc:  # shape inference raises many types; the diff still works without shapes
        inferred, note = header, f"shape inference failed ({one_line(exc)}); FLOPs are unknown"
    shapes: dict[str, Dims | None] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for info in (*graph.input, *graph.value_info, *graph.output):
        tt = info.type.tensor_type
        types[info.name] = tt.elem_type
        if not tt.HasField("shape"):
            shapes.setdefault(info.name, None)
            continue
        shapes[info.name] = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes, types, note


def _constant_dims(node: onnx.NodeProto, graph: onnx.GraphProto) -> Dims | None:
    if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return tuple(int(d) for d in node.attribute[0].t.dims)
    if node.op_type == "ConstantOfShape":
        tensor = next((t for t in graph.initializer if t.name == node.input[0]), None)
        try:
            return tuple(int(d) for d in numpy_helper.to_array(tensor).reshape(-1))
        except Exception:  # no such initializer, or its data left out: the shape stays unknown
            return None
    return None


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _attrs(node: onnx.NodeProto) -> dict[str, str]:
    out = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[attr.name] = "<subgraph>"
            continue
        if attr.type == onnx.AttributeProto.TENSOR:
            out[attr.name] = f"tensor {_dims_text(tuple(attr.t.dims))}"
            continue
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        text = str(value)
        out[attr.name] = text if len(text) <= 120 else text[:117] + "..."
    return out


def _dims_text(dims: Dims | None) -> str:
    if dims is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


# --------------------------------------------------------------------------- counting


def parameter_count(view: ModelView) -> int:
    """Elements of the float weights the graph reads (integer shape tensors are not parameters).

    A weight whose shape is unknown (see `ModelView.weights`) is not counted.
    """
    used = {name for node in view.nodes.values() for name in node.inputs}
    return sum(math.prod(dims) for w in view.float_weights if w in used
               for dims in [view.weights[w]] if dims is not None and all(isinstance(d, int) for d in dims))


def node_flops(view: ModelView, node: NodeView) -> int | None:
    """FLOPs of one Conv, ConvTranspose, Gemm or MatMul per example (a multiply-add is 2); None if unknown.

    Counted from `view.flop_shapes` (the dims at `view.flop_inputs`, verification's sizes) when the
    model has them; otherwise from the symbolic shapes, where a leading symbolic dimension of the
    graph inputs (the batch) counts as 1. Any other unknown dimension makes the node's count
    unknown rather than guessed. Other ops count 0.
    """
    if node.op not in _COUNTED_OPS:
        return 0
    dims = [_known(view, name) for name in node.inputs[:2]] + [_known(view, t) for t in node.outputs[:1]]
    x, w, y = (dims + [None] * 3)[:3]
    attrs = node.attrs
    if node.op == "Conv" and w and y:
        return 2 * math.prod(y) * math.prod(w[1:])
    if node.op == "ConvTranspose" and x and w:
        return 2 * math.prod(x) * math.prod(w[1:])
    if node.op == "Gemm" and x and w and len(x) == 2 and len(w) == 2:
        m, k = (x[1], x[0]) if attrs.get("transA") == "1" else (x[0], x[1])
        n = w[0] if attrs.get("transB") == "1" else w[1]
        return 2 * m * k * n
    if node.op == "MatMul" and y is not None and (x or w):
        k = x[-1] if x else w[-2] if len(w) >= 2 else w[0]  # type: ignore[index]
        return 2 * math.prod(y) * k
    return None


def _known(view: ModelView, name: str) -> list[int] | None:
    if name in view.weights:
        dims = view.weights[name]
    elif view.flop_shapes is not None:
        dims = view.flop_shapes.get(name)
        return list(dims) if dims is not None and all(isinstance(d, int) for d in dims) else None  # type: ignore
    else:
        dims = view.shapes.get(name)
    if dims is None:
        return None
    out = []
    for k, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        elif k == 0 and d is not None and d in view.batch_dims:
            out.append(1)
        else:
            return None
    return out


def flop_count(view: ModelView) -> tuple[int, list[str]]:
    """Total FLOPs per example of the counted ops, and the nodes whose count is unknown."""
    total, unknown = 0, []
    for node in view.nodes.values():
        flops = node_flops(view, node)
        if flops is None:
            unknown.append(node.name)
        else:
            total += flops
    return total, unknown
