"""Layer adapters: a Conv, ConvTranspose, Gemm or MatMul read once, the same way for every morph.

`read_layer` finds a layer, checks what every weight-solving morph needs (a float weight that
is a constant of its own, one output, a Conv's geometry agreeing with its weight, a Gemm's
finite alpha and beta) and returns a `Layer`: the weight as stored, the canonical filter the
solvers take (`[C_out, C_in/groups, *kernel]` or `[C_out, C_in]`, Gemm's alpha and transB folded
in), the channel axis and counts. `detach` takes the layer out of an editable graph and hands
over what its replacement must read and write, with a Gemm's beta folded into a constant bias.
`out_channels` tells where any layer kind (ConvTranspose too) keeps its output channels, for the
width morph, which reads no weights through the adapter (the channel analysis does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.graph.core import fresh_scope
from onnxmorph.numerics.dtypes import is_float
from onnxmorph.numerics.geometry import ConvGeometry, Shapes, conv_geometry

SOLVABLE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """One layer as the morphs see it. `weight` is the stored array (read-only, never edited)."""

    op: str
    name: str
    weight: np.ndarray
    weight_name: str
    opset: int
    geometry: ConvGeometry | None = None  # Conv only
    trans_a: bool = False  # Gemm only, as the attributes say
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def label(self) -> str:
        return f"layer '{self.name}'"

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:]) if self.op == "Conv" else ()

    @property
    def groups(self) -> int:
        return self.geometry.group if self.geometry is not None else 1

    @property
    def out_channels(self) -> int:
        if self.op == "Conv" or (self.op == "Gemm" and self.trans_b):
            return int(self.weight.shape[0])
        return int(self.weight.shape[1])

    @property
    def in_channels(self) -> int:
        """Input channels per group (the second axis of the canonical filter)."""
        if self.op == "Conv" or (self.op == "Gemm" and self.trans_b):
            return int(self.weight.shape[1])
        return int(self.weight.shape[0])

    @property
    def channel_axis(self) -> int:
        """The output's channel axis: 1 for Conv and Gemm, the last for MatMul."""
        return -1 if self.op == "MatMul" else 1

    @property
    def rank(self) -> int | None:
        """The output's rank where the op fixes it (None: a MatMul's follows its input)."""
        return {"Conv": len(self.kernel) + 2, "Gemm": 2}.get(self.op)

    def canonical(self) -> np.ndarray:
        """The filter in the solvers' layout, float64 (a copy: big classifier weights make it costly)."""
        g = np.asarray(self.weight, dtype=np.float64)
        if self.op == "Gemm":
            return self.alpha * (g if self.trans_b else g.T)
        return g.T if self.op == "MatMul" else g

    def check_finite(self) -> None:
        if not np.all(np.isfinite(self.weight)):
            raise NotApplicable(f"{self.label}: weight '{self.weight_name}' holds NaN or infinite values")

    def expand_kernel(self, size: Sequence[int], flag: str) -> tuple[int, ...]:
        """`size` with one entry per spatial axis (one number stands for all); refused when they differ."""
        nd = len(self.kernel)
        full = tuple(size) * nd if len(size) == 1 else tuple(size)
        if len(full) != nd:
            raise NotApplicable(f"{self.label}: {flag} {'x'.join(map(str, size))} has {len(full)} axes, "
                                f"the layer has {nd} spatial axes")
        return full


def read_layer(model: mgraph.ModelOrAnalysis, name: str, ops: Sequence[str] = SOLVABLE_OPS) -> Layer:
    """Layer `name` (node or output name) of one of `ops`, checked for a morph that solves new weights."""
    view = mgraph.read_view(model)
    node = mgraph.find_layer(view, name, ops)
    label = f"layer '{name}'"
    # A weight tied to another node would silently come untied: refuse rather than guess.
    weight = mgraph.exclusive_constant(node, 1)
    w = mgraph.values(weight)
    if not is_float(w.dtype):
        raise NotApplicable(f"{label}: weight '{weight.name}' has type {w.dtype}, not a float type")
    if len(node.outputs) != 1:
        raise NotApplicable(f"{label}: {node.op} with {len(node.outputs)} outputs")
    common = {"op": node.op, "name": name, "weight": w, "weight_name": weight.name, "opset": mgraph.opset(model)}
    if node.op == "Conv":
        return Layer(**common, geometry=_checked_geometry(model, node, w, label))
    if w.ndim != 2:
        raise NotApplicable(f"{label}: {node.op} weight {list(w.shape)} is not a 2-D matrix"
                            + (" (batched weights are not supported)" if node.op == "MatMul" else ""))
    if node.op == "MatMul":
        return Layer(**common)
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise NotApplicable(f"{label}: Gemm alpha {alpha} or beta {beta} is not finite")
    return Layer(**common, trans_a=bool(node.attrs.get("transA", 0)), trans_b=bool(node.attrs.get("transB", 0)),
                 alpha=alpha, beta=beta)


def _checked_geometry(model: mgraph.ModelOrAnalysis, node: gs.Node, w: np.ndarray, label: str) -> ConvGeometry:
    nd = w.ndim - 2
    if nd < 1:
        raise NotApplicable(f"{label}: Conv weight {list(w.shape)} has no spatial axes")
    geometry = conv_geometry(node, mgraph.tensor_shapes(model))
    if tuple(w.shape[2:]) != geometry.kernel:
        raise NotApplicable(f"{label}: kernel_shape {list(geometry.kernel)} differs from its weight {list(w.shape)}")
    if len(geometry.strides) != nd or len(geometry.dilations) != nd or len(geometry.pads_begin) != nd:
        raise NotApplicable(f"{label}: strides, dilations or pads do not have {nd} axes")
    if w.shape[0] % geometry.group:
        raise NotApplicable(f"{label}: {w.shape[0]} output channels are not divisible by group {geometry.group}")
    return geometry


@dataclass
class Detached:
    """What is left of a layer taken out of a graph: its input, its output, its bias (beta folded in)."""

    name: str
    x: gs.Tensor
    y: gs.Variable
    bias: np.ndarray | gs.Tensor | None
    beta: float  # 1.0, except a Gemm's beta that multiplies a computed bias

    def scope(self, namer: mgraph.Namer, morph: str) -> str:
        """The name scope of what replaces the layer: `<layer>/<morph>` (or `_2`, ... when taken)."""
        return fresh_scope(namer, self.name or self.y.name, morph)


def detach(graph: gs.Graph, layer: Layer) -> Detached:
    """Remove `layer`'s node from the editable `graph`; its output tensor waits for a new producer."""
    node = mgraph.find_layer(graph, layer.name, (layer.op,))
    inputs, outputs = mgraph.remove_node(graph, node)
    bias: np.ndarray | gs.Tensor | None = None
    if layer.op != "MatMul" and len(inputs) > 2 and inputs[2].name:
        bias = inputs[2]
    beta = layer.beta
    if layer.op == "Gemm" and isinstance(bias, gs.Constant):
        # A constant C keeps any broadcastable shape, with beta folded in.
        bias = beta * np.asarray(bias.values, dtype=np.float64)
        beta = 1.0
    return Detached(node.name, inputs[0], outputs[0], bias, beta)


def out_channels(node: gs.Node, shapes: Shapes) -> tuple[int, int, int]:
    """(channel axis of the output, channel count, groups) of layer `node` (any of graph.LAYER_OPS)."""
    w = node.inputs[1].shape  # the declared dims: a weight kept lazily is not read for them
    if node.op == "Conv":
        return 1, int(w[0]), int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        return 1, int(w[1]) * int(node.attrs.get("group", 1)), int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return 1, int(w[0] if int(node.attrs.get("transB", 0)) else w[1]), 1
    out = shapes.get(node.outputs[0].name)
    if not out:
        raise NotApplicable(f"layer '{node.name}': the rank of its output is unknown")
    return len(out) - 1, int(w[-1]), 1
