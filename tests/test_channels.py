"""Tests of the channel-coupling analysis (onnxmorph.channels) and of widen across each coupled op."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import described, text_model
from onnx import numpy_helper

import onnxmorph
from onnxmorph.analysis import channels
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph

RNG = np.random.default_rng(7)



def _model(body: str, inits: dict[str, np.ndarray], x: str = "float[N, 4, 6, 6]", y: str = "float[N, 3]",
           opset: int = 13) -> onnx.ModelProto:
    """A model from ONNX text: input x, output y, `body` with the given initializers."""
    return text_model(body, inits, x=x, y=y, opset=opset)


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(0, 0.5, size=shape)


def _conv_head(c: int = 8, hw: int = 6) -> dict[str, np.ndarray]:
    """Weights of conv1 (4 -> c) and of the head fc (c*hw*hw -> 3)."""
    return {"w1": _w(c, 4, 3, 3), "b1": _w(c), "fc": _w(c * hw * hw, 3)}


def _analyze(model: onnx.ModelProto, layer: str, added: int = 4) -> channels.Coupling:
    view = mgraph.read_view(model)
    node = mgraph.find_node(view, layer)
    old = int(node.inputs[1].values.shape[0])
    return channels.analyze(view, node.outputs[0].name, 1, [(old, added)], mgraph.tensor_shapes(model))


def _widen_and_verify(model: onnx.ModelProto, layer: str, width: int, method: str = "netmorph") -> onnx.ModelProto:
    child = onnxmorph.widen(model, layer=layer, width=width, method=method, verify=False)
    report = onnxmorph.verify(model, child, trials=1)
    assert report, report.summary()
    return child


HEAD = "f = Flatten(a)\n y = MatMul(f, fc)"


@pytest.mark.parametrize("middle, extra", [
    ("a = Relu(h)", {}),
    ("a = LeakyRelu<alpha=0.1>(h)", {}),
    ("a = PRelu(h, slope)", {"slope": np.abs(_w(8, 1, 1))}),
    ("a = Clip(h, lo, hi)", {"lo": np.array(-0.5), "hi": np.array(0.5)}),
    ("a = Sigmoid(h)", {}),
    ("a = Tanh(h)", {}),
    ("a = Elu(h)", {}),
    ("s = Mul(h, scale)\n a = Add(s, shift)", {"scale": np.abs(_w(8, 1, 1)), "shift": _w(8, 1, 1)}),
    ("a = Sub(h, shift)", {"shift": _w(1, 8, 1, 1)}),
    ("a = BatchNormalization(h, g, bb, m, v)",
     {"g": np.abs(_w(8)), "bb": _w(8), "m": _w(8), "v": np.abs(_w(8)) + 0.1}),
    ("a = Dropout(h)", {}),
    ("p = Pad(h, pads)\n a = MaxPool<kernel_shape=[3,3]>(p)", {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1])}),
    ("a = AveragePool<kernel_shape=[3,3], pads=[1,1,1,1]>(h)", {}),
    ("t = Transpose<perm=[0,2,3,1]>(h)\n r = Relu(t)\n a = Transpose<perm=[0,3,1,2]>(r)", {}),
])
def test_widen_through_per_channel_ops(middle: str, extra: dict) -> None:
    body = f"h = Conv<pads=[1,1,1,1]>(x, w1, b1)\n {middle}\n {HEAD}"
    inits = _conv_head() | {k: v for k, v in extra.items() if k != "pads"}
    model = _model_ints(body, inits, {k: v for k, v in extra.items() if k == "pads"})
    coupling = _analyze(model, "h")
    assert [p.node for p in coupling.producers] == ["h"]
    assert [c.node for c in coupling.consumers] == ["y"] and coupling.consumers[0].block == 36
    for method in ("netmorph", "lemon"):
        child = _widen_and_verify(model, "h", 12, method)
        weights = {t.name: t.dims for t in child.graph.initializer}
        assert list(weights["w1"]) == [12, 4, 3, 3] and list(weights["fc"]) == [12 * 36, 3]


def _model_ints(body: str, inits: dict[str, np.ndarray], ints: dict[str, np.ndarray], **kw) -> onnx.ModelProto:
    model = _model(body, inits, **kw)
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.int64), k) for k, v in ints.items())
    return onnxmorph.normalize(model)


def test_global_pool_squeeze_into_matmul_and_unsqueeze() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, w1, b1)
    g = GlobalMaxPool(h)
    s = Squeeze(g, axes)
    u = Unsqueeze(s, axes0)
    q = Squeeze(u, axes0)
    y = MatMul(q, fc)"""
    model = _model_ints(body, {"w1": _w(8, 4, 3, 3), "b1": _w(8), "fc": _w(8, 3)},
                        {"axes": np.array([2, 3]), "axes0": np.array([0])})
    coupling = _analyze(model, "h")
    assert coupling.consumers[0].weight_axis == 0 and coupling.consumers[0].block == 1
    for method in ("netmorph", "lemon"):
        _widen_and_verify(model, "h", 11, method)


def test_reshape_with_constant_target_is_recomputed() -> None:
    body = "h = Conv<pads=[1,1,1,1]>(x, w1, b1)\n r = Reshape(h, shape)\n y = MatMul(r, fc)"
    model = _model_ints(body, _conv_head(), {"shape": np.array([-1, 288])})
    coupling = _analyze(model, "h")
    assert [f.node for f in coupling.shape_fixes] == ["r"]
    child = _widen_and_verify(model, "h", 10, "net2net")
    target = next(numpy_helper.to_array(t) for t in child.graph.initializer if t.name == "shape")
    assert target.tolist() == [-1, 360]


def test_channel_shuffle_is_refused_with_one_line() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, w1, b1)
    r = Reshape(h, s5)
    t = Transpose<perm=[0,2,1,3,4]>(r)
    z = Reshape(t, s4)
    f = Flatten(z)
    y = MatMul(f, fc)"""
    model = _model_ints(body, _conv_head(), {"s5": np.array([1, 2, 4, 6, 6]), "s4": np.array([1, 8, 6, 6])},
                        x="float[1, 4, 6, 6]", y="float[1, 3]")
    with pytest.raises(NotApplicable, match="Reshape 'r' splits the channel axis") as info:
        _analyze(model, "h")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("body, message", [
    ("h = Conv<pads=[1,1,1,1]>(x, w1, b1)\n a = Softmax<axis=1>(h)\n" + HEAD, "Softmax 'a' mixes the channels"),
    ("h = Conv<pads=[1,1,1,1]>(x, w1, b1)\n a = LayerNormalization<axis=1>(h, ln, lb)\n" + HEAD,
     "LayerNormalization 'a'"),
    ("h = Conv<pads=[1,1,1,1]>(x, w1, b1)\n a = ReduceSum<keepdims=1>(h)\n" + HEAD, "ReduceSum 'a'"),
    ("h = Conv<pads=[1,1,1,1]>(x, w1, b1)\n f = Flatten(h)\n y = Identity(f)", "graph output 'y'"),
])
def test_refusals_name_the_op(body: str, message: str) -> None:
    inits = _conv_head() | {"ln": np.ones((8, 6, 6)), "lb": np.zeros((8, 6, 6))}
    model = _model(body, inits, y="float[N, 288]" if "Identity" in body else "float[N, 3]", opset=17)
    with pytest.raises(NotApplicable, match=message) as info:
        onnxmorph.get_pass("widen")(layer="h", width=12).requires(model)
    assert "\n" not in str(info.value)


def test_residual_sum_widens_every_producer_and_sub_operand() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, w1, b1)
    k = Conv<pads=[1,1,1,1]>(x, w2, b2)
    a = Sum(h, k)
    r = Relu(a)
    j = Conv<pads=[1,1,1,1]>(r, w3, b3)
    d = Sub(j, r)
    f = Flatten(d)
    y = MatMul(f, fc)"""
    inits = _conv_head() | {"w2": _w(8, 4, 3, 3), "b2": _w(8), "w3": _w(8, 8, 3, 3), "b3": _w(8)}
    model = _model(body, inits)
    coupling = _analyze(model, "h")
    assert sorted(p.node for p in coupling.producers) == ["h", "j", "k"]
    assert sorted(c.node for c in coupling.consumers) == ["j", "y"]
    facts = described(onnxmorph.get_pass("widen")(layer="k", width=12), model)
    assert sorted(facts["coupled"]) == ["h", "j"]
    for method in ("netmorph", "net2net", "lemon"):
        child = _widen_and_verify(model, "k", 12, method)
        dims = {t.name: list(t.dims) for t in child.graph.initializer}
        assert dims["w1"][0] == dims["w2"][0] == 12 and dims["w3"][:2] == [12, 12]


def test_grouped_conv_consumer_gets_new_groups() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, w1, b1)
    r = Relu(h)
    gc = Conv<group=2, pads=[1,1,1,1]>(r, wg, bg)
    f = Flatten(gc)
    y = MatMul(f, fc)"""
    inits = _conv_head() | {"wg": _w(6, 4, 3, 3), "bg": _w(6)}
    inits["fc"] = _w(6 * 36, 3)
    model = _model(body, inits)
    coupling = _analyze(model, "h", added=4)
    assert coupling.groups[0].node == "gc" and coupling.groups[0].added_groups == 1
    assert coupling.spaces[1].derived_from == "gc"
    child = _widen_and_verify(model, "h", 12)
    node = next(n for n in child.graph.node if n.name == "gc")
    assert onnx.helper.get_attribute_value(node.attribute[0]) == 3 or any(
        a.name == "group" and a.i == 3 for a in node.attribute)
    # copies cannot fill new groups; they widen every group by copies of its own channels instead
    copied = _widen_and_verify(model, "h", 12, "net2net")
    node = next(n for n in copied.graph.node if n.name == "gc")
    assert [a.i for a in node.attribute if a.name == "group"] == [2]
    with pytest.raises(NotApplicable, match="groups"):
        onnxmorph.get_pass("widen")(layer="h", width=11).requires(model)


def test_concat_offset_and_lrn_needs_the_end() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, w1, b1)
    k = Conv<pads=[1,1,1,1]>(x, w2, b2)
    c = Concat<axis=1>(h, k)
    r = Relu(c)
    l = LRN<size=3>(r)
    f = Flatten(l)
    y = MatMul(f, fc)"""
    inits = _conv_head() | {"w2": _w(8, 4, 3, 3), "b2": _w(8)}
    inits["fc"] = _w(16 * 36, 3)
    model = _model(body, inits)
    widen = onnxmorph.get_pass("widen")
    with pytest.raises(NotApplicable, match="LRN 'l' sums neighbouring channels"):
        widen(layer="h", width=12).requires(model)
    coupling = _analyze(model, "k")
    assert coupling.lrn == ["l"] and coupling.consumers[0].offset == 8 * 36
    child = _widen_and_verify(model, "k", 12)
    arrays = {t.name: numpy_helper.to_array(t) for t in child.graph.initializer}
    # LRN size 3 reaches one channel past the last old one: that new channel is exactly 0 (zero
    # filter, random outgoing weights), the other three are ordinary netmorph channels
    w2, fc = arrays["w2"], arrays["fc"].reshape(-1, 36, 3)
    assert w2.shape == (12, 4, 3, 3) and not w2[8].any() and all(w2[c].any() for c in range(9, 12))
    assert fc.shape == (20, 36, 3) and fc[16].any() and not fc[17:].any()
    with pytest.raises(NotApplicable, match="LRN 'l'"):
        widen(layer="k", width=12, method="lemon").requires(model)


@pytest.mark.parametrize("size", [3, 5])  # onnxruntime runs odd sizes only
def test_grouped_conv_before_lrn_becomes_dense(size: int) -> None:
    """AlexNet's conv2: grouped, then an LRN. New channels inside the groups would shift the LRN
    windows, so the conv becomes dense (block-diagonal old weights) and the new channels go last."""
    body = f"""h = Conv<pads=[1,1,1,1], group=2>(x, w1, b1)
    r = Relu(h)
    l = LRN<size={size}, alpha=0.5, beta=0.75, bias=1.0>(r)
    k = Conv<pads=[1,1,1,1]>(l, w2, b2)
    f = Flatten(k)
    y = MatMul(f, fc)"""
    inits = {"w1": _w(8, 2, 3, 3), "b1": _w(8), "w2": _w(5, 8, 3, 3), "b2": _w(5), "fc": _w(5 * 36, 3)}
    model = _model(body, inits)
    widen = onnxmorph.get_pass("widen")
    assert described(widen(layer="h", width=14), model)["made_dense"] == ["h"]
    child = _widen_and_verify(model, "h", 14)
    node = next(n for n in child.graph.node if n.name == "h")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == 1
    arrays = {t.name: numpy_helper.to_array(t) for t in child.graph.initializer}
    w1, w2 = arrays["w1"], arrays["w2"]
    assert w1.shape == (14, 4, 3, 3) and w2.shape == (5, 14, 3, 3)
    # the old filters are block-diagonal copies of the grouped ones
    assert np.array_equal(w1[:4, :2], inits["w1"][:4].astype(np.float32)) and not w1[:4, 2:].any()
    assert np.array_equal(w1[4:8, 2:], inits["w1"][4:].astype(np.float32)) and not w1[4:8, :2].any()
    guard = size // 2  # ceil((size - 1) / 2) new channels inside the last old channel's window
    assert not w1[8:8 + guard].any() and all(w1[c].any() for c in range(8 + guard, 14))
    assert all(w2[:, c].any() for c in range(8, 8 + guard)) and not w2[:, 8 + guard:].any()
    with pytest.raises(NotApplicable, match="LRN 'l'"):
        widen(layer="h", width=14, method="net2net").requires(model)


def test_concat_in_the_middle_without_lrn() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, w1, b1)
    k = Conv<pads=[1,1,1,1]>(x, w2, b2)
    c = Concat<axis=1>(k, h, k)
    f = Flatten(c)
    y = MatMul(f, fc)"""
    inits = _conv_head() | {"w2": _w(8, 4, 3, 3), "b2": _w(8)}
    inits["fc"] = _w(24 * 36, 3)
    model = _model(body, inits)
    for layer in ("h", "k"):
        for method in ("netmorph", "net2net", "lemon"):
            _widen_and_verify(model, layer, 13, method)


def test_resize_off_the_channel_axis() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, w1, b1)
    u = Resize(h, roi, scales)
    p = MaxPool<kernel_shape=[2,2], strides=[2,2]>(u)
    f = Flatten(p)
    y = MatMul(f, fc)"""
    inits = _conv_head() | {"roi": np.zeros(0), "scales": np.array([1, 1, 2, 2])}
    model = _model(body, inits)
    _widen_and_verify(model, "h", 12, "net2net")
