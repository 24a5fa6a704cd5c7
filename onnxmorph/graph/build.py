"""Graph-building pieces shared by the depth and subnet morphs: new layers from solved arrays, P-activations.

Weights are given in the solvers' canonical layout (`onnxmorph.numerics.solvers`): a Conv filter is
`[C_out, C_in/groups, *kernel]`, a Gemm or MatMul weight is `[C_out, C_in]`; `add_layer` stores it
in the layout the new node needs and casts it to the requested dtype.

Chaining N layers: call `add_layer` and `p_activation` alternately, feeding each call the tensor
the previous one returned, and pass the tensor the chain must produce (the replaced node's output)
as `out` of the last call, e.g. for three layers with activations between them:

    h = add_layer(graph, namer, scope, "conv_a", x, spec_a, dtype)
    h = p_activation(graph, namer, scope + "/1", h, "relu", ...)
    h = add_layer(graph, namer, scope, "conv_b", h, spec_b, dtype)
    h = p_activation(graph, namer, scope + "/2", h, "relu", ...)
    add_layer(graph, namer, scope, "conv_c", h, spec_c, dtype, out=y)

`insert_layer_pair` is the two-layer case. Every new node and tensor is named by the graph's
`Namer` under its scope (`conv2/morph_deepen/conv_a`, `.../conv_a/weight`).

Naming rule of the P-activation parameter (what a trainer looks for): every P-activation has ONE
trainable parameter `a`, a float initializer of ones shaped to broadcast along the channel axis,
whose name is `<scope>/act_a` (for ReLU too, where it is the `PRelu` slope). `p_activation`
turns `<scope>` into `<scope>_2`, ... when those names are taken, so the name always ends in
`/act_a` (`P_ACTIVATION_SUFFIX`).
At `a = 1` every P-activation is exactly the identity (bit for bit): `PRelu` with slope 1, or
`(1 - a) * phi(x) + a * x` = `0 * phi(x) + x`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.graph.core import Namer, fresh_scope
from onnxmorph.numerics.geometry import ConvGeometry, set_conv_geometry

__all__ = [
    "ACTIVATIONS",
    "P_ACTIVATION_SUFFIX",
    "LayerSpec",
    "activation_problem",
    "add_layer",
    "channel_param_shape",
    "crop_input",
    "fresh_scope",
    "insert_layer_pair",
    "p_activation",
]

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "none")
P_ACTIVATION_SUFFIX = "/act_a"
LEAKY_RELU_ALPHA = 0.01  # ONNX LeakyRelu's default, as PyTorch's
# onnxruntime runs PRelu, LeakyRelu and Erf on these only; other float types take explicit forms.
_PRELU_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
MIN_OPSET = 7  # PRelu's unidirectional slope broadcasting and numpy-style Mul/Add broadcasting start here


@dataclass(frozen=True)
class LayerSpec:
    """One new layer to build from solved arrays.

    `op` is "Conv", "Gemm" or "MatMul". `weight` is canonical (`[Co, Ci/groups, *K]` or `[Co, Ci]`).
    `bias` is an array of shape `[Co]`, an existing tensor (reused as is, e.g. a parent's bias,
    a Gemm's `[M, N]` constant or a computed tensor), or None. `geometry` is required for Conv.
    Gemm only: `trans_a` keeps a transposed input (`[K, M]`), `trans_b` chooses how the weight is
    stored (True: `[Co, Ci]` with transB=1, False: `[Ci, Co]`), `beta` multiplies the bias (keep
    1 and fold it into an array bias; a reused tensor bias may need the parent's beta).
    """

    op: str
    weight: np.ndarray
    bias: np.ndarray | gs.Tensor | None = None
    geometry: ConvGeometry | None = None
    trans_a: bool = False
    trans_b: bool = True
    beta: float = 1.0


def _activation_scope(namer: Namer, scope: str) -> str:
    """`scope`, or `scope_2`, ... such that `<scope>/act`, `<scope>/act_a` and `<scope>/act/...` are free."""
    candidate, k = scope, 1
    while any(t == candidate + "/act" or t == candidate + P_ACTIVATION_SUFFIX or t.startswith(candidate + "/act/")
              for t in namer.taken):
        k += 1
        candidate = f"{scope}_{k}"
    return candidate


def crop_input(graph: gs.Graph, namer: Namer, scope: str, x: gs.Tensor, geometry: ConvGeometry,
               opset: int) -> tuple[gs.Tensor, ConvGeometry]:
    """(`x`, `geometry`) unchanged when its pads are >= 0; else a Slice of `x` doing the negative pads.

    A smaller centred kernel inside an unpadded conv starts reading `offset` pixels in: a negative
    pad, which ONNX Conv does not allow; cropping those pixels first is the same computation.
    """
    if min(geometry.pads) >= 0:
        return x, geometry
    starts = [max(0, -p) for p in geometry.pads_begin]
    ends = [p if p < 0 else np.iinfo(np.int64).max for p in geometry.pads_end]
    axes = list(range(2, 2 + geometry.rank))
    out = gs.Variable(namer(scope, "crop", "out"), dtype=x.dtype)
    name = namer(scope, "crop")
    if opset < 10:
        graph.nodes.append(gs.Node("Slice", name=name, inputs=[x], outputs=[out],
                                   attrs={"starts": starts, "ends": ends, "axes": axes}))
    else:
        consts = [mgraph.constant(namer(name, tag), np.array(v, dtype=np.int64), np.int64)
                  for tag, v in (("starts", starts), ("ends", ends), ("axes", axes))]
        graph.nodes.append(gs.Node("Slice", name=name, inputs=[x, *consts], outputs=[out]))
    clamped = geometry.with_pads([max(0, p) for p in geometry.pads_begin], [max(0, p) for p in geometry.pads_end])
    return out, clamped


def _intermediate(name: str) -> gs.Variable:
    # No dtype or shape: the exporter then writes no value_info for it, which IR 3 models would
    # reject without a shape, and onnxruntime infers both anyway.
    return gs.Variable(name)


def _bias_input(namer: Namer, name: str, bias: np.ndarray | gs.Tensor, dtype: np.dtype) -> gs.Tensor:
    if isinstance(bias, gs.Tensor):
        return bias
    return mgraph.constant(namer(name, "bias"), np.asarray(bias), dtype)


def add_layer(
    graph: gs.Graph,
    namer: Namer,
    scope: str,
    tag: str,
    x: gs.Tensor,
    spec: LayerSpec,
    dtype: np.dtype | type,
    out: gs.Variable | None = None,
) -> gs.Variable:
    """Append to `graph` a node `<scope>/<tag>` computing `spec` on `x`; returns its output tensor.

    The output is `out` when given (to produce an existing tensor, e.g. the replaced node's
    output), else a new tensor `<scope>/<tag>/out`. Weights and array biases are cast to `dtype`.
    """
    name = namer(scope, tag)
    dtype = np.dtype(dtype)
    w = np.asarray(spec.weight)
    inputs: list[gs.Tensor] = [x]
    attrs: dict[str, object] = {}
    if spec.op == "Conv":
        if spec.geometry is None:
            raise ValueError(f"{name}: a Conv layer needs its geometry")
        inputs.append(mgraph.constant(namer(name, "weight"), w, dtype))
        if spec.bias is not None:
            inputs.append(_bias_input(namer, name, spec.bias, dtype))
    elif spec.op == "Gemm":
        stored = w if spec.trans_b else w.T
        inputs.append(mgraph.constant(namer(name, "weight"), stored, dtype))
        if spec.bias is not None:
            inputs.append(_bias_input(namer, name, spec.bias, dtype))
        attrs = {"transA": int(spec.trans_a), "transB": int(spec.trans_b), "alpha": 1.0, "beta": float(spec.beta)}
    elif spec.op == "MatMul":
        # MatMul computes x @ W with W [Ci, Co]; a bias, if any, is an Add node of the caller's.
        inputs.append(mgraph.constant(namer(name, "weight"), w.T, dtype))
        if spec.bias is not None:
            raise ValueError(f"{name}: MatMul has no bias input")
    else:
        raise ValueError(f"{name}: cannot build a {spec.op} layer")
    y = out if out is not None else _intermediate(namer(name, "out"))
    node = gs.Node(spec.op, name=name, attrs=attrs, inputs=inputs, outputs=[y])
    if spec.geometry is not None:
        set_conv_geometry(node, spec.geometry)
    graph.nodes.append(node)
    return y


def channel_param_shape(channels: int, channel_axis: int, rank: int | None) -> tuple[int, ...]:
    """Shape of a per-channel parameter that broadcasts (numpy rules) against a tensor of `rank`.

    `channel_axis` 1 (Conv/Gemm outputs `[N, C, *spatial]`) gives `[C, 1, ..., 1]`; -1 (MatMul
    outputs `[..., C]`) gives `[C]`. This is also what PRelu's slope needs from opset 7 on.
    """
    if channel_axis == -1:
        return (channels,)
    if channel_axis != 1 or rank is None or rank < 2:
        raise ValueError(f"channel axis {channel_axis} of a rank-{rank} tensor is not supported")
    return (channels,) + (1,) * (rank - 2)


def activation_problem(kind: str, opset: int, dtype: np.dtype | type = np.float32) -> str | None:
    """Why a P-activation of `kind` cannot be built in `opset` for `dtype` tensors (a phrase), or None."""
    if kind not in ACTIVATIONS:
        return f"unknown activation {kind!r} (known: {', '.join(ACTIVATIONS)})"
    if kind == "none":
        return None
    if opset < MIN_OPSET:
        return f"a P-activation needs opset >= {MIN_OPSET} (broadcasting PRelu/Mul), the model has {opset}"
    if kind == "gelu" and opset < 9:
        return f"gelu needs opset >= 9 (Erf) or 20 (Gelu), the model has {opset}"
    if kind == "gelu" and np.dtype(dtype) not in _PRELU_DTYPES:
        return f"gelu on {np.dtype(dtype)} tensors has no onnxruntime kernel (Erf); use tanh, sigmoid or relu"
    return None


def _node(graph: gs.Graph, op: str, name: str, inputs: list[gs.Tensor], out: gs.Variable,
          **attrs: object) -> gs.Variable:
    graph.nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[out]))
    return out


def p_activation(
    graph: gs.Graph,
    namer: Namer,
    scope: str,
    x: gs.Tensor,
    kind: str,
    channels: int,
    channel_axis: int,
    rank: int | None,
    dtype: np.dtype | type,
    opset: int,
    out: gs.Variable | None = None,
) -> gs.Variable:
    """Append a parametric activation `phi_a` of `kind` on `x`, the identity at morph time; returns its output.

    relu -> `PRelu(x, a)`; leaky_relu, tanh, sigmoid, gelu -> `(1 - a) * phi(x) + a * x` (gelu is the
    Gelu op from opset 20, else `0.5 * x * (1 + Erf(x / sqrt 2))`). For tensors other than float32 and
    float16 (no onnxruntime PRelu/LeakyRelu kernel) relu and leaky_relu take the explicit form too,
    with `Relu` and `Max(x, 0.01 x)` as phi; none -> nothing is added and `x`
    is returned. `a` is an initializer of ones named `<scope>/act_a` (see the module docstring),
    shaped by `channel_param_shape(channels, channel_axis, rank)`. Raises NotApplicable when the
    opset cannot express it (see `activation_problem`).
    """
    problem = activation_problem(kind, opset, dtype)
    if problem is not None:
        raise NotApplicable(problem)
    if kind == "none":
        return x
    dtype = np.dtype(dtype)
    scope = _activation_scope(namer, scope)
    base = scope + "/act"
    namer.taken.add(base)
    shape = channel_param_shape(channels, channel_axis, rank)
    a = mgraph.constant(scope + P_ACTIVATION_SUFFIX, np.ones(shape), dtype)
    namer.taken.add(a.name)
    y = out if out is not None else _intermediate(base + "/out")
    namer.taken.add(y.name)

    native = dtype in _PRELU_DTYPES
    if kind == "relu" and native:
        return _node(graph, "PRelu", base, [x, a], y)
    phi = _phi(graph, namer, base, x, kind, native, dtype, opset)
    one = mgraph.constant(namer(base, "one"), np.array(1.0), dtype)
    one_minus_a = _node(graph, "Sub", namer(base, "one_minus_a"), [one, a], _intermediate(namer(base, "one_minus_a")))
    # At a = 1 the first product is exactly 0 and the second exactly x: the identity, bit for bit.
    nonlinear = _node(graph, "Mul", namer(base, "mix_phi"), [one_minus_a, phi], _intermediate(namer(base, "mix_phi")))
    linear = _node(graph, "Mul", namer(base, "mix_x"), [a, x], _intermediate(namer(base, "mix_x")))
    return _node(graph, "Add", base, [nonlinear, linear], y)


def _phi(graph: gs.Graph, namer: Namer, base: str, x: gs.Tensor, kind: str, native: bool, dtype: np.dtype,
         opset: int) -> gs.Variable:
    """The activation phi of a P-activation, on `x`: one node where the opset and dtype have it."""

    def tmp(tag: str) -> gs.Variable:
        return _intermediate(namer(base, tag))

    def const(tag: str, value: float) -> gs.Constant:
        return mgraph.constant(namer(base, tag), np.array(value), dtype)

    single = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}
    if kind in single:
        return _node(graph, single[kind], namer(base, "phi"), [x], tmp("phi_out"))
    if kind == "leaky_relu" and native:
        return _node(graph, "LeakyRelu", namer(base, "phi"), [x], tmp("phi_out"), alpha=LEAKY_RELU_ALPHA)
    if kind == "leaky_relu":
        # max(x, alpha * x) is LeakyRelu for 0 < alpha < 1.
        small = _node(graph, "Mul", namer(base, "leak"), [x, const("alpha", LEAKY_RELU_ALPHA)], tmp("leak"))
        return _node(graph, "Max", namer(base, "phi"), [x, small], tmp("phi_out"))
    if opset >= 20:
        return _node(graph, "Gelu", namer(base, "phi"), [x], tmp("phi_out"))
    scaled = _node(graph, "Mul", namer(base, "erf_scale"), [x, const("inv_sqrt2", 1 / math.sqrt(2))], tmp("erf_in"))
    erf = _node(graph, "Erf", namer(base, "erf"), [scaled], tmp("erf_out"))
    one_plus = _node(graph, "Add", namer(base, "erf_plus_one"), [erf, const("one_e", 1.0)], tmp("erf_plus_one"))
    half_x = _node(graph, "Mul", namer(base, "half_x"), [x, const("half", 0.5)], tmp("half_x"))
    return _node(graph, "Mul", namer(base, "phi"), [half_x, one_plus], tmp("phi_out"))


def insert_layer_pair(
    graph: gs.Graph,
    namer: Namer,
    scope: str,
    x: gs.Tensor,
    y: gs.Variable,
    first: LayerSpec,
    second: LayerSpec,
    *,
    activation: str,
    channel_axis: int,
    rank: int | None,
    dtype: np.dtype | type,
    opset: int,
    tags: tuple[str, str] = ("layer_a", "layer_b"),
) -> list[gs.Node]:
    """Build `first`, a P-activation over its output channels, then `second` producing `y`; returns the new nodes.

    The caller removes the node that produced `y` before (or after) calling this. `rank` is the
    rank of the first layer's output (needed for channel axis 1), `tags` name the two layer nodes.
    """
    start = len(graph.nodes)
    h = add_layer(graph, namer, scope, tags[0], x, first, dtype)
    h = p_activation(graph, namer, scope, h, activation, int(np.asarray(first.weight).shape[0]),
                     channel_axis, rank, dtype, opset)
    add_layer(graph, namer, scope, tags[1], h, second, dtype, out=y)
    return list(graph.nodes[start:])
