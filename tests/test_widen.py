"""Tests of the widen pass: numpy solvers, every method on the reference models, real architectures, CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    FULL_SWEEP,
    LIGHT_MODELS,
    MODELS,
    described,
    light_model,
    light_stems,
    reference_model,
    sample_layers,
)
from onnx import numpy_helper

import onnxmorph
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.numerics import widening
from onnxmorph.verification.verifier import Verifier

METHODS = ("netmorph", "net2net", "lemon")


# ---------------------------------------------------------------- numpy solvers


@pytest.mark.parametrize("method", ["net2net", "lemon"])
@pytest.mark.parametrize("block", [1, 4])

def test_outgoing_weights_keep_the_sum_over_copies(method: str, block: int) -> None:
    rng = np.random.default_rng(0)
    c, added = 6, 5
    w = rng.normal(size=(2 + c * block, 3))  # two leading columns that belong to another tensor
    h = rng.normal(size=(7, 2 + c * block))
    inserts = [(c, added)]
    sources = widening.replication_sources(c, inserts, rng)
    assert sorted(set(sources.tolist())) == sorted(sources.tolist())[: len(set(sources.tolist()))]
    h_new = widening.solve_widen_incoming(h, 1, inserts, rng, mode="copy", sources=sources, offset=2, block=block)
    w_new = widening.solve_widen_outgoing(w, 0, inserts, rng, method=method, sources=sources, offset=2,
                                          block=block, noise=0.1 if method == "net2net" else 0.0)
    assert w_new.shape == (2 + (c + added) * block, 3)
    np.testing.assert_allclose(h_new @ w_new, h @ w, rtol=1e-10, atol=1e-10)
    copy = w_new[2 + c * block: 2 + (c + 1) * block]
    original = w_new[2 + sources[0] * block: 2 + (sources[0] + 1) * block]
    assert not np.allclose(copy, original)  # noise or lemon breaks the symmetry


def test_netmorph_incoming_random_and_outgoing_zero() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.3, size=(8, 4, 3, 3))
    grown = widening.solve_widen_incoming(w, 0, [(8, 4)], rng, mode="random")
    assert grown.shape == (12, 4, 3, 3) and np.array_equal(grown[:8], w)
    assert 0.15 < grown[8:].std() < 0.6
    out = widening.solve_widen_outgoing(rng.normal(size=(5, 8)), 1, [(3, 2), (8, 2)], rng, method="netmorph")
    assert out.shape == (5, 12) and not out[:, 3:5].any() and not out[:, 10:].any()


def test_replication_stays_within_groups() -> None:
    sources = widening.replication_sources(8, [(4, 2), (8, 2)], np.random.default_rng(0), groups=2)
    assert all(s < 4 for s in sources[:2]) and all(4 <= s < 8 for s in sources[2:])


# ---------------------------------------------------------------- reference models


CASES = [
    ("cifar10_quick", "conv3", 48, "flatten into Gemm"),
    ("vgg_bn", "conv3_2", 96, "batch-norm, flatten into Gemm"),
    ("vgg_bn", "fc1", 96, "Gemm, dropout"),
    ("resnet_mini", "s1b1_conv2", 24, "residual stage through its Add chain"),
    ("resnet_mini", "s2b1_proj", 48, "projection shortcut of a residual stage"),
    ("resnet_mini", "s2b1_conv1", 48, "first conv of a block"),
    ("inception_mini", "inc1_3x3", 40, "concat in the middle of its inputs"),
    ("inception_mini", "inc2_pool_proj", 24, "concat, global pool, flatten into Gemm"),
    ("mobilenet_mini", "pw1", 48, "depthwise conv gets new groups"),
    ("mobilenet_mini", "dw2", 48, "depthwise layer widens with its producer"),
    ("transformer_ff", "ff1", 96, "feed-forward hidden layer: MatMul, Gelu, MatMul"),
    ("mlp_tanh", "fc1", 48, "MatMul with Add bias, tanh"),
    ("mlp_relu", "fc2", 48, "Gemm, relu"),
]


@pytest.fixture(scope="module")
def verifiers() -> dict[str, Verifier]:
    return {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stem, layer, width, what", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_widen_reference_models(stem: str, layer: str, width: int, what: str, method: str,
                                verifiers: dict[str, Verifier]) -> None:
    parent = reference_model(stem)
    view = mgraph.read_view(parent)
    width = onnxmorph.get_pass("widen").probe(parent, mgraph.layer_info(mgraph.find_node(view, layer))).width
    coupling_layers = described(onnxmorph.get_pass("widen")(layer=layer, width=width, method=method), parent)
    child = onnxmorph.widen(parent, layer=layer, width=width, method=method, seed=3, verify=False)
    if stem not in verifiers:
        verifiers[stem] = Verifier(parent, trials=1)
    report = verifiers[stem].check(child)
    assert report, f"{what}: {report.summary()}"
    node = mgraph.find_layer(view, layer)
    weights = {t.name: numpy_helper.to_array(t) for t in child.graph.initializer}
    new_w = weights[node.inputs[1].name]
    old_w = np.asarray(node.inputs[1].values)
    out_axis = 0 if node.op == "Conv" else (0 if node.attrs.get("transB", 0) else old_w.ndim - 1)
    assert new_w.shape[out_axis] == width
    assert np.array_equal(np.take(new_w, range(old_w.shape[out_axis]), axis=out_axis), old_w)
    for other in coupling_layers["coupled"]:
        onode = mgraph.find_layer(view, other) if other in {n.name for n in view.nodes} else None
        if onode is not None and onode.op == "Conv" and int(onode.attrs.get("group", 1)) == 1:
            assert weights[onode.inputs[1].name].shape[0] == width


def test_residual_group_and_depthwise_structure() -> None:
    parent = reference_model("resnet_mini")
    facts = described(onnxmorph.get_pass("widen")(layer="s1b1_conv2", width=24), parent)
    assert sorted(facts["coupled"]) == ["s1b2_conv2", "stem_conv"]
    assert "s2b1_proj" in facts["consumers"] and "s2b1_conv1" in facts["consumers"]
    mobile = reference_model("mobilenet_mini")
    child = onnxmorph.widen(mobile, layer="pw1", width=48, verify=False)
    dw2 = next(n for n in child.graph.node if n.name == "dw2")
    assert next(a.i for a in dw2.attribute if a.name == "group") == 48
    weights = {t.name: tuple(t.dims) for t in child.graph.initializer}
    assert weights[dw2.input[1]][0] == 48 and weights["pw2_w" if "pw2_w" in weights else dw2.input[1]][0] == 48


@pytest.mark.parametrize("stem, layer, width, message", [
    ("transformer_ff", "ff2", 48, "graph input 'input' carries the channels"),
    ("cifar10_quick", "fc2", 20, "graph output 'logits' exposes the channels"),
    ("cifar10_quick", "conv1", 16, "has 32 output channels already"),
    ("inception_mini", "stem_conv", 48, "LRN 'stem_lrn'"),
])
def test_refusals_are_one_line(stem: str, layer: str, width: int, message: str) -> None:
    method = "net2net" if "LRN" in message else "netmorph"
    with pytest.raises(NotApplicable, match=message) as info:
        onnxmorph.get_pass("widen")(layer=layer, width=width, method=method).requires(reference_model(stem))
    assert "\n" not in str(info.value)


def test_lrn_layer_keeps_only_the_window_reach_zero() -> None:
    parent = reference_model("inception_mini")
    child = onnxmorph.widen(parent, layer="stem_conv", width=48, seed=1)
    node = mgraph.find_layer(mgraph.read_view(parent), "stem_conv")
    w = next(numpy_helper.to_array(t) for t in child.graph.initializer if t.name == node.inputs[1].name)
    old = node.inputs[1].values.shape[0]
    # LRN size 5: the last old channel's window reaches 2 new channels; those are exactly 0, the
    # others have random filters like any netmorph channel (not a whole block of dead units)
    assert w.shape[0] == 48 and not w[old:old + 2].any() and all(w[c].any() for c in range(old + 2, 48))
    assert onnxmorph.history(child)[-1]["verification"]["passed"]


def test_inspect_shows_widen_and_its_group() -> None:
    info = onnxmorph.inspect(reference_model("resnet_mini"))
    verdicts = {layer["name"]: layer["morphs"]["widen"] for layer in info["layers"]}
    assert verdicts["s1b1_conv2"]["applies"] and "stem_conv" in verdicts["s1b1_conv2"]["coupled"]
    assert not verdicts["fc"]["applies"] and "graph output" in verdicts["fc"]["reason"]


def test_cli_widen(tmp_path) -> None:
    out = tmp_path / "child.onnx"
    result = subprocess.run([sys.executable, "-m", "onnxmorph", "widen", str(MODELS / "vgg_bn.onnx"), "--layer",
                             "conv2_1", "--width", "48", "--method", "lemon", "--seed", "2", "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.exists()
    bad = subprocess.run([sys.executable, "-m", "onnxmorph", "widen", str(MODELS / "vgg_bn.onnx"), "--layer", "fc2",
                          "--width", "20", "-o", str(tmp_path / "no.onnx")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "no.onnx").exists()


# ---------------------------------------------------------------- real architectures


# loading VGG19/ZFNet/AlexNet (0.2-0.5 GB each) alone takes 15-40 s: the full sweep checks them
@pytest.mark.parametrize("stem", light_stems())
def test_requires_on_every_conv_of_real_architectures(stem: str) -> None:
    model = light_model(stem)
    widen = onnxmorph.get_pass("widen")
    verdicts = []
    convs = [info for info in mgraph.layers(mgraph.read_view(model)) if info.op == "Conv"]
    # the big models (VGG19 is 550 MB) cost seconds per layer: CI samples them
    count = 4 if stem in ("light_vgg19", "light_zfnet512", "light_bvlc_alexnet", "light_densenet121") else 60
    # always include the last conv: on SqueezeNet and DenseNet it is the classifier
    picked = set(sample_layers([c.name for c in convs], count, seed=1)) | {convs[-1].name}
    for info in convs:
        if info.name not in picked:
            continue
        probe = widen.probe(model, info)
        try:
            probe.requires(model)
            verdicts.append(True)
        except NotApplicable as exc:
            assert str(exc) and "\n" not in str(exc)
            verdicts.append(False)
            if stem in MUST_WIDEN:
                # the only refusal a model of the list may give: the classifier conv, whose
                # channels are the graph output (widening it would change the output's shape)
                assert info.name == convs[-1].name and "graph output" in str(exc), (stem, info.name, str(exc))
    assert any(verdicts) or stem == "light_shufflenet", stem


MUST_WIDEN = ("light_resnet50", "light_vgg19", "light_squeezenet", "light_inception_v1", "light_inception_v2",
              "light_bvlc_alexnet", "light_densenet121", "light_zfnet512")


def test_alexnet_conv2_grouped_before_lrn_verifies() -> None:
    """AlexNet's conv2 has 2 groups and an LRN after it: it becomes dense and verifies (about 7 s)."""
    model = light_model("light_bvlc_alexnet")
    widen = onnxmorph.get_pass("widen")(layer="n4", width=384)
    assert described(widen, model)["made_dense"] == ["n4"]
    child = widen.apply(model).model
    node = next(n for n in child.graph.node if n.name == "n4")
    weights = {t.name: tuple(t.dims) for t in child.graph.initializer}
    assert weights[node.input[1]] == (384, 96, 5, 5)
    assert all(a.i == 1 for a in node.attribute if a.name == "group")
    report = Verifier(model, trials=1).check(child)
    assert report, report.summary()


# VGG19 / AlexNet / ZFNet children take 10-30 s each: the full sweep (ONNXMORPH_FULL_SWEEP=1) covers them
LIGHT_CASES = [("light_resnet50", 2), ("light_squeezenet", 3), ("light_inception_v1", 2)]
if FULL_SWEEP:
    LIGHT_CASES = [(stem, 1000) for stem in LIGHT_MODELS]


@pytest.mark.parametrize("stem, count", LIGHT_CASES)
def test_widen_real_architectures_verifies(stem: str, count: int) -> None:
    model = light_model(stem)
    widen = onnxmorph.get_pass("widen")
    convs = [info for info in mgraph.layers(mgraph.read_view(model)) if info.op == "Conv"]
    picked = set(sample_layers([c.name for c in convs], count, seed=5))
    verifier = None
    for info in convs:
        if info.name not in picked:
            continue
        probe = widen.probe(model, info)
        try:
            probe.requires(model)
        except NotApplicable:
            continue
        verifier = verifier or Verifier(model, trials=1)
        report = verifier.check(probe.apply(model).model)
        assert report, f"{stem} {info.name}: {report.summary()}"
