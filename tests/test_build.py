"""Tests of the graph-building helpers: P-activations (identity at a=1, phi at a=0), naming, layer chains."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmorph.errors import NotApplicable
from onnxmorph.graph import build
from onnxmorph.graph import core as mgraph
from onnxmorph.numerics import geometry, solvers
from onnxmorph.numerics.geometry import ConvGeometry


def _graph(shape: list[int], opset: int, dtype: type = np.float32) -> tuple[gs.Graph, gs.Variable]:
    x = gs.Variable("x", dtype=dtype, shape=shape)
    return gs.Graph(inputs=[x], opset=opset), x


def _export(graph: gs.Graph, y: gs.Variable, opset: int, shape: list[int],
            dtype: type = np.float32) -> onnx.ModelProto:
    y.dtype, y.shape = dtype, shape
    graph.outputs = [y]
    model = gs.export_onnx(graph)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 20 else 9
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _with_a(model: onnx.ModelProto, value: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name.endswith(build.P_ACTIVATION_SUFFIX):
            a = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.full_like(a, value), tensor.name))
    return out


PHI = {
    "relu": lambda x: np.maximum(x, 0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
}


@pytest.mark.parametrize("kind,opset", [("relu", 7), ("relu", 13), ("leaky_relu", 9), ("tanh", 13),
                                        ("sigmoid", 11), ("gelu", 9), ("gelu", 20)])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_p_activation_is_the_identity_at_one_and_phi_at_zero(kind, opset, layout) -> None:
    shape = [2, 3, 4, 5] if layout == "channels_first" else [2, 4, 3]
    graph, x = _graph(shape, opset)
    namer = mgraph.Namer(graph)
    axis = 1 if layout == "channels_first" else -1
    y = build.p_activation(graph, namer, "layer/morph_test", x, kind, 3, axis, len(shape), np.float32, opset)
    model = _export(graph, y, opset, shape)
    params = [t for t in model.graph.initializer if t.name.endswith("/act_a")]
    assert [p.name for p in params] == ["layer/morph_test/act_a"]
    expected_shape = (3, 1, 1) if layout == "channels_first" else (3,)
    assert tuple(params[0].dims) == expected_shape
    data = np.random.default_rng(0).uniform(-3, 3, size=shape).astype(np.float32)
    np.testing.assert_array_equal(_run(model, data), data)  # bit for bit
    np.testing.assert_allclose(_run(_with_a(model, 0.0), data), PHI[kind](data.astype(np.float64)),
                               atol=2e-6, rtol=1e-5)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["PRelu"] if kind == "relu" else ops[-1] == "Add"
    assert ("Gelu" in ops) == (kind == "gelu" and opset >= 20)


@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "sigmoid"])
def test_float64_takes_the_explicit_form(kind) -> None:
    """onnxruntime has no double PRelu/LeakyRelu kernels: the explicit form keeps the child runnable."""
    graph, x = _graph([4, 3], 13, np.float64)
    y = build.p_activation(graph, mgraph.Namer(graph), "fc/morph", x, kind, 3, 1, 2, np.float64, 13)
    model = _export(graph, y, 13, [4, 3], np.float64)
    assert "PRelu" not in [n.op_type for n in model.graph.node]
    data = np.random.default_rng(0).uniform(-3, 3, size=(4, 3))
    np.testing.assert_array_equal(_run(model, data), data)
    np.testing.assert_allclose(_run(_with_a(model, 0.0), data), PHI[kind](data), rtol=1e-12, atol=1e-12)
    assert "no onnxruntime kernel" in build.activation_problem("gelu", 13, np.float64)


def test_none_adds_nothing_and_problems_are_phrased() -> None:
    graph, x = _graph([1, 3], 13)
    assert build.p_activation(graph, mgraph.Namer(graph), "s", x, "none", 3, 1, 2, np.float32, 13) is x
    assert not graph.nodes
    assert "opset >= 7" in build.activation_problem("relu", 6)
    assert "gelu needs opset >= 9" in build.activation_problem("gelu", 8)
    assert "unknown activation" in build.activation_problem("swish", 13)
    assert build.activation_problem("gelu", 9) is None
    with pytest.raises(NotApplicable, match="opset >= 7"):
        build.p_activation(graph, mgraph.Namer(graph), "s", x, "tanh", 3, 1, 2, np.float32, 6)


def test_names_keep_the_act_a_suffix_when_a_scope_repeats() -> None:
    graph, x = _graph([1, 3], 13)
    namer = mgraph.Namer(graph)
    h = build.p_activation(graph, namer, "fc/morph_x", x, "relu", 3, 1, 2, np.float32, 13)
    build.p_activation(graph, namer, "fc/morph_x", h, "tanh", 3, 1, 2, np.float32, 13)
    names = sorted(t for t in graph.tensors() if t.endswith(build.P_ACTIVATION_SUFFIX))
    assert names == ["fc/morph_x/act_a", "fc/morph_x_2/act_a"]
    assert build.fresh_scope(namer, "fc", "morph_x") == "fc/morph_x_3"  # both taken as prefixes
    assert build.fresh_scope(namer, "fc", "other") == "fc/other"


def test_channel_param_shape() -> None:
    assert build.channel_param_shape(8, 1, 5) == (8, 1, 1, 1)
    assert build.channel_param_shape(8, 1, 2) == (8,)
    assert build.channel_param_shape(8, -1, None) == (8,)
    with pytest.raises(ValueError):
        build.channel_param_shape(8, 2, 4)


def test_pair_geometries_put_padding_first_and_stride_second() -> None:
    parent = ConvGeometry((3, 5), (1, 0), (2, 2), (2, 3), (2, 1), 4)
    first, second = geometry.pair_geometries(parent, (4, 1))
    # lo = (1, 0), hi = (2, 0), times the dilation (2, 1)
    assert first == ConvGeometry((3, 5), (3, 0), (6, 2), (1, 1), (2, 1), 4)
    assert second == ConvGeometry((4, 1), (0, 0), (0, 0), (2, 3), (2, 1), 4)


def test_a_chain_of_three_convs_built_from_two_solves_is_exact() -> None:
    """The sequential-subnet use: add_layer / p_activation called alternately for N = 3 layers."""
    rng = np.random.default_rng(4)
    g = rng.normal(size=(5, 4, 3, 3))
    parent = ConvGeometry((3, 3), (1, 1), (1, 1), (2, 2), (1, 1), 1)
    first = solvers.solve_deepen(g, (3, 3), 6, rng)             # g -> f1 (3x3), f2 (3x3)
    f1_geo, f2_geo = geometry.pair_geometries(parent, (3, 3))
    second = solvers.solve_deepen(first.f2, (1, 1), 7, rng)     # f2 -> f2a (3x3), f2b (1x1)
    f2a_geo, f2b_geo = geometry.pair_geometries(f2_geo, (1, 1))

    graph, x = _graph([1, 4, 9, 9], 13)
    namer = mgraph.Namer(graph)
    scope = build.fresh_scope(namer, "conv", "morph_subnet")
    h = build.add_layer(graph, namer, scope, "conv_a", x, build.LayerSpec("Conv", first.f1, np.zeros(6), f1_geo),
                        np.float32)
    h = build.p_activation(graph, namer, scope + "/1", h, "tanh", 6, 1, 4, np.float32, 13)
    h = build.add_layer(graph, namer, scope, "conv_b", h, build.LayerSpec("Conv", second.f1, None, f2a_geo),
                        np.float32)
    h = build.p_activation(graph, namer, scope + "/2", h, "relu", 7, 1, 4, np.float32, 13)
    y = build.add_layer(graph, namer, scope, "conv_c", h, build.LayerSpec("Conv", second.f2, None, f2b_geo),
                        np.float32)
    model = _export(graph, y, 13, [1, 5, 5, 5])
    assert [n.op_type for n in model.graph.node if n.op_type in ("Conv", "PRelu")] == [
        "Conv", "Conv", "PRelu", "Conv"]
    assert sorted(t.name for t in model.graph.initializer if t.name.endswith("/act_a")) == [
        "conv/morph_subnet/1/act_a", "conv/morph_subnet/2/act_a"]

    reference = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])], "ref",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(g.astype(np.float32), "w")]), opset_imports=[helper.make_opsetid("", 13)])
    data = np.random.default_rng(1).uniform(-1, 1, size=(1, 4, 9, 9)).astype(np.float32)
    expected = _run(reference, data)
    got = _run(model, data)
    assert got.shape == expected.shape == (1, 5, 5, 5)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_gemm_and_matmul_layers_store_the_weight_as_the_op_needs() -> None:
    w = np.arange(6, dtype=np.float64).reshape(2, 3)  # canonical [Co=2, Ci=3]
    graph, x = _graph([4, 3], 13)
    namer = mgraph.Namer(graph)
    build.add_layer(graph, namer, "s", "gemm_t", x, build.LayerSpec("Gemm", w, np.ones(2)), np.float32)
    build.add_layer(graph, namer, "s", "gemm_n", x, build.LayerSpec("Gemm", w, None, trans_b=False), np.float32)
    build.add_layer(graph, namer, "s", "matmul", x, build.LayerSpec("MatMul", w), np.float32)
    stored = {n.name: n.inputs[1].values for n in graph.nodes}
    np.testing.assert_array_equal(stored["s/gemm_t"], w)
    np.testing.assert_array_equal(stored["s/gemm_n"], w.T)
    np.testing.assert_array_equal(stored["s/matmul"], w.T)
    assert all(v.dtype == np.float32 for v in stored.values())
    assert graph.nodes[0].attrs["transB"] == 1 and graph.nodes[1].attrs["transB"] == 0
    with pytest.raises(ValueError, match="no bias"):
        build.add_layer(graph, namer, "s", "bad", x, build.LayerSpec("MatMul", w, np.ones(2)), np.float32)
