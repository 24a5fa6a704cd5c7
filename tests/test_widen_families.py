"""Width on the graph patterns of transformer families, built by hand: fused projections split into parts, head
layouts of multi-query and interleaved attention, norms over a projection's whole width; each child verified."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import text_model
from onnx import numpy_helper

import onnxmorph

RNG = np.random.default_rng(3)


def _w(*shape: int, scale: float = 0.4) -> np.ndarray:
    return RNG.normal(0, scale, shape)


def _widen(model: onnx.ModelProto, layer: str, width: int, method: str = "netmorph") -> onnx.ModelProto:
    child, report = onnxmorph.morph(model, "widen", layer=layer, width=width, method=method)
    assert report, report
    return child


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# ------------------------------------------------------------------ a fused gate and up projection


@pytest.mark.parametrize("split, opset", [("Split<axis = -1, num_outputs = 2>(gu)", 18),
                                          ("Split<axis = -1>(gu, halves)", 13),
                                          ("Split<axis = -1>(gu)", 13)])
@pytest.mark.parametrize("width", [32, 24])
def test_a_fused_gate_up_projection_grows_both_halves_alike(split: str, opset: int, width: int) -> None:
    """`gate, up = split(x W)`, `act(gate) * up`: new channels in one half need their partners in the other (Phi-3's
    gate_up_proj); the equal Split stays equal."""
    body = f"""
    gu = MatMul(x, wgu)
    g, u = {split}
    s = Sigmoid(g)
    a = Mul(g, s)
    h = Mul(u, a)
    y = MatMul(h, wd)"""
    model = text_model(body, {"wgu": _w(8, 16), "wd": _w(8, 8)}, {"halves": [8, 8]}, x="float[N, 5, 8]",
                       y="float[N, 5, 8]", opset=opset)
    child = _widen(model, "gu", width)
    node = _node(child, "g")
    sizes = [numpy_helper.to_array(t) for t in child.graph.initializer if t.name == (node.input[1:] or [""])[0]]
    halves = [int(v) for v in sizes[0]] if sizes else None
    assert halves in (None, [width // 2] * 2)  # equal parts: explicit, or implied by num_outputs / no sizes
    weight = numpy_helper.to_array(next(t for t in child.graph.initializer if t.name == "wd"))
    assert weight.shape == (width // 2, 8)


def _chunk_model(ends: str) -> onnx.ModelProto:
    """`gate, up = gu.chunk(2)` as TorchScript writes it: bounds computed from Shape(gu)[-1] at run time."""
    body = f"""
    gu = MatMul(x, wgu)
    sh = Shape(gu)
    size = Gather<axis = 0>(sh, last)
    plus = Add(size, one)
    half = Div(plus, two)
    mid = Mul(half, one)
    g = Slice(gu, zero, mid, last)
    u = Slice(gu, mid, {ends}, last)
    s = Sigmoid(g)
    a = Mul(g, s)
    h = Mul(u, a)
    y = MatMul(h, wd)"""
    return text_model(body, {"wgu": _w(8, 16), "wd": _w(8, 8)},
                      {"last": [-1], "one": [1], "two": [2], "zero": [0], "big": [2 ** 62], "twelve": [12]},
                      x="float[N, 5, 8]", y="float[N, 5, 8]", opset=13)


@pytest.mark.parametrize("width", [32, 24])
def test_a_chunk_computed_from_the_size_moves_with_the_new_channels(width: int) -> None:
    child = _widen(_chunk_model("big"), "gu", width)
    assert numpy_helper.to_array(next(t for t in child.graph.initializer if t.name == "wd")).shape == (width // 2, 8)


def test_a_slice_bound_computed_from_the_size_that_would_not_follow_is_refused() -> None:
    """The up half ends at a constant 12 < 16 (a part of it unused): its start moves with the size, its end would
    have to move by hand, and the computed start gives the gate part the wrong share."""
    with pytest.raises(onnxmorph.NotApplicable, match="Slice 'g'|Slice 'u'"):
        onnxmorph.get_pass("widen")(layer="gu", width=24).requires(_chunk_model("twelve"))


# ------------------------------------------------------------------ heads: one key/value head, fused multi-query

H, HEADS, D = 16, 4, 4  # hidden, query heads, head size


def _mqa_model(fused: bool) -> onnx.ModelProto:
    """Multi-query attention (one key/value head shared by 4 query heads), a rotary-like table broadcast over the
    heads, the key/value head repeated by Unsqueeze + Expand + Reshape as Hugging Face's repeat_kv.

    fused: one projection of (H + 2) heads reshaped to [N, T, H + 2, d] and split on the head axis (Falcon);
    else separate q (H heads) and k, v (one head each: [N, T, d] -> [N, T, 1, d], Gemma 2B)."""
    floats = {"wo": _w(H, H), "scale": np.array(D ** -0.5), "table": _w(1, 1, 5, D), "w1": _w(H, H), "w2": _w(H, H)}
    ints = {"q4": [0, 0, HEADS, D], "one": [0, 0, 1, D], "wide": [1, 1, HEADS, 1, 1], "merge": [0, HEADS, 5, D],
            "back": [0, 0, H], "axis2": [2], "parts": [HEADS, 1, 1], "all6": [0, 0, HEADS + 2, D]}
    if fused:
        floats["wqkv"] = _w(H, H + 2 * D)
        front = """
    qkv = MatMul(x, wqkv)
    hs = Reshape(qkv, all6)
    qh, kh, vh = Split<axis = 2>(hs, parts)"""
    else:
        floats.update(wq=_w(H, H), wk=_w(H, D), wv=_w(H, D))
        front = """
    q = MatMul(x, wq)
    kk = MatMul(x, wk)
    v = MatMul(x, wv)
    qh = Reshape(q, q4)
    kh = Reshape(kk, one)
    vh = Reshape(v, one)"""
    body = front + """
    qt = Transpose<perm = [0, 2, 1, 3]>(qh)
    kt0 = Transpose<perm = [0, 2, 1, 3]>(kh)
    vt0 = Transpose<perm = [0, 2, 1, 3]>(vh)
    qr = Mul(qt, table)
    kr = Mul(kt0, table)
    ku = Unsqueeze(kr, axis2)
    ke = Expand(ku, wide)
    kt = Reshape(ke, merge)
    vu = Unsqueeze(vt0, axis2)
    ve = Expand(vu, wide)
    vt = Reshape(ve, merge)
    ktt = Transpose<perm = [0, 1, 3, 2]>(kt)
    sc = MatMul(qr, ktt)
    ss = Mul(sc, scale)
    pr = Softmax<axis = -1>(ss)
    at = MatMul(pr, vt)
    ab = Transpose<perm = [0, 2, 1, 3]>(at)
    am = Reshape(ab, back)
    o = MatMul(am, wo)
    s = Add(x, o)
    h = MatMul(s, w1)
    r = Relu(h)
    f = MatMul(r, w2)
    y = Add(s, f)"""
    return text_model(body, floats, ints, x=f"float[N, 5, {H}]", y=f"float[N, 5, {H}]", opset=17)


@pytest.mark.parametrize("layer, width", [("q", 2 * H), ("kk", 2 * D), ("v", 2 * D)])
def test_multi_query_attention_grows_by_whole_key_value_heads(layer: str, width: int) -> None:
    """A new key/value head brings its group of query heads: q, k and v grow together (4 + 4 query heads over 1 + 1
    key/value heads); the table broadcast over one head stays a broadcast."""
    model = _mqa_model(fused=False)
    child = _widen(model, layer, width)
    shapes = {t.name: numpy_helper.to_array(t).shape for t in child.graph.initializer}
    assert (shapes["wq"], shapes["wk"], shapes["wv"]) == ((H, 2 * H), (H, 2 * D), (H, 2 * D))
    assert onnxmorph.inspect(child)["attention"][0]["kv_heads"] == 2


def test_a_fused_multi_query_projection_grows_each_part_in_proportion() -> None:
    """[q heads | k head | v head] in one projection, split 4 : 1 : 1 on the head axis: doubling it gives 8 : 2 : 2."""
    model = _mqa_model(fused=True)
    child = _widen(model, "qkv", 2 * (H + 2 * D))
    info = onnxmorph.inspect(child)["attention"][0]
    assert (info["heads"], info["head_dim"], info["kv_heads"]) == (2 * HEADS, D, 2)


def _fused_gqa_model() -> onnx.ModelProto:
    """Query, key and value sliced out of one projection (4 query heads over 2 key/value heads of 4), targets built at
    run time from Shape as the dynamo exporter writes them, one constant 2 standing for both the key/value heads and
    the repeats in the Expand target, and slice bounds shared between neighbouring slices (Phi-3's qkv_proj)."""
    floats = {"wqkv": _w(H, 32), "wo": _w(16, H), "scale": np.array(0.5), "w1": _w(H, H), "w2": _w(H, H)}
    ints = {"zero": [0], "one": [1], "qe": [16], "ke": [24], "big": [2 ** 62], "last": [-1], "minus1": [-1],
            "dsz": [4], "two": [2], "four": [4], "axis2": [2], "sixteen": [16]}
    body = """
    qkv = MatMul(x, wqkv)
    q = Slice(qkv, zero, qe, last)
    k = Slice(qkv, qe, ke, last)
    v = Slice(qkv, ke, big, last)
    sh = Shape(x)
    n = Gather(sh, zero)
    t = Gather(sh, one)
    th = Concat<axis = 0>(n, t, minus1, dsz)
    qh = Reshape(q, th)
    kh = Reshape(k, th)
    vh = Reshape(v, th)
    qt = Transpose<perm = [0, 2, 1, 3]>(qh)
    kt0 = Transpose<perm = [0, 2, 1, 3]>(kh)
    vt0 = Transpose<perm = [0, 2, 1, 3]>(vh)
    te = Concat<axis = 0>(n, two, two, t, dsz)
    tm = Concat<axis = 0>(n, four, t, dsz)
    ku = Unsqueeze(kt0, axis2)
    ke2 = Expand(ku, te)
    kt = Reshape(ke2, tm)
    vu = Unsqueeze(vt0, axis2)
    ve = Expand(vu, te)
    vt = Reshape(ve, tm)
    ktt = Transpose<perm = [0, 1, 3, 2]>(kt)
    sc = MatMul(qt, ktt)
    ss = Mul(sc, scale)
    pr = Softmax<axis = -1>(ss)
    at = MatMul(pr, vt)
    ab = Transpose<perm = [0, 2, 1, 3]>(at)
    tb = Concat<axis = 0>(n, t, sixteen)
    am = Reshape(ab, tb)
    o = MatMul(am, wo)
    s = Add(x, o)
    h = MatMul(s, w1)
    r = Relu(h)
    f = MatMul(r, w2)
    y = Add(s, f)"""
    return text_model(body, floats, ints, x=f"float[N, T, {H}]", y=f"float[N, T, {H}]", opset=17)


@pytest.mark.parametrize("width", [64, 48])
def test_a_fused_grouped_query_projection_sliced_into_parts_grows_each_part(width: int) -> None:
    model = _fused_gqa_model()
    assert [(a["heads"], a["head_dim"], a["kv_heads"]) for a in onnxmorph.inspect(model)["attention"]] == [(4, 4, 2)]
    child = _widen(model, "qkv", width)
    grown = width // 32
    info = onnxmorph.inspect(child)["attention"][0] if width == 64 else None
    if info is not None:
        assert (info["heads"], info["head_dim"], info["kv_heads"]) == (4 * grown, 4, 2 * grown)


def test_a_one_channel_gate_broadcast_over_an_expert_is_refused_by_name() -> None:
    """Qwen2-MoE's shared expert is scaled by sigmoid(x w) of width 1: that one channel cannot grow."""
    body = """
    g = MatMul(x, wg)
    s = Sigmoid(g)
    e = MatMul(x, we)
    m = Mul(s, e)
    y = MatMul(m, wo)"""
    model = text_model(body, {"wg": _w(8, 1), "we": _w(8, 8), "wo": _w(8, 8)}, {}, x="float[N, 8]", y="float[N, 8]")
    with pytest.raises(onnxmorph.NotApplicable, match=r"the one channel of 's' is broadcast over the 8 of 'e'"):
        onnxmorph.get_pass("widen")(layer="g", width=2).requires(model)


def test_heads_merged_with_the_batch_grow_as_heads() -> None:
    """[N, H, T, d] -> [N*H, T, d] around the products (as the dynamo exporter writes attention): with the batch taken
    as 1 while analysing, the merge looks like [1, H, ..] -> [H, ..]; the heads axis must stay the heads."""
    floats = {"wq": _w(H, H), "wk": _w(H, H), "wv": _w(H, H), "wo": _w(H, H), "w1": _w(H, H), "w2": _w(H, H)}
    ints = {"heads": [0, 0, HEADS, D], "one": [1], "minus1": [-1], "dsz": [D], "back": [0, 0, H], "hsz": [HEADS],
            "zero": [0]}
    body = """
    q = MatMul(x, wq)
    kk = MatMul(x, wk)
    v = MatMul(x, wv)
    sh = Shape(x)
    n = Gather(sh, zero)
    t = Gather(sh, one)
    flat = Concat<axis = 0>(minus1, t, dsz)
    split = Concat<axis = 0>(n, hsz, t, dsz)
    qh = Reshape(q, heads)
    qt = Transpose<perm = [0, 2, 1, 3]>(qh)
    qf = Reshape(qt, flat)
    kh = Reshape(kk, heads)
    kt = Transpose<perm = [0, 2, 3, 1]>(kh)
    flat2 = Concat<axis = 0>(minus1, dsz, t)
    kf = Reshape(kt, flat2)
    vh = Reshape(v, heads)
    vt = Transpose<perm = [0, 2, 1, 3]>(vh)
    vf = Reshape(vt, flat)
    sc = MatMul(qf, kf)
    pr = Softmax<axis = -1>(sc)
    at = MatMul(pr, vf)
    au = Reshape(at, split)
    ab = Transpose<perm = [0, 2, 1, 3]>(au)
    am = Reshape(ab, back)
    o = MatMul(am, wo)
    s = Add(x, o)
    h = MatMul(s, w1)
    r = Relu(h)
    f = MatMul(r, w2)
    y = Add(s, f)"""
    model = text_model(body, floats, ints, x=f"float[N, T, {H}]", y=f"float[N, T, {H}]", opset=17)
    for layer in ("q", "kk", "v"):
        _widen(model, layer, 2 * H)


def test_a_norm_across_all_heads_of_the_keys_is_refused_saying_so() -> None:
    """OLMo 2's k_norm: an RMSNorm over the key projection's whole width, before the heads are split. New query heads
    need new key heads, which would change its statistics."""
    floats = {"wq": _w(H, H), "wk": _w(H, H), "wv": _w(H, H), "wo": _w(H, H), "g": _w(H), "two": np.array(2.0),
              "eps": np.array(1e-6), "w1": _w(H, H), "w2": _w(H, H)}
    ints = {"heads": [0, 0, HEADS, D], "back": [0, 0, H]}
    body = """
    q = MatMul(x, wq)
    kk = MatMul(x, wk)
    v = MatMul(x, wv)
    sq = Pow(kk, two)
    ms = ReduceMean<axes = [-1]>(sq)
    me = Add(ms, eps)
    rt = Sqrt(me)
    kn = Div(kk, rt)
    kg = Mul(kn, g)
    qh = Reshape(q, heads)
    qt = Transpose<perm = [0, 2, 1, 3]>(qh)
    kh = Reshape(kg, heads)
    kt = Transpose<perm = [0, 2, 3, 1]>(kh)
    vh = Reshape(v, heads)
    vt = Transpose<perm = [0, 2, 1, 3]>(vh)
    sc = MatMul(qt, kt)
    pr = Softmax<axis = -1>(sc)
    at = MatMul(pr, vt)
    ab = Transpose<perm = [0, 2, 1, 3]>(at)
    am = Reshape(ab, back)
    o = MatMul(am, wo)
    s = Add(x, o)
    h = MatMul(s, w1)
    r = Relu(h)
    f = MatMul(r, w2)
    y = Add(s, f)"""
    model = text_model(body, floats, ints, x=f"float[N, 5, {H}]", y=f"float[N, 5, {H}]", opset=17)
    for method in ("netmorph", "net2net"):
        with pytest.raises(onnxmorph.NotApplicable, match="reduces over all the heads of 'sq'"):
            onnxmorph.get_pass("widen")(layer="q", width=2 * H, method=method).requires(model)
