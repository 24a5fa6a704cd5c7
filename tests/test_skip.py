"""Tests of skip connections: zero-initialised add (strided projection), concat with zero consumer weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import MODELS, reference_model
from onnx import numpy_helper
from onnxmorph.passes.skip import SkipPass, match_strides

import onnxmorph
from onnxmorph.errors import NotApplicable


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_match_strides() -> None:
    assert match_strides((32, 32), (16, 16)) == (2, 2)
    assert match_strides((7, 8), (4, 8)) == (2, 1)
    assert match_strides((32,), (4,)) == (8,)
    assert match_strides((8,), (16,)) is None
    assert match_strides((10,), (6,)) is None
    assert match_strides((), ()) == ()


@pytest.mark.parametrize("stem,a,b,strides", [
    ("cifar10_quick", "input", "conv2_out", [2, 2]),           # 3 -> 32 channels, 32x32 -> 16x16
    ("cifar10_quick", "relu1_out", "relu3_out", [2, 2]),
    ("cifar10_quick", "conv1_out", "pool3_out", [8, 8]),
    ("resnet_mini", "stem_conv_relu_out", "s2b1_relu_out", None),
    ("cifar10_quick", "flatten_out", "fc1_out", None),           # [N, C]: a Gemm projection
])
def test_add_skip(stem: str, a: str, b: str, strides: list[int] | None) -> None:
    parent = reference_model(stem)
    child, report = onnxmorph.morph(parent, "skip", source=a, target=b, trials=2)
    assert report, report
    proj, add = _node(child, f"{b}/morph_skip/proj"), _node(child, f"{b}/morph_skip/add")
    assert proj.input[0] == a and add.op_type == "Add"
    w = _weights(child)[proj.input[1]]
    assert not w.any()  # zero-initialised
    if strides is not None:
        assert proj.op_type == "Conv" and _attrs(proj)["strides"] == strides and w.shape[2:] == (1, 1)
    # B's readers now read the sum; B itself is untouched
    assert add.input[0] == b and add.output[0] == f"{b}/morph_skip/out"
    assert all(b not in n.input for n in child.graph.node if n.name not in (add.name,))
    assert len(child.graph.node) == len(parent.graph.node) + 2


def test_add_skip_to_a_graph_output_keeps_its_name() -> None:
    parent = reference_model("mlp_relu")
    child, report = onnxmorph.morph(parent, "skip", source="relu1", target="fc3", trials=2)
    assert report, report
    add = _node(child, "logits/morph_skip/add")
    assert add.output[0] == "logits" and _node(child, "fc3").output[0] == "logits/morph_skip/in"


@pytest.mark.parametrize("stem,a,b,consumer", [
    ("cifar10_quick", "pool1_out", "pool2_out", "conv3"),
    ("cifar10_quick", "relu1_out", "relu2_out", "conv3"),       # through an AveragePool
    ("cifar10_quick", "conv1_out", "relu3_out", "fc1"),         # through pool and Flatten: 16 columns a channel
    ("vgg_bn", "pool1_out", "pool2_out", "conv3_1"),
    ("vgg_bn", "input", "conv1_1_out", "conv1_2"),              # through a batch-norm, extended
    ("mobilenet_mini", "stem_conv_relu6_out", "pw1_relu6_out", "pw2"),  # through a depthwise conv
    ("inception_mini", "stem_lrn_out", "inc1_3x3_relu_out", "mix1"),    # inside a Concat, at an offset
    ("mlp_relu", "relu1_out", "relu2_out", "fc3"),
])
def test_concat_skip(stem: str, a: str, b: str, consumer: str) -> None:
    parent = reference_model(stem)
    child, report = onnxmorph.morph(parent, "skip", source=a, target=b, mode="concat", trials=2)
    assert report, report
    concat = _node(child, f"{b}/morph_skip/concat")
    assert concat.op_type == "Concat" and concat.input[0] == b
    node = _node(child, consumer)
    old = _weights(parent)[_node(parent, consumer).input[1]]
    new = _weights(child)[node.input[1]]
    axis = 0 if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attrs(node).get("transB", 0)) else 1
    added = new.shape[axis] - old.shape[axis]
    assert added > 0
    # A's entries form one block of zeros (after B's channels, at an offset inside a Concat); the rest is old
    starts = [k for k in range(new.shape[axis] - added + 1)
              if not np.take(new, range(k, k + added), axis=axis).any()
              and np.array_equal(np.delete(new, range(k, k + added), axis=axis), old)]
    assert starts, "the consumer's weights are not the old ones plus a block of zeros"


def test_refusals() -> None:
    model = reference_model("cifar10_quick")
    cases = [
        ({"source": "conv3_out", "target": "conv1_out"}, "cycle"),
        ({"source": "conv2_out", "target": "conv2_out"}, "same tensor"),
        ({"source": "pool3_out", "target": "relu2_out"}, "not an ancestor"),
        ({"source": "pool2_out", "target": "relu1_out"}, "not an ancestor"),
        ({"source": "relu1_out", "target": "fc1_out"}, "same rank"),
        ({"source": "fc1_out", "target": "logits", "mode": "concat"}, "graph output"),
        ({"source": "conv1.weight", "target": "logits"}, "constant"),
    ]
    for params, reason in cases:
        with pytest.raises(NotApplicable, match=reason):
            SkipPass(**params).requires(model)
    inception = reference_model("inception_mini")
    with pytest.raises(NotApplicable, match=r"not an ancestor of B$"):  # parallel branches: unrelated
        SkipPass(source="inc1_1x1_out", target="inc1_3x3_out").requires(inception)
    with pytest.raises(NotApplicable, match="LRN 'stem_lrn' would mix"):
        SkipPass(source="stem_conv_out", target="stem_relu_out", mode="concat").requires(inception)
    with pytest.raises(NotApplicable, match="meet 's1b2_conv2_bn_out'.*use --mode add"):  # a residual sum
        SkipPass(source="stem_conv_relu_out", target="s1b1_relu_out", mode="concat").requires(
            reference_model("resnet_mini"))
    with pytest.raises(NotApplicable, match="comes from a MatMul"):
        SkipPass(source="input", target="ff2_add_out").requires(reference_model("transformer_ff"))
    with pytest.raises(onnxmorph.UsageError, match="no layer 'nope'"):
        SkipPass(source="nope", target="logits").requires(model)


def test_cli(tmp_path) -> None:
    out = tmp_path / "child.onnx"
    base = [sys.executable, "-m", "onnxmorph", "skip", str(MODELS / "resnet_mini.onnx")]
    proc = subprocess.run([*base, "--from", "stem_conv_relu_out", "--to", "s2b2_relu_out", "--mode", "add",
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout and out.is_file()
    proc = subprocess.run([*base, "--from", "s2b2_relu_out", "--to", "stem_conv_relu_out", "-o",
                           str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and "cycle" in proc.stderr and proc.stderr.count("\n") == 1
