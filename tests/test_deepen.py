"""Tests of the depth morph: every layer kind and option, border exactness, density, refusals, CLI, real models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS, REFERENCE_MODELS, light_model, light_stems, reference_model, sample_layers
from onnx import TensorProto, helper, numpy_helper
from onnxmorph.passes.deepen import DeepenPass

import onnxmorph
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.graph import core as mgraph
from onnxmorph.numerics import solvers

# --------------------------------------------------------------------------- one-layer models


def _model(nodes, inputs, inits, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "one_layer", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    if opset < 8:
        model.ir_version = 3  # the era's IR: initializers are also graph inputs (normalize handles it)
    return onnxmorph.normalize(model)


def _conv_model(kernel, spatial, *, ci=4, co=6, bias=True, opset=13, seed=1, **attrs) -> onnx.ModelProto:
    """One Conv whose output is the graph output, so every border pixel is compared."""
    rng = np.random.default_rng(seed)
    group = int(attrs.get("group", 1))
    inits = {"w": rng.normal(size=(co, ci // group, *kernel)).astype(np.float32)}
    if bias:
        inits["b"] = rng.normal(size=(co,)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], name="conv", **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, ci, *spatial])
    return _model([node], [x], inits, opset)


def _gemm_model(*, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=(5,), m=3, k=7, n=5,
                opset=13) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = {"w": rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)}
    inputs = ["a", "w"]
    if c_shape is not None:
        inits["c"] = rng.normal(size=c_shape).astype(np.float32)
        inputs.append("c")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha,
                            beta=beta)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, m] if trans_a else [m, k])
    return _model([node], [a], inits, opset)


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _attrs(model: onnx.ModelProto, name: str) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in _node(model, name).attribute}


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _deepen(parent: onnx.ModelProto, **params) -> onnx.ModelProto:
    child, report = onnxmorph.morph(parent, "deepen", trials=2, **params)
    assert report, report
    return child


# --------------------------------------------------------------------------- Conv geometry


@pytest.mark.parametrize("kernel,spatial,k2,attrs", [
    ((3,), (11,), 3, {"pads": [1, 1]}),                                      # 1-D
    ((5,), (12,), 2, {"pads": [0, 3], "strides": [2]}),                      # 1-D, even k2, asymmetric, strided
    ((3, 3), (9, 10), 3, {"pads": [1, 1, 1, 1]}),
    ((3, 3), (9, 10), "1x3", {"pads": [0, 1, 2, 0], "strides": [2, 3]}),    # per-axis kernel, asymmetric
    ((3, 3), (12, 12), 3, {"dilations": [2, 3], "pads": [2, 3, 2, 3]}),
    ((2, 3), (7, 8), 4, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((2, 3), (7, 8), 3, {"auto_pad": "SAME_LOWER"}),
    ((3, 3), (7, 8), 1, {"auto_pad": "VALID", "strides": [2, 1]}),
    ((3, 3, 3), (5, 6, 7), 3, {"pads": [1, 1, 1, 1, 1, 1]}),                 # 3-D
    ((3, 3), (9, 9), 3, {"group": 2, "pads": [1, 1, 1, 1]}),                # grouped
])
def test_conv_geometries_are_exact_on_every_pixel(kernel, spatial, k2, attrs) -> None:
    parent = _conv_model(kernel, spatial, **attrs)
    child = _deepen(parent, layer="conv", kernel=k2)
    nd = len(kernel)
    k2 = tuple(int(v) for v in str(k2).split("x")) * (nd if "x" not in str(k2) else 1)
    a, b = _attrs(child, "conv/morph_deepen/conv_a"), _attrs(child, "conv/morph_deepen/conv_b")
    old = mgraph.conv_geometry(mgraph.read_view(parent).nodes[0], mgraph.tensor_shapes(parent))
    lo = [(k - 1) // 2 for k in k2]
    hi = [k - 1 - v for k, v in zip(k2, lo)]
    assert a["pads"] == [p + d * v for p, d, v in zip(old.pads_begin, old.dilations, lo)] + [
        p + d * v for p, d, v in zip(old.pads_end, old.dilations, hi)]
    assert a["strides"] == [1] * nd and b["strides"] == list(old.strides)
    assert b["pads"] == [0] * 2 * nd and a["dilations"] == b["dilations"] == list(old.dilations)
    assert a["group"] == b["group"] == old.group
    assert _weight(child, "conv/morph_deepen/conv_b/weight").shape == (6, 6 // old.group, *k2)
    assert [n.op_type for n in child.graph.node] == ["Conv", "PRelu", "Conv"]
    assert not any(n.name == "conv" for n in child.graph.node)


def test_depthwise_and_bias_free_conv() -> None:
    parent = _conv_model((3, 3), (8, 8), ci=6, co=6, group=6, bias=False, pads=[1, 1, 1, 1])
    child = _deepen(parent, layer="conv")
    a = _node(child, "conv/morph_deepen/conv_a")
    b = _node(child, "conv/morph_deepen/conv_b")
    assert len(a.input) == 3 and not _weight(child, a.input[2]).any()  # layer 1: a zero bias to train
    assert len(b.input) == 2  # the parent had no bias, so neither does layer 2
    assert _weight(child, b.input[1]).shape == (6, 1, 3, 3)


def test_border_exactness_and_the_naive_placement_that_fails() -> None:
    """A 3x3 pad-1 Conv deepened by Algorithm 1 (both kernels dense 3x3) matches on the border ring."""
    parent = _conv_model((3, 3), (7, 7), ci=4, co=4, pads=[1, 1, 1, 1])
    step = DeepenPass(layer="conv", kernel=3, width=12)  # 12 * 4 * 9 >= 4 * 4 * 25: exact by counting
    child = step.apply(parent).model
    solution = step.solve(step.requires(parent))
    assert solution.algorithm.startswith("alg1")
    f1 = _weight(child, "conv/morph_deepen/conv_a/weight")
    f2 = _weight(child, "conv/morph_deepen/conv_b/weight")
    assert f1.shape == (12, 4, 3, 3) and f2.shape == (4, 12, 3, 3)
    for f in (f1, f2):  # no zero ring: every tap of both kernels carries weight
        assert np.abs(f).sum(axis=(0, 1)).min() > 0.1 * np.abs(f).sum(axis=(0, 1)).max()
    x = np.random.default_rng(5).uniform(-1, 1, size=(2, 4, 7, 7)).astype(np.float32)
    expected, got = _run(parent, {"x": x}), _run(child, {"x": x})
    ring = np.ones((7, 7), bool)
    ring[1:-1, 1:-1] = False
    np.testing.assert_allclose(got[..., ring], expected[..., ring], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)

    # The naive split: the same factors, "same" padding (1) on both layers.
    naive = onnx.ModelProto()
    naive.CopyFrom(child)
    for node in naive.graph.node:
        if node.op_type == "Conv":
            for attr in node.attribute:
                if attr.name == "pads":
                    attr.ints[:] = [1, 1, 1, 1]
    wrong = _run(naive, {"x": x})
    np.testing.assert_allclose(wrong[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-5, rtol=1e-5)
    assert np.abs(wrong[..., ring] - expected[..., ring]).max() > 1e-2
    assert not onnxmorph.verify(parent, naive)


# --------------------------------------------------------------------------- Gemm and MatMul


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,c_shape", [(1.0, 1.0, (5,)), (0.5, -2.0, (1, 5)), (1.5, 0.25, (3, 5)),
                                                (2.0, 3.0, ()), (-1.0, 1.0, None)])
def test_gemm_every_transpose_alpha_beta(trans_a, trans_b, alpha, beta, c_shape) -> None:
    parent = _gemm_model(trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    child = _deepen(parent, layer="fc", width=6)
    a, b = _attrs(child, "fc/morph_deepen/gemm_a"), _attrs(child, "fc/morph_deepen/gemm_b")
    assert a["transA"] == trans_a and b["transA"] == 0
    assert a["alpha"] == b["alpha"] == 1.0 and b["beta"] == 1.0
    w1 = _weight(child, "fc/morph_deepen/gemm_a/weight")
    assert w1.shape == ((6, 7) if trans_b else (7, 6))
    assert [n.op_type for n in child.graph.node] == ["Gemm", "PRelu", "Gemm"]
    assert _weight(child, "fc/morph_deepen/act_a").shape == (6,)


def test_float64_gemm_and_matmul() -> None:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["a", "w", "c"], ["h"], name="fc", transB=1),
             helper.make_node("MatMul", ["h", "v"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "double", [helper.make_tensor_value_info("a", TensorProto.DOUBLE, [3, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3, 4])],
                              [numpy_helper.from_array(rng.normal(size=(5, 7)), "w"),
                               numpy_helper.from_array(rng.normal(size=(5,)), "c"),
                               numpy_helper.from_array(rng.normal(size=(5, 4)), "v")])
    parent = onnxmorph.normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    for layer, activation in (("fc", "relu"), ("mm", "leaky_relu")):
        child = _deepen(parent, layer=layer, activation=activation)
        assert _weight(child, f"{layer}/morph_deepen/act_a").dtype == np.float64
    with pytest.raises(NotApplicable, match="no onnxruntime kernel"):
        DeepenPass(layer="fc", activation="gelu").requires(parent)


def test_gemm_with_computed_bias_keeps_beta() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["c_in"], ["c"], name="c_relu"),
             helper.make_node("Gemm", ["a", "w", "c"], ["y"], name="fc", transB=1, beta=0.5, alpha=2.0)]
    parent = _model(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 7]),
                            helper.make_tensor_value_info("c_in", TensorProto.FLOAT, [3, 5])],
                    {"w": rng.normal(size=(5, 7)).astype(np.float32)})
    child = _deepen(parent, layer="fc")
    b = _node(child, "fc/morph_deepen/gemm_b")
    assert b.input[2] == "c" and _attrs(child, b.name)["beta"] == 0.5


def test_matmul_with_add_bias_rank3() -> None:
    parent = reference_model("transformer_ff")
    child = _deepen(parent, layer="ff1", width=48, activation="gelu")
    names = [n.name for n in child.graph.node]
    i = names.index("ff1/morph_deepen/matmul_a")
    assert names.index("ff1/morph_deepen/matmul_b") > i
    w1 = _weight(child, "ff1/morph_deepen/matmul_a/weight")
    w2 = _weight(child, "ff1/morph_deepen/matmul_b/weight")
    assert w1.shape == (32, 48) and w2.shape == (48, 128)
    assert _weight(child, "ff1/morph_deepen/act_a").shape == (48,)  # last axis is the channel axis
    # the original bias Add still consumes the pair's output
    add = next(n for n in child.graph.node if n.op_type == "Add" and "ff1_out" in n.input)
    assert add is not None


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("activation,ops", [
    ("relu", ["PRelu"]), ("leaky_relu", ["LeakyRelu", "Sub", "Mul", "Mul", "Add"]),
    ("tanh", ["Tanh", "Sub", "Mul", "Mul", "Add"]), ("sigmoid", ["Sigmoid", "Sub", "Mul", "Mul", "Add"]),
    ("gelu", ["Mul", "Erf", "Add", "Mul", "Mul", "Sub", "Mul", "Mul", "Add"]), ("none", []),
])
def test_activations(activation, ops) -> None:
    parent = reference_model("cifar10_quick")
    child = _deepen(parent, layer="conv2", activation=activation)
    new = [n for n in child.graph.node if n.name.startswith("conv2/morph_deepen")]
    assert [n.op_type for n in new] == ["Conv", *ops, "Conv"]
    params = [t for t in child.graph.initializer if t.name.endswith("/act_a")]
    if activation == "none":
        assert not params
    else:
        assert [p.name for p in params] == ["conv2/morph_deepen/act_a"]
        np.testing.assert_array_equal(numpy_helper.to_array(params[0]), np.ones((32, 1, 1), np.float32))
    # the parent's own activation still follows the pair
    relu = _node(child, "relu2")
    assert relu.input[0] == "conv2_out" and new[-1].output[0] == "conv2_out"


def test_kernel_width_seed_and_method() -> None:
    parent = reference_model("resnet_mini")
    verifier = onnxmorph.Verifier(parent, trials=1)
    children = {}
    for key, params in {"k5": dict(kernel=5), "k1": dict(kernel=1), "wide": dict(width=40),
                        "narrow": dict(width=24, layer="s2b1_conv1"), "seed": dict(seed=7),
                        "base": dict(), "identity": dict(method="identity")}.items():
        step = DeepenPass(**{"layer": "s2b2_conv1", **params})
        step.requires(parent)
        children[key] = step.apply(parent).model
        assert verifier.check(children[key]), key
    w = {k: _weight(c, ("s2b1_conv1" if k == "narrow" else "s2b2_conv1") + "/morph_deepen/conv_b/weight")
         for k, c in children.items()}
    assert w["k5"].shape == (32, 32, 5, 5) and w["k1"].shape == (32, 32, 1, 1)
    # narrower than the 32 outputs, wider than the 16 inputs: Algorithm 2 shrinks layer 1 to 1x1
    assert w["wide"].shape == (32, 40, 3, 3) and w["narrow"].shape == (32, 24, 3, 3)
    assert _weight(children["wide"], "s2b2_conv1/morph_deepen/conv_a/weight").shape == (40, 32, 3, 3)
    assert not np.allclose(w["seed"], w["base"])
    # NetMorph is dense, IdMorph is a one-hot identity.
    assert np.count_nonzero(w["identity"]) == 32
    assert np.count_nonzero(w["base"]) > 20 * 32
    f1 = _weight(children["identity"], "s2b2_conv1/morph_deepen/conv_a/weight")
    np.testing.assert_array_equal(f1, _weight(parent, "s2b2_conv1.weight"))


def test_netmorph_is_dense_on_a_64_channel_3x3_layer() -> None:
    parent = reference_model("vgg_bn")
    net = onnxmorph.deepen(parent, layer="conv3_2")
    ident = onnxmorph.deepen(parent, layer="conv3_2", method="identity")
    dense = np.count_nonzero(_weight(net, "conv3_2/morph_deepen/conv_b/weight"))
    sparse = np.count_nonzero(_weight(ident, "conv3_2/morph_deepen/conv_b/weight"))
    assert sparse == 64 and dense >= 64 * 64
    dense1 = np.count_nonzero(_weight(net, "conv3_2/morph_deepen/conv_a/weight"))
    assert dense1 == 64 * 64 * 9


@pytest.mark.parametrize("opset", [7, 9, 11])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_old_opsets(opset, activation) -> None:
    parent = _conv_model((3, 3), (6, 6), opset=opset, pads=[1, 1, 1, 1])
    child = _deepen(parent, layer="conv", activation=activation)
    assert mgraph.opset(child) == opset
    onnx.checker.check_model(child)
    gemm = _gemm_model(trans_b=1, opset=opset)
    onnx.checker.check_model(_deepen(gemm, layer="fc", activation=activation))


def test_gelu_opsets() -> None:
    parent = _conv_model((3, 3), (6, 6), opset=20, pads=[1, 1, 1, 1])
    child = _deepen(parent, layer="conv", activation="gelu")
    assert "Gelu" in [n.op_type for n in child.graph.node]
    with pytest.raises(NotApplicable, match="gelu needs opset >= 9"):
        DeepenPass(layer="conv", activation="gelu").requires(_conv_model((3, 3), (6, 6), opset=8))


# --------------------------------------------------------------------------- refusals


def test_refusals_are_one_line_and_name_the_layer() -> None:
    model = reference_model("cifar10_quick")
    cases = [
        (dict(layer="fc1", kernel=3), "for Conv layers"),
        (dict(layer="conv2", kernel="3x3x3"), "3 axes"),
        (dict(layer="conv2", method="identity", width=16), "identity deepening needs --width >= its 32"),
        (dict(layer="conv2", width=2), "too narrow"),
    ]
    for params, match in cases:
        with pytest.raises(NotApplicable, match=match) as info:
            DeepenPass(**params).requires(model)
        assert "\n" not in str(info.value) and params["layer"] in str(info.value)
    DeepenPass(layer="fc1", kernel=1).requires(model)
    with pytest.raises(NotApplicable, match="not a multiple of its 2 groups"):
        DeepenPass(layer="conv", width=7).requires(_conv_model((3, 3), (6, 6), group=2))
    with pytest.raises(UsageError, match="no layer 'nope'"):
        DeepenPass(layer="nope").requires(model)
    with pytest.raises(UsageError):
        DeepenPass(layer="conv2", activation="swish")
    with pytest.raises(NotApplicable, match="opset >= 7"):
        DeepenPass(layer="conv").requires(_conv_model((3, 3), (6, 6), opset=6))
    rng = np.random.default_rng(0)
    transpose = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                       {"w": rng.normal(size=(2, 3, 3, 3)).astype(np.float32)})
    with pytest.raises(NotApplicable, match="'up' is a ConvTranspose"):
        DeepenPass(layer="up").requires(transpose)


def test_narrow_width_solved_in_requires_is_reused() -> None:
    model = reference_model("mlp_relu")
    step = DeepenPass(layer="fc2", width=48)  # 48 < 64 outputs but 48 < 128 inputs: Gemm needs min(Ci, Co)
    with pytest.raises(NotApplicable, match="too narrow"):
        step.requires(model)
    model = _gemm_model(trans_b=1, k=4, n=9, c_shape=(9,))
    step = DeepenPass(layer="fc", width=6)  # narrower than the 9 outputs, not than the 4 inputs
    plan = step.requires(model)
    assert plan.solution is not None

    def no_second_solve(plan):  # type: ignore[no-untyped-def]
        raise AssertionError("call() solved again")

    step._solve = no_second_solve  # type: ignore[method-assign]
    child = step.call(model, plan).model
    assert onnxmorph.verify(model, child)
    assert _weight(child, "fc/morph_deepen/gemm_a/weight").shape == (6, 4)


def test_inspect_says_whether_deepen_applies() -> None:
    info = onnxmorph.inspect(reference_model("cifar10_quick"))
    verdicts = {layer["name"]: layer["morphs"]["deepen"] for layer in info["layers"]}
    assert all(v["applies"] for v in verdicts.values())
    assert verdicts["conv2"]["algorithm"].startswith("2") and verdicts["fc2"]["algorithm"].startswith("1")


# --------------------------------------------------------------------------- every layer of every model


@pytest.mark.parametrize("stem", REFERENCE_MODELS)
def test_every_reference_layer(stem: str) -> None:
    parent = reference_model(stem)
    verifier = onnxmorph.Verifier(parent, trials=1)
    for layer in mgraph.layers(mgraph.read_view(parent)):
        for method in ("netmorph", "identity"):
            step = DeepenPass(layer=layer.name, method=method, activation="tanh" if method == "identity" else "relu")
            step.requires(parent)
            child = step.apply(parent).model
            report = verifier.check(child)
            assert report, f"{stem}/{layer.name}/{method}: {report.summary()}"
            assert len(child.graph.node) == len(parent.graph.node) + (2 if method == "netmorph" else 6)
            tag = layer.op.lower()
            f2 = _weight(child, f"{layer.name}/morph_deepen/{tag}_b/weight")
            co = layer.weight_shape[1] if layer.op == "MatMul" else layer.weight_shape[0]
            if method == "identity":
                assert np.count_nonzero(f2) == co
            elif co > 1 and not (layer.op == "Conv" and layer.weight_shape[1] == 1):  # depthwise: 1x1 per group
                assert np.count_nonzero(f2) > 2 * co, f"{stem}/{layer.name}: NetMorph layer is not dense"


@pytest.mark.parametrize("stem", light_stems(slow=("light_densenet121",)))  # the longest: -m slow
def test_real_architectures(stem: str) -> None:
    """`requires` on every layer passes or refuses in one line; sampled layers morph and verify."""
    model = light_model(stem)
    names = []
    for info in mgraph.layers(mgraph.read_view(model)):
        try:
            DeepenPass(layer=info.name).requires(model)
            names.append(info.name)
        except NotApplicable as exc:
            assert "\n" not in str(exc) and info.name in str(exc)
    picked = sample_layers(names, 2, seed=11)
    steps = [DeepenPass(layer=name, seed=k) for k, name in enumerate(picked)]
    outcome = onnxmorph.run_passes(model, steps, onnxmorph.VerifyOptions(trials=1))
    assert outcome.report, f"{stem} {picked}: {outcome.report.summary()}"
    assert len(outcome.child.graph.node) == len(model.graph.node) + 2 * len(picked)


def test_solver_and_pass_agree_on_the_composite() -> None:
    """The installed float32 factors compose (solvers.compose) to the parent filter at rounding level."""
    parent = reference_model("cifar10_quick")
    child = onnxmorph.deepen(parent, layer="conv3", kernel=3, seed=3)
    f1 = _weight(child, "conv3/morph_deepen/conv_a/weight")
    f2 = _weight(child, "conv3/morph_deepen/conv_b/weight")
    g = _weight(parent, "conv3.weight")
    composite = solvers.compose(f2, f1)
    target = solvers.target_kernel(g, (3, 3))
    assert np.abs(composite - target).max() < 1e-5 * np.abs(g).max()
    # the two factors' scales are balanced (equal per-element RMS), so neither dwarfs the other
    rms1, rms2 = np.sqrt(np.mean(f1.astype(np.float64) ** 2)), np.sqrt(np.mean(f2.astype(np.float64) ** 2))
    assert abs(rms1 / rms2 - 1) < 1e-3


# --------------------------------------------------------------------------- CLI


def test_cli_readme_command_and_refusal(tmp_path) -> None:
    out = tmp_path / "cifar10_deeper.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxmorph", "deepen", str(MODELS / "cifar10_quick.onnx"),
                           "--layer", "conv2", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout and out.is_file()
    child = onnxmorph.load(out)
    assert "conv2/morph_deepen/act" in [n.name for n in child.graph.node]
    proc = subprocess.run([sys.executable, "-m", "onnxmorph", "deepen", str(MODELS / "cifar10_quick.onnx"),
                           "--layer", "fc1", "--kernel", "3", "-o", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "for Conv layers" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()
