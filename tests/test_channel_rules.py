"""One ONNX-text model per channel rule added with the rule table: reductions, class tokens, shared constants,
grouped readers, channel shuffles, concat partitions and slices; each widened child is verified in onnxruntime."""

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

RNG = np.random.default_rng(12)
INT_MAX = 2 ** 63 - 1


def _model(body: str, floats: dict[str, np.ndarray], ints: dict[str, np.ndarray] | None = None, *,
           x: str = "float[2, 4, 6, 6]", y: str = "float[2, 3]", opset: int = 13) -> onnx.ModelProto:
    return text_model(body, floats, ints, x=x, y=y, opset=opset)


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(0, 0.5, size=shape)


def _widen(model: onnx.ModelProto, layer: str, width: int, method: str = "netmorph") -> onnx.ModelProto:
    child = onnxmorph.widen(model, layer=layer, width=width, method=method, verify=False)
    report = onnxmorph.verify(model, child, trials=2)
    assert report, report.summary()
    return child


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _refusal(model: onnx.ModelProto, layer: str, width: int, method: str = "netmorph") -> str:
    with pytest.raises(NotApplicable) as info:
        onnxmorph.get_pass("widen")(layer=layer, width=width, method=method).requires(model)
    assert "\n" not in str(info.value)
    return str(info.value)


CONV = "h = Conv<pads=[1,1,1,1]>(x, w1, b1)\n"
CONV_W = {"w1": _w(8, 4, 3, 3), "b1": _w(8), "fc": _w(8, 3)}


# ---------------------------------------------------------------- reductions (global pooling, SE)


@pytest.mark.parametrize("body, ints, opset", [
    ("m = ReduceMean<axes=[2,3], keepdims=0>(h)\n y = MatMul(m, fc)", {}, 13),
    ("m = ReduceMean<axes=[-1,-2], keepdims=1>(h)\n f = Flatten(m)\n y = MatMul(f, fc)", {}, 13),
    ("m = ReduceMax<axes=[3], keepdims=0>(h)\n n = ReduceMin<axes=[-1], keepdims=0>(m)\n y = MatMul(n, fc)", {}, 13),
    ("m = ReduceSum<keepdims=0>(h, axes)\n y = MatMul(m, fc)", {"axes": [-1, 2]}, 13),
    ("m = ReduceL2<axes=[2,3], keepdims=0>(h)\n y = MatMul(m, fc)", {}, 13),
    ("m = ReduceLogSumExp<axes=[2,3], keepdims=0>(h)\n y = MatMul(m, fc)", {}, 13),
    ("m = ReduceMean<keepdims=0>(h, axes)\n y = MatMul(m, fc)", {"axes": [2, 3]}, 18),
    ("m = ReduceMean<keepdims=1>(h, axes)\n f = Flatten(m)\n y = MatMul(f, fc)", {"axes": [-2, -1]}, 18),
])
def test_reduce_over_other_axes_passes_the_channels(body: str, ints: dict, opset: int) -> None:
    model = _model(CONV + body, CONV_W, ints, opset=opset)
    for method in ("netmorph", "lemon"):
        child = _widen(model, "h", 12, method)
        assert _arrays(child)["fc"].shape == (12, 3)


@pytest.mark.parametrize("body, ints, opset", [
    ("m = ReduceMean<axes=[1], keepdims=0>(h)\n y = Identity(m)", {}, 13),
    ("m = ReduceMean<keepdims=0>(h, axes)\n y = Identity(m)", {"axes": [-3]}, 18),
])
def test_reduce_over_the_channels_is_refused_with_the_reason(body: str, ints: dict, opset: int) -> None:
    model = _model(CONV + body, CONV_W, ints, y="float[2, 6, 6]", opset=opset)
    assert "ReduceMean 'm' reduces over the channel axis" in _refusal(model, "h", 12)
    # the mean over a tiled axis is the old mean: net2net at twice the width keeps it
    _widen(model, "h", 16, "net2net")
    if "axes=" not in body:  # ReduceSum takes its axes as an input from opset 13
        sums = _model(CONV + body.replace("ReduceMean", "ReduceSum"), CONV_W, ints, y="float[2, 6, 6]", opset=opset)
        assert "ReduceSum 'm' reduces over the channel axis of 'h'" in _refusal(sums, "h", 16, "net2net")


def test_squeeze_and_excitation_widens_with_its_gate() -> None:
    body = CONV + """p = ReduceMean<axes=[2,3], keepdims=1>(h)
    s1 = Conv(p, ws1, bs1)
    r = Relu(s1)
    s2 = Conv(r, ws2, bs2)
    g = HardSigmoid(s2)
    a = Mul(h, g)
    m = ReduceMean<axes=[2,3], keepdims=0>(a)
    y = MatMul(m, fc)"""
    model = _model(body, CONV_W | {"ws1": _w(2, 8, 1, 1), "bs1": _w(2), "ws2": _w(8, 2, 1, 1), "bs2": _w(8)})
    view = mgraph.read_view(model)
    coupling = channels.analyze(view, "h", 1, [(8, 4)], mgraph.tensor_shapes(model))
    assert sorted(p.node for p in coupling.producers) == ["h", "s2"]
    assert sorted(c.node for c in coupling.consumers) == ["s1", "y"]
    for layer, width in (("h", 12), ("s2", 12), ("s1", 5)):
        _widen(model, layer, width)
    _widen(model, "h", 12, "net2net")


# ---------------------------------------------------------------- constants along another axis (class token)


@pytest.mark.parametrize("make_token, floats, ints", [
    ("", {"tok": _w(2, 1, 8)}, {}),
    ("tok = Expand(cls, shape)\n", {"cls": _w(1, 1, 8)}, {"shape": [2, 1, 1]}),
    ("tok = Expand(cls, shape)\n", {"cls": _w(1, 1, 8)}, {"shape": [2, 1, 8]}),
    ("tok = Tile(cls, reps)\n", {"cls": _w(1, 1, 8)}, {"reps": [2, 1, 1]}),
])
def test_class_token_grows_its_channels(make_token: str, floats: dict, ints: dict) -> None:
    body = CONV + make_token + """f = Reshape(h, seq)
    t = Transpose<perm=[0,2,1]>(f)
    c = Concat<axis=1>(tok, t)
    p = Add(c, pos)
    m = ReduceMean<axes=[1], keepdims=0>(p)
    y = MatMul(m, fc)"""
    model = _model(body, CONV_W | floats | {"pos": _w(1, 37, 8)}, ints | {"seq": [2, 8, 36]})
    for method in ("netmorph", "net2net"):
        child = _widen(model, "h", 12, method)
        arrays = _arrays(child)
        assert arrays["pos"].shape == (1, 37, 12) and arrays["seq"].tolist() == [2, 12, 36]
        token = arrays["tok" if "tok" in arrays else "cls"]
        assert token.shape[-1] == 12 and np.array_equal(token[..., :8], (floats.get("tok", floats.get("cls"))
                                                                        ).astype(np.float32))


# ---------------------------------------------------------------- a constant shared by several readers


def test_shared_constant_grows_once_when_every_reader_widens() -> None:
    body = CONV + "a = Mul(h, s)\n r = Relu(a)\n b = Mul(r, s)\n m = ReduceMean<axes=[2,3], keepdims=0>(b)\n" \
                  "y = MatMul(m, fc)"
    model = _model(body, CONV_W | {"s": np.abs(_w(8, 1, 1)) + 0.5})
    child = _widen(model, "h", 12)
    assert len(child.graph.initializer) == len(model.graph.initializer)
    assert _arrays(child)["s"].shape == (12, 1, 1)
    assert [n.input[1] for n in child.graph.node if n.op_type == "Mul"] == ["s", "s"]


def test_shared_constant_gets_a_copy_for_the_widened_reader() -> None:
    body = CONV + """k = Conv<pads=[1,1,1,1]>(x, w2, b2)
    a = Mul(h, s)
    b = Mul(k, s)
    c = Concat<axis=1>(a, b)
    m = ReduceMean<axes=[2,3], keepdims=0>(c)
    y = MatMul(m, fc2)"""
    model = _model(body, CONV_W | {"w2": _w(8, 4, 3, 3), "b2": _w(8), "s": _w(8, 1, 1), "fc2": _w(16, 3)})
    child = _widen(model, "h", 12)
    arrays = _arrays(child)
    muls = {n.name: n.input[1] for n in child.graph.node if n.op_type == "Mul"}
    assert muls["b"] == "s" and arrays["s"].shape == (8, 1, 1)
    assert muls["a"] != "s" and arrays[muls["a"]].shape == (12, 1, 1)


# ---------------------------------------------------------------- grouped readers


GROUPED = CONV + """r = Relu(h)
    gc = Conv<group=2, pads=[1,1,1,1]>(r, wg, bg)
    m = ReduceMean<axes=[2,3], keepdims=0>(gc)
    y = MatMul(m, fc)"""
GROUPED_W = CONV_W | {"wg": _w(8, 4, 3, 3), "bg": _w(8)}


def test_grouped_reader_grows_every_group_alike() -> None:
    model = _model(GROUPED, GROUPED_W)
    child = _widen(model, "h", 10)  # 2 new channels: one at the end of each group of 4
    arrays = _arrays(child)
    assert arrays["wg"].shape == (8, 5, 3, 3) and not arrays["wg"][:, 4].any()
    node = next(n for n in child.graph.node if n.name == "gc")
    assert next(a.i for a in node.attribute if a.name == "group") == 2
    _widen(model, "h", 10, "lemon")
    _widen(model, "h", 12)  # 4 new channels: one new whole group


def test_grouped_refusals_name_the_widths_that_work() -> None:
    model = _model(GROUPED, GROUPED_W)
    assert "(new whole groups: width 12)" in _refusal(model, "h", 11)
    view = mgraph.read_view(model)
    with pytest.raises(NotApplicable, match=r"Conv 'gc' has 2 groups: .*width a multiple of 2, e\.g\. 10 or 12"):
        channels.analyze(view, "gc", 1, [(8, 3)], mgraph.tensor_shapes(model))
    # widen itself makes such a conv dense (block-diagonal old weights) rather than refuse
    assert described(onnxmorph.get_pass("widen")(layer="gc", width=11), model)["made_dense"] == ["gc"]


# ---------------------------------------------------------------- channel shuffle, split, concat partitions


SHUFFLE = """r = Reshape(cat, s5)
    t = Transpose<perm=[0,2,1,3,4]>(r)
    z = Reshape(t, s4)
    k = Conv<pads=[1,1,1,1]>(z, wk, bk)
    m = GlobalAveragePool(k)
    f = Flatten(m)
    y = MatMul(f, fc)"""


def test_channel_shuffle_takes_new_channels_spread_over_its_groups() -> None:
    body = CONV + "cat = Identity(h)\n" + SHUFFLE
    model = _model(body, CONV_W | {"wk": _w(8, 8, 3, 3), "bk": _w(8)}, {"s5": [2, 2, 4, 6, 6], "s4": [2, 8, 6, 6]})
    child = _widen(model, "h", 12)
    arrays = _arrays(child)
    assert arrays["s5"].tolist() == [2, 2, 6, 6, 6] and arrays["s4"].tolist() == [2, 12, 6, 6]
    # the shuffle brings the new channels out last, where the reader's zero weights are
    assert not arrays["wk"][:, 8:].any() and arrays["wk"].shape == (8, 12, 3, 3)
    assert "a multiple of 2" in _refusal(model, "h", 11)
    assert "net2net cannot be exact" in _refusal(model, "h", 12, "net2net")


def test_shufflenet_unit_split_branch_concat_shuffle() -> None:
    body = """c0 = Conv<pads=[1,1,1,1]>(x, w0, b0)
    s0, s1 = Split<axis=1, num_outputs=2>(c0)
    b = Conv<pads=[1,1,1,1]>(s1, wb, bb)
    cat = Concat<axis=1>(s0, b)
    """ + SHUFFLE
    model = _model(body, {"w0": _w(8, 4, 3, 3), "b0": _w(8), "wb": _w(4, 4, 3, 3), "bb": _w(4), "wk": _w(8, 8, 3, 3),
                          "bk": _w(8), "fc": _w(8, 3)}, {"s5": [2, 2, 4, 6, 6], "s4": [2, 8, 6, 6]}, opset=18)
    child = _widen(model, "b", 6)  # one new channel at each end of the two shuffle groups
    assert _arrays(child)["wk"].shape == (8, 10, 3, 3)
    child = _widen(model, "c0", 12)  # the new channels fall in the second half: the branch reads them
    split = next(n for n in child.graph.node if n.op_type == "Split")
    assert _arrays(child)[split.input[1]].tolist() == [4, 8] and _arrays(child)["wb"].shape == (4, 8, 3, 3)


def test_concat_read_as_a_whole_widens_the_input_the_new_channels_fall_in() -> None:
    body = """h = Conv<pads=[1,1,1,1]>(x, wh, bh)
    k = Conv<pads=[1,1,1,1]>(x, wk, bk)
    c = Concat<axis=1>(h, k)
    n = Conv<pads=[1,1,1,1]>(x, wn, bn)
    a = Add(c, n)
    r = Relu(a)
    m = ReduceMean<axes=[2,3], keepdims=0>(r)
    y = MatMul(m, fc)"""
    model = _model(body, {"wh": _w(4, 4, 3, 3), "bh": _w(4), "wk": _w(4, 4, 3, 3), "bk": _w(4), "wn": _w(8, 4, 3, 3),
                          "bn": _w(8), "fc": _w(8, 3)})
    child = _widen(model, "n", 12)
    arrays = _arrays(child)
    assert arrays["wk"].shape == (8, 4, 3, 3) and arrays["wh"].shape == (4, 4, 3, 3)
    assert "use --method netmorph" in _refusal(model, "n", 12, "lemon")


# ---------------------------------------------------------------- slices, splits and gathers


def test_slice_split_gather_on_other_axes_pass_through() -> None:
    body = CONV + """s = Slice(h, starts, ends, axes2)
    g = Gather<axis=3>(s, idx)
    p, q = Split<axis=2>(g, halves)
    a = Add(p, q)
    m = ReduceMean<axes=[2,3], keepdims=0>(a)
    y = MatMul(m, fc)"""
    model = _model(body, CONV_W, {"starts": [1], "ends": [5], "axes2": [2], "idx": [0, 2, 4], "halves": [2, 2]})
    for method in ("netmorph", "net2net"):
        _widen(model, "h", 12, method)


def test_slices_on_the_channel_axis_take_the_new_channels_inside_them() -> None:
    body = CONV + """lo = Slice(h, zero, four, one)
    hi = Slice(h, two, eight, one)
    k1 = Conv(lo, wa, ba)
    k2 = Conv(hi, wb, bb)
    a = Add(k1, k2)
    m = ReduceMean<axes=[2,3], keepdims=0>(a)
    y = MatMul(m, fc5)"""
    model = _model(body, CONV_W | {"wa": _w(5, 4, 1, 1), "ba": _w(5), "wb": _w(5, 6, 1, 1), "bb": _w(5),
                                   "fc5": _w(5, 3)}, {"zero": [0], "four": [4], "two": [2], "eight": [8], "one": [1]})
    child = _widen(model, "h", 11)
    arrays = _arrays(child)
    assert arrays["wa"].shape == (5, 4, 1, 1) and arrays["wb"].shape == (5, 9, 1, 1)
    hi = next(n for n in child.graph.node if n.name == "hi")
    assert arrays[hi.input[2]].tolist() == [11]


@pytest.mark.parametrize("body, ints, message", [
    ("g = Gather<axis=1>(h, idx)\n m = ReduceMean<axes=[2,3], keepdims=0>(g)\n y = MatMul(m, fc)",
     {"idx": [0, 1, 2, 3, 4, 5, 6, 7]}, "Gather 'g' gathers along the channel axis of 'h'"),
    ("s = Slice(h, zero, eight, one, two)\n m = ReduceMean<axes=[2,3], keepdims=0>(s)\n y = MatMul(m, fc)",
     {"zero": [0], "eight": [8], "one": [1], "two": [2]}, "Slice 's' slices the channel axis of 'h'"),
])
def test_channel_axis_gathers_and_strided_slices_are_refused(body: str, ints: dict, message: str) -> None:
    floats = CONV_W | {"fc": _w(8 if "Gather" in body else 4, 3)}
    model = _model(CONV + body, floats, ints)
    assert message in _refusal(model, "h", 12)


def test_a_reshape_with_unknown_leading_sizes_keeps_the_channel_axis() -> None:
    # [B*T, C] -> [B, T, C] with T dynamic (a flattened Gemm restored): the element count is kept, so a tail
    # of C entries leaves the rest in the head whatever its sizes.
    assert channels.map_reshape((None, 8), (2, None, 8), 1, 3, 1) == (2, 3, 1)
    assert channels.map_reshape((None, 8), (None, 2, 4), 1, 4, 4) == (1, 1, 1)  # heads of 4: whole blocks only
    assert channels.map_reshape((None, 8), (None, 2, 4), 1, 2, 1) is None
    assert channels.map_reshape((6, 8), (4, 12), 1, 0, 1) is None  # the channels spread over two axes
