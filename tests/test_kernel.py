"""Tests of the kernel-size morph: padding arithmetic, border pixels, auto_pad, shrinking, CLI, real models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import MODELS, light_model, light_stems, reference_model, sample_layers
from onnx import TensorProto, helper, numpy_helper
from onnxmorph.passes.kernel import KernelPass, removed_ring_is_zero, resize_kernel

import onnxmorph
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.graph import core as mgraph
from onnxmorph.numerics.geometry import kernel_offsets


def _conv_model(kernel: tuple[int, ...], spatial: tuple[int, ...], *, ci: int = 3, co: int = 4,
                weight: np.ndarray | None = None, opset: int = 13, **attrs: object) -> onnx.ModelProto:
    """One Conv whose output is the graph output, so every border pixel is compared."""
    rng = np.random.default_rng(1)
    group = int(attrs.get("group", 1))
    if weight is None:
        weight = rng.normal(size=(co, ci // group, *kernel)).astype(np.float32)
    bias = rng.normal(size=(co,)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node], "one_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ci, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    return onnxmorph.normalize(model)


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _conv_attrs(model: onnx.ModelProto, name: str) -> dict:
    node = next(n for n in model.graph.node if n.name == name)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_offsets_put_the_odd_tap_after() -> None:
    assert kernel_offsets((3, 3), (5, 6)) == ((1, 1), (1, 2))
    assert kernel_offsets((5,), (3,)) == ((-1,), (-1,))
    w = np.arange(2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3) - 8
    grown = resize_kernel(w, (5, 6))
    assert grown.shape == (2, 1, 5, 6)
    np.testing.assert_array_equal(grown[:, :, 1:4, 1:4], w)
    assert np.count_nonzero(grown) == np.count_nonzero(w)
    assert not removed_ring_is_zero(w, (1, 1))
    assert removed_ring_is_zero(resize_kernel(w, (5, 5)), (3, 3))


@pytest.mark.parametrize(
    "kernel,spatial,size,attrs",
    [
        ((3,), (11,), (6,), {"pads": [1, 1]}),                                   # 1-D, odd difference
        ((3, 3), (9, 10), (5, 5), {"pads": [1, 1, 1, 1]}),
        ((3, 3), (9, 10), (4, 7), {"pads": [0, 1, 2, 0], "strides": [2, 3]}),   # asymmetric, strided
        ((3, 3), (12, 12), (5, 6), {"dilations": [2, 3], "pads": [2, 3, 2, 3]}),
        ((1, 7), (8, 9), (3, 7), {}),
        ((3, 3, 3), (5, 6, 7), (5, 5, 4), {"pads": [1, 1, 1, 1, 1, 1]}),       # 3-D
        ((3, 3), (9, 9), (5, 5), {"group": 3, "pads": [1, 1, 1, 1]}),
    ],
)
def test_grown_kernel_is_exact_on_every_pixel(kernel, spatial, size, attrs) -> None:
    parent = _conv_model(kernel, spatial, ci=6 if attrs.get("group") else 3, co=6, **attrs)
    child, report = onnxmorph.morph(parent, "kernel", layer="conv", size=list(size), trials=2)
    assert report, report
    w = _weight(child, "w")
    assert w.shape[2:] == size
    new = _conv_attrs(child, "conv")
    assert new["kernel_shape"] == list(size)
    old = mgraph.conv_geometry(mgraph.read_view(parent).nodes[0])
    lo, hi = kernel_offsets(kernel, size)
    assert new["pads"] == [p + d * a for p, d, a in zip(old.pads_begin, old.dilations, lo)] + [
        p + d * b for p, d, b in zip(old.pads_end, old.dilations, hi)]
    # the parent's weights sit inside, the added ring is zero
    assert np.count_nonzero(w) == np.count_nonzero(_weight(parent, "w"))
    assert _weight(parent, "w").shape[2:] == kernel  # the parent is untouched


def test_border_pixels_are_compared_directly() -> None:
    parent = _conv_model((3, 3), (6, 6), pads=[1, 1, 1, 1])
    child = onnxmorph.kernel(parent, layer="conv", size=5)
    import onnxruntime as ort

    x = np.random.default_rng(3).uniform(-1, 1, size=(1, 3, 6, 6)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (parent, child)]
    assert run[0].shape == run[1].shape == (1, 4, 6, 6)
    ring = np.ones((6, 6), bool)
    ring[1:-1, 1:-1] = False
    np.testing.assert_allclose(run[1][..., ring], run[0][..., ring], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run[1], run[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("auto_pad,strides,spatial", [
    ("SAME_UPPER", [1, 1], (7, 8)), ("SAME_LOWER", [1, 1], (7, 8)),
    ("SAME_UPPER", [2, 2], (7, 8)), ("SAME_LOWER", [2, 3], (9, 8)), ("VALID", [2, 1], (7, 8)),
])
def test_auto_pad_becomes_explicit_pads(auto_pad, strides, spatial) -> None:
    parent = _conv_model((2, 3), spatial, auto_pad=auto_pad, strides=strides)
    child, report = onnxmorph.morph(parent, "kernel", layer="conv", size="5x4", trials=2)
    assert report, report
    attrs = _conv_attrs(child, "conv")
    assert "auto_pad" not in attrs and len(attrs["pads"]) == 4


def test_shrinking_refused_unless_the_ring_is_zero(caplog) -> None:
    parent = _conv_model((5, 5), (8, 8), pads=[2, 2, 2, 2])
    with pytest.raises(NotApplicable, match="non-zero taps"):
        onnxmorph.kernel(parent, layer="conv", size=3)
    ring_free = resize_kernel(resize_kernel(_weight(parent, "w"), (3, 3)), (5, 5))
    parent = _conv_model((5, 5), (8, 8), weight=ring_free, pads=[2, 2, 2, 2])
    with caplog.at_level("WARNING", logger="onnxmorph"):
        child, report = onnxmorph.morph(parent, "kernel", layer="conv", size=3)
    assert report and _weight(child, "w").shape == (4, 3, 3, 3)
    assert "removed outer taps are all zero" in caplog.text
    # a zero ring but not enough padding to give back
    parent = _conv_model((5, 5), (8, 8), weight=ring_free, pads=[0, 2, 2, 2])
    with pytest.raises(NotApplicable, match="negative padding"):
        onnxmorph.kernel(parent, layer="conv", size=3)


def test_refusals_name_the_layer() -> None:
    model = reference_model("cifar10_quick")
    with pytest.raises(NotApplicable, match="'fc1' is a Gemm"):
        KernelPass(layer="fc1", size=3).requires(model)
    with pytest.raises(NotApplicable, match="already 5x5"):
        KernelPass(layer="conv2", size=5).requires(model)
    with pytest.raises(NotApplicable, match="3 axes"):
        KernelPass(layer="conv2", size="7x7x7").requires(model)
    with pytest.raises(UsageError, match="no layer 'nope'"):
        KernelPass(layer="nope", size=7).requires(model)
    with pytest.raises(UsageError):
        KernelPass(layer="conv2", size="0")


@pytest.mark.parametrize("stem,layer,size", [
    ("cifar10_quick", "conv2", "7"), ("vgg_bn", "conv2_1", "5x3"), ("resnet_mini", "s2b1_conv1", "4"),
    ("mobilenet_mini", "dw2", "5"), ("inception_mini", "inc1_1x1", "3"),
])
def test_reference_models(stem: str, layer: str, size: str) -> None:
    parent = reference_model(stem)
    child, report = onnxmorph.morph(parent, "kernel", layer=layer, size=size, trials=2)
    assert report, report
    assert len(child.graph.node) == len(parent.graph.node)
    info = {i.name: i for i in mgraph.layers(mgraph.read_view(child))}
    assert all(a >= b for a, b in zip(info[layer].weight_shape[2:], [3, 3]))
    assert any(n == "kernel" for n in onnxmorph.inspect(parent)["layers"][0]["morphs"])


def test_cli(tmp_path) -> None:
    out = tmp_path / "child.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxmorph", "kernel", str(MODELS / "cifar10_quick.onnx"),
                           "--layer", "conv3", "--size", "7", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout and out.is_file()
    proc = subprocess.run([sys.executable, "-m", "onnxmorph", "kernel", str(MODELS / "cifar10_quick.onnx"),
                           "--layer", "conv3", "--size", "3", "-o", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "non-zero taps" in proc.stderr


def _conv_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in mgraph.layers(mgraph.read_view(model)) if i.op == "Conv"]


@pytest.mark.parametrize("stem", light_stems(slow=("light_densenet121",)))  # the longest: -m slow
def test_real_architectures_verify_or_refuse_in_one_line(stem: str) -> None:
    model = light_model(stem)
    names = _conv_names(model)
    for name in sample_layers(names, 24, seed=3):  # every Conv in a full sweep (densenet has 121)
        try:
            KernelPass(layer=name, size=7).requires(model)
        except NotApplicable as exc:
            assert "\n" not in str(exc) and name in str(exc)
    verifier = onnxmorph.Verifier(model, trials=1)
    for name in sample_layers(names, 2, seed=5):
        kernel = mgraph.find_layer(mgraph.read_view(model), name).inputs[1].shape[2:]
        step = KernelPass(layer=name, size=[k + 2 for k in kernel])
        step.requires(model)
        report = verifier.check(step.apply(model).model)
        assert report, f"{stem}/{name}: {report.summary()}"
