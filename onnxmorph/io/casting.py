"""A model's 16-bit floats declared float32: its types, casts and inline tensors (for onnxruntime's CPU kernels).

onnxruntime's CPU provider has no bfloat16 kernels for the ops of a transformer (MatMul, Mul,
Softmax, ...) and lacks some float16 ones; a model of such weights is verified on a float32 copy
of itself. Every 16-bit float in its *declarations* becomes float32 here: graph inputs and
outputs, value infos, the `to` and `dtype` attributes of casts and generators, inline tensors
(small initializers, Constant and ConstantOfShape values), in every graph. Each value widens
exactly (float32 holds every float16 and bfloat16) and every Cast to a 16-bit type still rounds
there, so a parent and its child cast alike compute the functions they did, with the arithmetic
between the casts in float32. The weights kept in files are widened by
whoever loads them (`onnxmorph.verification.runtime`), a slab at a time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmorph.io.proto import all_tensors, iter_graphs

HALF_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_TYPE_ATTRIBUTES = ("to", "dtype")


def half_float_types(model: onnx.ModelProto) -> set[int]:
    """The 16-bit float element types `model` declares anywhere (inputs, tensors, casts, value infos)."""
    found: set[int] = set()
    for graph in iter_graphs(model.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.tensor_type.elem_type in HALF_FLOATS:
                found.add(info.type.tensor_type.elem_type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT and attr.i in HALF_FLOATS:
                    found.add(attr.i)
    found.update(t.data_type for t in all_tensors(model) if t.data_type in HALF_FLOATS)
    return found


def declare_float32(model: onnx.ModelProto) -> None:
    """Make every 16-bit float that `model` declares float32, in place (see the module's docstring).

    A Cast to a 16-bit float rounds: it stays, followed by a Cast back to float32, so that the
    values the model rounds are rounded alike (what changes is the precision of the arithmetic
    between the casts, not the values the model stores). Tensors whose bytes are in files
    (external data, references) keep their type: their data is widened where it is read.
    """
    for graph in iter_graphs(model.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.tensor_type.elem_type in HALF_FLOATS:
                info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            nodes.append(node)
            if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and len(node.output) == 1 and any(
                    a.name == "to" and a.i in HALF_FLOATS for a in node.attribute):
                rounded = f"{node.output[0]}/onnxmorph_rounded"
                nodes.append(onnx.helper.make_node("Cast", [rounded], [node.output[0]], to=onnx.TensorProto.FLOAT,
                                                   name=f"{node.name or node.output[0]}/onnxmorph_float32"))
                node.output[0] = rounded
                continue
            for attr in node.attribute:
                if attr.name in _TYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT and attr.i in HALF_FLOATS:
                    attr.i = onnx.TensorProto.FLOAT
        del graph.node[:]
        graph.node.extend(nodes)
    for tensor in all_tensors(model):
        if tensor.data_type in HALF_FLOATS and tensor.data_location != onnx.TensorProto.EXTERNAL:
            widen_inline(tensor)


def widen_inline(tensor: onnx.TensorProto) -> None:
    """An inline 16-bit float tensor rewritten as float32, in place."""
    values = numpy_helper.to_array(tensor).astype(np.float32)
    name, doc = tensor.name, tensor.doc_string
    tensor.CopyFrom(numpy_helper.from_array(values, name))
    tensor.doc_string = doc
