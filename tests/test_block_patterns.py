"""Transformer graph patterns, built by hand: parallel blocks, norms after the sublayer, a stream reshaped around the
MLP, a mixture of experts' router, and the head layouts of fused projections (what inspect and `block` read)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import text_model
from onnx import numpy_helper

import onnxmorph
from onnxmorph.analysis import blocks as mblocks
from onnxmorph.graph import core as mgraph

H, HEADS, D, FFN = 8, 2, 4, 16  # hidden, heads, head size, MLP width
RNG = np.random.default_rng(0)


def _w(*shape: int, scale: float = 0.4) -> np.ndarray:
    return RNG.normal(0, scale, shape)


def _attention(k: int, src: str, out: str, floats: dict, ints: dict) -> str:
    """Multi-head self-attention of `src` [N, T, H] into `out`: separate q/k/v projections, heads split by Reshape."""
    for name in ("q", "k", "v", "o"):
        floats[f"w{name}{k}"] = _w(H, H)
    floats[f"scale{k}"] = np.array(D ** -0.5)
    ints["heads"], ints["merge"] = [0, 0, HEADS, D], [0, 0, H]
    return f"""
    q{k} = MatMul({src}, wq{k})
    kk{k} = MatMul({src}, wk{k})
    v{k} = MatMul({src}, wv{k})
    qh{k} = Reshape(q{k}, heads)
    qt{k} = Transpose<perm = [0, 2, 1, 3]>(qh{k})
    kh{k} = Reshape(kk{k}, heads)
    kt{k} = Transpose<perm = [0, 2, 3, 1]>(kh{k})
    vh{k} = Reshape(v{k}, heads)
    vt{k} = Transpose<perm = [0, 2, 1, 3]>(vh{k})
    sc{k} = MatMul(qt{k}, kt{k})
    ss{k} = Mul(sc{k}, scale{k})
    pr{k} = Softmax<axis = -1>(ss{k})
    at{k} = MatMul(pr{k}, vt{k})
    ab{k} = Transpose<perm = [0, 2, 1, 3]>(at{k})
    am{k} = Reshape(ab{k}, merge)
    {out} = MatMul(am{k}, wo{k})"""


def _mlp(k: int, src: str, out: str, floats: dict) -> str:
    floats[f"w1{k}"], floats[f"w2{k}"] = _w(H, FFN), _w(FFN, H)
    return f"""
    h{k} = MatMul({src}, w1{k})
    r{k} = Relu(h{k})
    {out} = MatMul(r{k}, w2{k})"""


def _layer_norm(k: str, src: str, out: str, floats: dict, bias: bool = True) -> str:
    floats[f"g{k}"] = RNG.uniform(0.5, 1.5, H)
    if bias:
        floats[f"b{k}"] = _w(H, scale=0.2)
    return f"{out} = LayerNormalization<axis = -1>({src}, g{k}{', b' + k if bias else ''})"


def _rms_norm(k: str, src: str, out: str, floats: dict) -> str:
    """The decomposed RMSNorm exporters write: x / sqrt(mean(x^2) + eps) * gain."""
    floats[f"g{k}"] = RNG.uniform(0.5, 1.5, H)
    floats[f"two{k}"], floats[f"eps{k}"] = np.array(2.0), np.array(1e-6)
    return f"""
    sq{k} = Pow({src}, two{k})
    ms{k} = ReduceMean<axes = [-1]>(sq{k})
    me{k} = Add(ms{k}, eps{k})
    rt{k} = Sqrt(me{k})
    nz{k} = Div({src}, rt{k})
    {out} = Mul(nz{k}, g{k})"""


def _model(body: str, floats: dict, ints: dict) -> onnx.ModelProto:
    return text_model(body, floats, ints, x=f"float[N, T, {H}]", y=f"float[N, T, {H}]", opset=17)


def _grows_every_block(model: onnx.ModelProto) -> list[onnx.ModelProto]:
    children = []
    for block in mblocks.blocks(mgraph.import_graph(model)):
        child, report = onnxmorph.morph(model, "block", after=block.index)
        assert report, report
        children.append(child)
    return children


def _new_weights(child: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name.split("/morph_block/", 1)[1]: numpy_helper.to_array(t) for t in child.graph.initializer
            if "/morph_block/" in t.name}


def _parallel_model() -> onnx.ModelProto:
    """Two blocks `x + attn(LN(x)) + mlp(LN(x))` (one shared norm: GPT-J, Phi, Falcon)."""
    floats, ints, body, x = {}, {}, [], "x"
    for k in range(2):
        body += [_layer_norm(str(k), x, f"n{k}", floats), _attention(k, f"n{k}", f"a{k}", floats, ints),
                 _mlp(k, f"n{k}", f"f{k}", floats), f"p{k} = Add(a{k}, f{k})",
                 f"{'s' + str(k) if k == 0 else 'y'} = Add({x}, p{k})"]
        x = f"s{k}"
    return _model("\n".join(body), floats, ints)


def test_a_parallel_block_grows_with_every_branch_projection_at_zero() -> None:
    model = _parallel_model()
    found = mblocks.blocks(mgraph.import_graph(model))
    assert [(b.kind, b.parallel, len(b.sublayers)) for b in found] == [("pre-norm", True, 1)] * 2
    for k, child in enumerate(_grows_every_block(model)):
        new = _new_weights(child)
        assert not new[f"wo{k}"].any() and not new[f"w2{k}"].any()  # both branches' final projections
        assert new[f"wq{k}"].any() and new[f"w1{k}"].any()  # the rest is block k's copy


def _sublayer_norm_model(pre: bool, norm: str) -> onnx.ModelProto:
    """Blocks `x + Norm(W f(x))` with a norm after each sublayer (before the Add), and one before it if `pre`."""
    floats, ints, body, x = {}, {}, [], "x"
    make = _rms_norm if norm == "rms" else _layer_norm
    for k in range(2):
        src = f"n{k}" if pre else x
        if pre:
            body.append(_layer_norm(f"pre{k}", x, src, floats))
        body += [_attention(k, src, f"a{k}", floats, ints), make(f"pa{k}", f"a{k}", f"na{k}", floats),
                 f"s{k} = Add({x}, na{k})"]
        src2 = f"m{k}" if pre else f"s{k}"
        if pre:
            body.append(_layer_norm(f"prm{k}", f"s{k}", src2, floats))
        body += [_mlp(k, src2, f"f{k}", floats), make(f"pf{k}", f"f{k}", f"nf{k}", floats),
                 f"{'t0' if k == 0 else 'y'} = Add(s{k}, nf{k})"]
        x = "t0"
    return _model("\n".join(body), floats, ints)


@pytest.mark.parametrize("pre, norm", [(True, "rms"), (False, "rms"), (True, "layer"), (False, "layer")])
def test_a_norm_after_the_sublayer_starts_with_its_gain_and_shift_at_zero(pre: bool, norm: str) -> None:
    model = _sublayer_norm_model(pre, norm)
    found = mblocks.blocks(mgraph.import_graph(model))
    assert [b.kind for b in found] == ["pre-norm" if pre else "sublayer-norm"] * 2
    assert all(s.end_norm for b in found for s in b.sublayers)
    for k, child in enumerate(_grows_every_block(model)):
        new = _new_weights(child)
        for part in ("pa", "pf"):
            assert not new[f"g{part}{k}"].any()  # the gain: Norm(anything) * 0 (+ 0) is exactly 0
            if norm == "layer":
                assert not new[f"b{part}{k}"].any()  # and a LayerNorm's shift
        assert new[f"wo{k}"].any() and new[f"w2{k}"].any()  # the projections keep block k's weights


def test_a_stream_reshaped_around_the_mlp_is_one_block_per_layer() -> None:
    """OPT's layer: attention on [N, T, H], the MLP on [N*T, H], the stream reshaped back for the next layer."""
    floats, ints, body, x = {}, {"flat": [-1, H]}, [], "x"
    for k in range(2):
        body += [_layer_norm(f"a{k}", x, f"n{k}", floats), _attention(k, f"n{k}", f"a{k}", floats, ints),
                 f"s{k} = Add({x}, a{k})", f"shape{k} = Shape(s{k})", f"fl{k} = Reshape(s{k}, flat)",
                 _layer_norm(f"m{k}", f"fl{k}", f"m{k}", floats), _mlp(k, f"m{k}", f"f{k}", floats),
                 f"t{k} = Add(fl{k}, f{k})", f"{'u0' if k == 0 else 'y'} = Reshape(t{k}, shape{k})"]
        x = "u0"
    model = _model("\n".join(body), floats, ints)
    found = mblocks.blocks(mgraph.import_graph(model), shapes=mgraph.infer_shapes(model))
    assert [(b.kind, len(b.sublayers), b.output.name) for b in found] == [("pre-norm", 2, "u0"), ("pre-norm", 2, "y")]
    _grows_every_block(model)


def _moe_model() -> onnx.ModelProto:
    """Attention, then a top-2-of-4 mixture of experts whose router is a Softmax over a projection's outputs: one
    block. The experts' down projections are gathered per token from one [E, F, H] weight."""
    floats, ints, body, x = {}, {}, [], "x"
    ints.update(top=[2], axis2=[2], axis3=[3], axis_last=[-1], axes23=[2, 3])
    for k in range(2):
        floats[f"wr{k}"], floats[f"wd{k}"], floats[f"wu{k}"] = _w(H, 4), _w(4, FFN, H), _w(H, FFN)
        body += [_rms_norm(f"a{k}", x, f"n{k}", floats), _attention(k, f"n{k}", f"a{k}", floats, ints),
                 f"s{k} = Add({x}, a{k})", _rms_norm(f"m{k}", f"s{k}", f"m{k}", floats), f"""
    lg{k} = MatMul(m{k}, wr{k})
    rp{k} = Softmax<axis = -1>(lg{k})
    tv{k}, ti{k} = TopK<axis = -1>(rp{k}, top)
    dn{k} = Gather<axis = 0>(wd{k}, ti{k})
    up{k} = MatMul(m{k}, wu{k})
    ac{k} = Relu(up{k})
    ae{k} = Unsqueeze(ac{k}, axes23)
    eo{k} = MatMul(ae{k}, dn{k})
    es{k} = Squeeze(eo{k}, axis3)
    wt{k} = Unsqueeze(tv{k}, axis_last)
    we{k} = Mul(es{k}, wt{k})
    ex{k} = ReduceSum<keepdims = 0>(we{k}, axis2)
    {'t0' if k == 0 else 'y'} = Add(s{k}, ex{k})"""]
        x = "t0"
    return _model("\n".join(body), floats, ints)


def test_a_router_softmax_is_not_attention_and_an_moe_layer_is_one_block() -> None:
    model = _moe_model()
    info = onnxmorph.inspect(model)
    assert [(b["after"], b["experts"], b["top_k"]) for b in info["blocks"]] == [(0, 4, 2), (1, 4, 2)]
    assert [(a["block"], a["heads"], a["head_dim"]) for a in info["attention"]] == [(0, HEADS, D), (1, HEADS, D)]
    for k, child in enumerate(_grows_every_block(model)):
        new = _new_weights(child)
        assert not new[f"wd{k}"].any() and not new[f"wo{k}"].any()  # the gathered experts' weight is the writer
        assert new[f"wu{k}"].any() and new[f"wr{k}"].any()


def test_an_op_that_does_not_keep_zero_at_the_end_of_a_branch_is_refused_by_name() -> None:
    floats, ints = {}, {}
    body = "\n".join([_layer_norm("0", "x", "n0", floats), _attention(0, "n0", "a0", floats, ints),
                      "e0 = Exp(a0)", "y = Add(x, e0)", ""]).replace("y = Add(x, e0)", "s0 = Add(x, e0)")
    body += "\n".join([_layer_norm("1", "s0", "n1", floats), _mlp(1, "n1", "f1", floats), "y = Add(s0, f1)"])
    model = _model(body, floats, ints)
    with pytest.raises(onnxmorph.NotApplicable, match=r"ends in Exp 'e0', which does not give 0 for a 0 input"):
        onnxmorph.morph(model, "block", after=0)


# ------------------------------------------------------------------------ head layouts


def _fused_attention(layout: str, floats: dict, ints: dict) -> str:
    """One attention on `n` into `a` with a single fused projection:

    interleaved: [N, T, H*3d] -> [N, T, H, 3d], q/k/v sliced from the last axis at bounds computed from its size
        (GPT-NeoX's `size // 3` through Shape arithmetic);
    multi-query: [N, T, (H+2)*d] -> [N, T, H+2, d], split on the head axis into H query heads and one key and
        one value head, those expanded to H (Falcon);
    softcap: separate projections, the scores soft-capped (cap * tanh(s / cap)) before the Softmax (Gemma 2).
    """
    floats["scale"], floats["wo"] = np.array(D ** -0.5), _w(H, H)
    ints["merge"] = [0, 0, H]
    if layout == "interleaved":
        floats["wqkv"] = _w(H, 3 * H)
        ints.update(split=[0, 0, HEADS, 3 * D], zero=[0], one=[1], two=[2], last=[-1], three=[3])
        front = """
    qkv = MatMul(n, wqkv)
    hs = Reshape(qkv, split)
    ht = Transpose<perm = [0, 2, 1, 3]>(hs)
    sz = Shape(ht)
    width = Gather<axis = 0>(sz, three)
    each = Div(width, three)
    two_each = Mul(each, two)
    qt = Slice(ht, zero, each, last)
    kq = Slice(ht, each, two_each, last)
    kt = Transpose<perm = [0, 1, 3, 2]>(kq)
    vt = Slice(ht, two_each, width, last)
    sc = MatMul(qt, kt)
    pre = Mul(sc, scale)"""
    elif layout == "multi-query":
        floats["wqkv"] = _w(H, H + 2 * D)
        ints.update(split=[0, 0, HEADS + 2, D], parts=[HEADS, 1, 1], wide=[1, 1, HEADS, 1], axis3=[3])
        front = """
    qkv = MatMul(n, wqkv)
    hs = Reshape(qkv, split)
    qh, kh, vh = Split<axis = 2>(hs, parts)
    qt = Transpose<perm = [0, 2, 1, 3]>(qh)
    kx = Expand(kh, wide)
    kt = Transpose<perm = [0, 2, 3, 1]>(kx)
    vx = Expand(vh, wide)
    vt = Transpose<perm = [0, 2, 1, 3]>(vx)
    sc = MatMul(qt, kt)
    pre = Mul(sc, scale)"""
    else:
        for name in ("q", "k", "v"):
            floats[f"w{name}"] = _w(H, H)
        floats["cap"] = np.array(2.0)
        ints["heads"] = [0, 0, HEADS, D]
        front = """
    q = MatMul(n, wq)
    kk = MatMul(n, wk)
    v = MatMul(n, wv)
    qh = Reshape(q, heads)
    qt = Transpose<perm = [0, 2, 1, 3]>(qh)
    kh = Reshape(kk, heads)
    kt = Transpose<perm = [0, 2, 3, 1]>(kh)
    vh = Reshape(v, heads)
    vt = Transpose<perm = [0, 2, 1, 3]>(vh)
    sc = MatMul(qt, kt)
    ssc = Mul(sc, scale)
    dc = Div(ssc, cap)
    th = Tanh(dc)
    pre = Mul(th, cap)"""
    return front + """
    pr = Softmax<axis = -1>(pre)
    at = MatMul(pr, vt)
    ab = Transpose<perm = [0, 2, 1, 3]>(at)
    am = Reshape(ab, merge)
    a = MatMul(am, wo)"""


@pytest.mark.parametrize("layout, kv_heads", [("interleaved", HEADS), ("multi-query", 1), ("softcap", HEADS)])
def test_heads_are_read_from_the_layout_of_a_fused_projection(layout: str, kv_heads: int) -> None:
    floats, ints = {}, {}
    body = "\n".join([_layer_norm("0", "x", "n", floats), _fused_attention(layout, floats, ints), "s = Add(x, a)",
                      _layer_norm("1", "s", "m", floats), _mlp(1, "m", "f", floats), "y = Add(s, f)"])
    model = _model(body, floats, ints)
    info = onnxmorph.inspect(model)
    assert len(info["blocks"]) == 1
    [attention] = info["attention"]
    assert (attention["heads"], attention["head_dim"], attention["kv_heads"]) == (HEADS, D, kv_heads)
    assert attention["output"] == "a"
    _grows_every_block(model)
