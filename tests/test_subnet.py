"""Tests of the subnet morphs (sequential, parallel, residual): numpy splits, structure, density, equality."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import (
    FULL_SWEEP,
    LIGHT,
    LIGHT_MODELS,
    described,
    light_model,
    light_stems,
    reference_model,
    sample_layers,
)
from onnx import numpy_helper
from onnxmorph.passes.subnet import SubnetPass

import onnxmorph
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.numerics import solvers
from onnxmorph.numerics.splitting import chain_filters, split_residual_centred


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _nodes(model: onnx.ModelProto, prefix: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name.startswith(prefix)]


def _conv_weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return _weights(model)[node.input[1]]


def test_numpy_splits_are_exact_and_dense() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 4, 3, 3))
    filters = chain_filters(g, 3, (3, 3), 6, rng)
    assert [f.shape for f in filters] == [(6, 4, 3, 3), (6, 6, 3, 3), (6, 6, 3, 3)]
    composite = solvers.compose(filters[2], solvers.compose(filters[1], filters[0]))
    # two 3x3 layers after the parent's: the parent sits at the centre of a 7x7 composite
    np.testing.assert_allclose(composite[:, :, 2:5, 2:5], g, atol=1e-10)
    composite[:, :, 2:5, 2:5] = 0
    assert np.abs(composite).max() < 1e-10
    main, f1, f2 = split_residual_centred(g, (1, 1), 8, rng)
    assert f1.shape == (8, 4, 1, 1) and f2.shape == (6, 8, 1, 1)
    rebuilt = main.copy()
    rebuilt[:, :, 1:2, 1:2] += solvers.compose(f2, f1)
    np.testing.assert_allclose(rebuilt, g, atol=1e-12)
    for a in (main, f1, f2):
        assert np.count_nonzero(a) == a.size  # every filter non-zero (Modularized Morphing)
    # grouped (depthwise) residual
    gd = rng.normal(size=(4, 1, 3, 3))
    main, f1, f2 = split_residual_centred(gd, (1, 1), 4, rng, groups=4)
    rebuilt = main.copy()
    rebuilt[:, :, 1:2, 1:2] += solvers.compose(f2, f1, 4)
    np.testing.assert_allclose(rebuilt, gd, atol=1e-12)


@pytest.mark.parametrize("depth", [2, 3])
def test_sequential(depth: int) -> None:
    parent = reference_model("cifar10_quick")
    child, report = onnxmorph.morph(parent, "subnet", layer="conv2", kind="sequential", depth=depth, trials=2)
    assert report, report
    convs = [n.name for n in _nodes(child, "conv2/morph_subnet/") if n.op_type == "Conv"]
    assert convs == [f"conv2/morph_subnet/conv_{i}" for i in range(1, depth + 1)]
    acts = [n for n in _nodes(child, "conv2/morph_subnet/") if n.op_type == "PRelu"]
    assert len(acts) == depth - 1
    assert "conv2" not in {n.name for n in child.graph.node}
    assert any(n.output[0] == "conv2_out" for n in child.graph.node)  # the module keeps L's output name
    shapes = [_conv_weight(child, c).shape for c in convs]
    assert shapes[0] == (32, 32, 5, 5) and all(s == (32, 32, 3, 3) for s in shapes[1:])
    for c in convs:
        w = _conv_weight(child, c)
        # dense over channels (Algorithm 2 may keep only the centre tap of a 3x3): not an identity
        assert np.count_nonzero(np.abs(w).sum(axis=(2, 3))) == w.shape[0] * w.shape[1]


def test_chain_kernel_width_and_seed_options() -> None:
    parent = reference_model("vgg_bn")
    child, report = onnxmorph.morph(parent, "subnet", layer="conv2_1", kind="sequential", depth=3, kernel="1x3",
                                    width=48, seed=4, trials=1)
    assert report, report
    shapes = [_conv_weight(child, f"conv2_1/morph_subnet/conv_{i}").shape for i in (1, 2, 3)]
    old = _weights(parent)["conv2_1.weight"].shape
    assert shapes == [(48, old[1], 3, 3), (48, 48, 1, 3), (old[0], 48, 1, 3)]
    again = onnxmorph.subnet(parent, layer="conv2_1", kind="sequential", depth=3, kernel="1x3", width=48, seed=4,
                             trials=1)
    assert _weights(again).keys() == _weights(child).keys()
    assert all(np.array_equal(_weights(again)[k], v) for k, v in _weights(child).items())  # seeded: reproducible
    child, report = onnxmorph.morph(parent, "subnet", layer="conv2_1", kind="parallel", branches=3, trials=1)
    assert report and len(_nodes(child, "conv2_1/morph_subnet/sum")[0].input) == 3


@pytest.mark.parametrize("kernels,depth", [(None, None), ("1,3,5", None), ("5,1", 2)])
def test_parallel(kernels, depth) -> None:
    parent = reference_model("cifar10_quick")
    kwargs = {"kernels": kernels} if kernels else {}
    if depth:
        kwargs["depth"] = depth
    child, report = onnxmorph.morph(parent, "subnet", layer="conv2", kind="parallel", trials=2, **kwargs)
    assert report, report
    branches = len(kernels.split(",")) if kernels else 2
    sums = _nodes(child, "conv2/morph_subnet/sum")
    assert len(sums) == 1 and sums[0].op_type == "Sum" and len(sums[0].input) == branches
    assert sums[0].output[0] == "conv2_out"
    convs = [n for n in _nodes(child, "conv2/morph_subnet/branch_") if n.op_type == "Conv"]
    assert len(convs) == branches * (depth or 1)
    if kernels == "1,3,5":
        sizes = [_conv_weight(child, f"conv2/morph_subnet/branch_{b}/conv_1").shape[2:] for b in (1, 2, 3)]
        assert sizes == [(1, 1), (3, 3), (5, 5)]
        parts = [_conv_weight(child, f"conv2/morph_subnet/branch_{b}/conv_1") for b in (1, 2, 3)]
        total = parts[2].astype(np.float64)
        total[:, :, 2:3, 2:3] += parts[0]
        total[:, :, 1:4, 1:4] += parts[1]
        np.testing.assert_allclose(total, _weights(parent)["conv2.weight"], atol=1e-5)
        assert all(np.count_nonzero(p) == p.size for p in parts)


@pytest.mark.parametrize("stem,layer,kernels", [
    ("resnet_mini", "s1b1_conv1", None), ("resnet_mini", "s2b1_conv1", "3,3"), ("mobilenet_mini", "dw2", None),
    ("vgg_bn", "conv2_2", None),
])
def test_residual(stem: str, layer: str, kernels: str | None) -> None:
    parent = reference_model(stem)
    kwargs = {"kernels": kernels} if kernels else {}
    child, report = onnxmorph.morph(parent, "subnet", layer=layer, kind="residual", trials=2, **kwargs)
    assert report, report
    scope = f"{layer}/morph_subnet"
    names = {n.name: n for n in _nodes(child, scope)}
    assert {f"{scope}/main", f"{scope}/branch/conv_1", f"{scope}/branch/conv_2", f"{scope}/add",
            f"{scope}/branch/conv_1/act"} <= set(names)
    assert names[f"{scope}/branch/conv_1/act"].op_type == "PRelu"
    assert names[f"{scope}/add"].output[0] == f"{layer}_out"
    for tag in ("main", "branch/conv_1", "branch/conv_2"):
        w = _conv_weight(child, f"{scope}/{tag}")
        assert np.count_nonzero(w) == w.size, tag  # every filter dense
    if kernels is None:
        assert _conv_weight(child, f"{scope}/branch/conv_1").shape[2:] == (1, 1)  # the 1c1 module
        assert _conv_weight(child, f"{scope}/branch/conv_2").shape[2:] == (1, 1)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "none"])
def test_activations(activation: str) -> None:
    parent = reference_model("resnet_mini")
    child, report = onnxmorph.morph(parent, "subnet", layer="s1b2_conv2", kind="residual", activation=activation,
                                    trials=1)
    assert report, report
    acts = [n for n in child.graph.node if "/act" in n.name]
    assert bool(acts) == (activation != "none")


@pytest.mark.parametrize("stem,layer", [("mlp_relu", "fc2"), ("mlp_tanh", "fc1"), ("transformer_ff", "ff2"),
                                        ("cifar10_quick", "fc1")])
@pytest.mark.parametrize("params", [{"kind": "sequential", "depth": 3}, {"kind": "parallel", "branches": 3, "depth": 2},
                                    {"kind": "residual"}])
def test_gemm_and_matmul_layers(stem: str, layer: str, params: dict) -> None:
    parent = reference_model(stem)
    child, report = onnxmorph.morph(parent, "subnet", layer=layer, trials=2, **params)
    assert report, report
    op = next(n.op_type for n in parent.graph.node if n.name == layer)
    tag = op.lower()
    new = [n for n in _nodes(child, f"{layer}/morph_subnet/") if n.op_type == op]
    assert len(new) == {"sequential": 3, "parallel": 6, "residual": 3}[params["kind"]]
    assert all(n.name.rsplit("/", 1)[-1].startswith((tag, "main")) for n in new)
    for n in new:
        w = _weights(child)[n.input[1]]
        assert np.count_nonzero(w) == w.size  # dense factors


@pytest.mark.parametrize("attrs", [{"transA": 1, "transB": 0, "alpha": 0.5, "beta": 2.0}, {"transB": 1}])
@pytest.mark.parametrize("kind", ["sequential", "parallel", "residual"])
def test_gemm_layouts_and_opset_9(attrs: dict, kind: str) -> None:
    rng = np.random.default_rng(5)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    w = rng.normal(size=(6, 5) if trans_b else (5, 6)).astype(np.float32)
    gemm = onnx.helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="fc", **attrs)
    relu = onnx.helper.make_node("Relu", ["h"], ["y"], name="relu")
    graph = onnx.helper.make_graph(
        [gemm, relu], "gemm", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                  [5, 3] if trans_a else [3, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "c")])
    parent = onnxmorph.normalize(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 9)]))
    child, report = onnxmorph.morph(parent, "subnet", layer="fc", kind=kind, trials=2)
    assert report, report
    gemms = [n for n in child.graph.node if n.op_type == "Gemm"]
    assert all(len(n.input) == 3 for n in gemms)  # C is required before opset 11
    assert sum(dict((a.name, a.i) for a in n.attribute).get("transA", 0) for n in gemms) == (
        0 if not trans_a else {"sequential": 1, "parallel": 2, "residual": 2}[kind])


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("params", [{"kind": "residual"}, {"kind": "parallel", "kernels": "1,3,5", "depth": 2}])
def test_unpadded_layers_crop_the_input_of_smaller_branches(opset: int, params: dict) -> None:
    rng = np.random.default_rng(2)
    node = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[5, 5], strides=[2, 2])
    graph = onnx.helper.make_graph(
        [node], "unpadded", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 12, 11])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 3, 5, 5)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")])
    parent = onnxmorph.normalize(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]))
    child, report = onnxmorph.morph(parent, "subnet", layer="conv", trials=2, **params)
    assert report, report
    crops = [n for n in child.graph.node if n.op_type == "Slice"]
    assert crops and all(n.name.endswith("/crop") for n in crops)
    assert bool(crops[0].attribute) == (opset < 10)  # Slice takes attributes before opset 10, inputs after


def test_refusals() -> None:
    model = reference_model("cifar10_quick")
    cases = [
        ({"layer": "fc1", "kind": "parallel", "kernels": "1,3"}, "--kernels is for Conv"),
        ({"layer": "flatten", "kind": "residual"}, "is a Flatten"),
        ({"layer": "conv2", "kind": "parallel", "kernels": "1,3"}, "one branch must keep"),
        ({"layer": "conv2", "kind": "parallel", "kernels": "7,5"}, "exceed"),
        ({"layer": "conv2", "kind": "sequential", "depth": 1}, "at least 2"),
        ({"layer": "conv2", "kind": "sequential", "width": 8}, "narrower"),
        ({"layer": "conv2", "kind": "residual", "kernels": "3,3"}, "first kernel equal"),
        ({"layer": "conv2", "kind": "residual", "branches": 3}, "--branches"),
        ({"layer": "conv2", "kind": "residual", "kernels": "7,1"}, "larger than the layer's 5x5"),
    ]
    for params, reason in cases:
        with pytest.raises(NotApplicable, match=reason):
            SubnetPass(**params).requires(model)
    with pytest.raises(NotApplicable, match="1x1 -> 1x1"):
        SubnetPass(layer="pw2", kind="residual", kernels="3,1").requires(reference_model("mobilenet_mini"))
    vgg = reference_model("vgg_bn")
    assert described(SubnetPass(layer="conv1_1", kind="residual"), vgg)["module"] == "1c1"


def _conv_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in mgraph.layers(mgraph.read_view(model)) if i.op == "Conv"]


KINDS = [{"kind": "sequential"}, {"kind": "parallel", "kernels": "1,3"}, {"kind": "residual"}]


@pytest.mark.parametrize("stem", light_stems(slow=("light_densenet121", "light_inception_v2")))  # the longest: -m slow
def test_requires_on_every_conv_of_real_architectures(stem: str) -> None:
    model = onnxmorph.load(LIGHT / f"{stem}.onnx")  # the shipped weights: applicability needs no random ones
    # every Conv in a full sweep; 12 of them (seeded) otherwise, densenet has 121
    for name in sample_layers(_conv_names(model), 12, seed=3):
        for params in KINDS:
            try:
                SubnetPass(layer=name, **params).requires(model)
            except NotApplicable as exc:
                assert "\n" not in str(exc) and name in str(exc)


# Small real architectures: their layers solve in milliseconds; full sweeps take them all.
SWEEP = LIGHT_MODELS if FULL_SWEEP else ["light_inception_v1", "light_shufflenet", "light_squeezenet"]


@pytest.mark.parametrize("stem", SWEEP)
def test_real_architectures_verify_or_refuse(stem: str) -> None:
    model = light_model(stem)
    verifier = onnxmorph.Verifier(model, trials=1)
    names = _conv_names(model)
    if FULL_SWEEP:
        picks = [(name, params) for name in names for params in KINDS]
    else:
        first, middle, last = sample_layers(names, 3, seed=7)
        picks = [(middle, KINDS[0]), (first, KINDS[1]), (last, KINDS[2])]  # the chain solves: not the widest layer
    for name, params in picks:
        step = SubnetPass(layer=name, **params)
        try:
            step.requires(model)
        except NotApplicable as exc:
            assert "\n" not in str(exc)
            continue
        report = verifier.check(step.apply(model).model)
        assert report, f"{stem}/{name} {params}: {report.summary()}"
