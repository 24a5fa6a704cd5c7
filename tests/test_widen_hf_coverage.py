"""Widen on exported transformers: sizes read at run time (Shape, computed reshape targets), fused QKV, heads.

Fast tests: one hand-built graph per rule of onnxmorph/channel_shapes.py, and one layer each of the tiny
TorchScript exports (tests/hf_support.py, under a second each) that was refused before those rules.
Slow (`-m slow`): benchmarks/hf_widen_sweep.py over every MatMul/Gemm of the five tiny models, both
exporters, 1.5x and 2x, against the counts measured when the rules went in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import text_model
from hf_support import hf_export  # noqa: F401  (fixture)
from onnx import numpy_helper

import onnxmorph
from onnxmorph.errors import NotApplicable

RNG = np.random.default_rng(13)
INT_MAX = 2 ** 63 - 1


def _model(body: str, floats: dict[str, tuple[int, ...]], ints: dict[str, object], x: str, y: str) -> onnx.ModelProto:
    return text_model(body, {k: RNG.normal(0, 0.5, s) for k, s in floats.items()}, ints, x=x, y=y, opset=17)


def _widen(model: object, layer: str, width: int, method: str, **shapes: tuple[int, ...]) -> onnx.ModelProto:
    child, report = onnxmorph.morph(model, "widen", layer=layer, width=width, method=method, shapes=shapes or None)
    assert report, report.summary()  # verified in onnxruntime at the default tolerances
    return child


# Hugging Face's Conv1D: [B, T, C] flattened to [B*T, C] with a target read from Shape, multiplied, and
# reshaped back with Concat(Shape(x)[0:2], [C]); the second one reads the widened tensor's own size.
CONV1D = """s = Shape(x)
    bt = Slice(s, zero, two)
    last = Slice(s, minus, big)
    t1 = Concat<axis=0>(minus, last)
    f = Reshape(x, t1)
    h = MatMul(f, w1)
    t2 = Concat<axis=0>(bt, six)
    r = Reshape(h, t2)
    a = Relu(r)
    sa = Shape(a)
    la = Slice(sa, minus, big)
    t3 = Concat<axis=0>(minus, la)
    f2 = Reshape(a, t3)
    z = MatMul(f2, w2)
    t4 = Concat<axis=0>(bt, three)
    y = Reshape(z, t4)"""
CONV1D_INTS = {"zero": [0], "two": [2], "minus": [-1], "big": [INT_MAX], "six": [6], "three": [3]}


@pytest.mark.parametrize("method, width", [("netmorph", 9), ("net2net", 12), ("lemon", 10)])
def test_a_size_read_with_shape_grows_with_the_reshape_it_shapes(method: str, width: int) -> None:
    model = _model(CONV1D, {"w1": (4, 6), "w2": (6, 3)}, CONV1D_INTS, "float[B, T, 4]", "float[B, T, 3]")
    child = _widen(model, "h", width, method)
    arrays = {t.name: numpy_helper.to_array(t) for t in child.graph.initializer}
    assert arrays["w2"].shape == (width, 3) and [int(v) for v in arrays["six"]] == [width]


def test_a_size_read_with_shape_that_is_computed_with_is_refused() -> None:
    body = """h = MatMul(x, w1)
    sh = Shape(h)
    c = Gather<axis=0>(sh, one)
    scale = Cast<to=1>(c)
    z = MatMul(h, w2)
    y = Div(z, scale)"""
    model = _model(body, {"w1": (4, 6), "w2": (6, 3)}, {"one": 1}, "float[B, 4]", "float[B, 3]")
    with pytest.raises(NotApplicable) as info:
        onnxmorph.get_pass("widen")(layer="h", width=9).requires(model)
    message = str(info.value)
    assert "reads the channel count of 'h'" in message and "Div 'y' computes with it" in message, message


def test_a_computed_target_shared_with_a_layer_that_does_not_grow_is_copied() -> None:
    body = """sx = Shape(x)
    b = Slice(sx, zero, one)
    t = Concat<axis=0>(b, six)
    h1 = MatMul(x, w1)
    h2 = MatMul(x, w2)
    r1 = Reshape(h1, t)
    r2 = Reshape(h2, t)
    u1 = MatMul(r1, w3)
    u2 = MatMul(r2, w4)
    y = Add(u1, u2)"""
    model = _model(body, {"w1": (4, 6), "w2": (4, 6), "w3": (6, 3), "w4": (6, 3)},
                   {"zero": [0], "one": [1], "six": [6]}, "float[B, 4]", "float[B, 3]")
    for method in ("netmorph", "net2net"):
        child = _widen(model, "h1", 12, method)
        targets = [n for n in child.graph.node if n.op_type == "Concat"]
        assert len(targets) == 2  # r1 reads its own copy of the target, r2 the original


def test_a_length_computed_by_arithmetic_matches_the_strided_conv_that_made_it() -> None:
    # wav2vec2's dynamo export: the head split's target holds (T - 4) // 2 + 1, computed from Shape(x), for the
    # length a strided conv made; it is the conv's formula, so the new heads' axis is known.
    body = """c = Conv<strides=[2]>(x, wc)
    h0 = Transpose<perm=[0,2,1]>(c)
    h = MatMul(h0, w1)
    sx = Shape(x)
    b = Slice(sx, zero, one)
    t = Gather<axis=0>(sx, two)
    t4 = Sub(t, four)
    t2 = Div(t4, two)
    n = Add(t2, one_s)
    l = Unsqueeze(n, zero)
    split = Concat<axis=0>(b, l, minus, fourv)
    heads = Reshape(h, split)
    r = Relu(heads)
    merge = Concat<axis=0>(b, l, minus)
    m = Reshape(r, merge)
    y = MatMul(m, w2)"""
    model = _model(body, {"wc": (8, 1, 4), "w1": (8, 8), "w2": (8, 3)},
                   {"zero": [0], "one": [1], "two": 2, "four": 4, "one_s": 1, "minus": [-1], "fourv": [4]},
                   "float[B, 1, T]", "float[B, L, 3]")
    for length in (20, 23):  # odd and even lengths: floor division either way
        _widen(model, "h", 16, "netmorph", x=(2, 1, length))


def test_a_grouped_conv_reading_the_stream_grows_its_groups_by_copies() -> None:
    # wav2vec2's positional conv: a grouped conv over the stream, added back to it before a LayerNorm. Copies
    # (tiling) need each group to grow by copies of its own channels, not new groups that copy nothing.
    body = """h = MatMul(x, w1)
    t = Transpose<perm=[0,2,1]>(h)
    c = Conv<group=2, pads=[1,1], kernel_shape=[3]>(t, wc, bc)
    g = Relu(c)
    r = Transpose<perm=[0,2,1]>(g)
    s = Add(h, r)
    n = LayerNormalization<axis=-1>(s, gamma, beta)
    y = MatMul(n, w2)"""
    model = _model(body, {"w1": (4, 8), "wc": (8, 4, 3), "bc": (8,), "gamma": (8,), "beta": (8,), "w2": (8, 3)},
                   {}, "float[B, 5, 4]", "float[B, 5, 3]")
    for method in ("net2net", "lemon"):
        child = _widen(model, "h", 16, method)
        conv = next(n for n in child.graph.node if n.op_type == "Conv")
        assert [a.i for a in conv.attribute if a.name == "group"] == [2]


def _layer(path: Path, suffix: str) -> str:
    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
             if n.op_type in ("MatMul", "Gemm") and n.name.endswith(suffix)]
    assert names, suffix
    return names[0]


@pytest.mark.parametrize("kind, layer, widths, method", [
    # GPT-2's Conv1D (Gemm between reshapes computed from Shape), whole hidden stream: tiling and averaging
    ("gpt2", "h.0/mlp/c_proj/Gemm", (64, 48), "net2net"),
    # the fused QKV's Split takes new whole heads in each of its parts
    ("gpt2", "h.0/attn/c_attn/Gemm", (192, 144), "netmorph"),
    # BERT's heads: the attention mask broadcast over them, its target built with Where(Equal(t, -1), 1, t)
    ("bert", "layer.0/attention/self/query/MatMul", (64, 48), "netmorph"),
    # Llama's grouped-query heads: K/V repeated with a target kv_heads * n_rep, rotary halves sliced per head
    ("llama", "layers.0/self_attn/k_proj/MatMul", (32, 24), "netmorph"),
])
def test_torchscript_exports_widen_where_sizes_are_read_at_run_time(hf_export, kind: str, layer: str,  # noqa: F811
                                                                     widths: tuple[int, ...], method: str) -> None:
    model = hf_export(kind, False)
    name = _layer(model.path, layer)
    for width in widths:
        _widen(str(model.path), name, width, method)


# ---------------------------------------------------------------------------- the sweep (slow)


def _sweep_module():  # noqa: ANN202
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "hf_widen_sweep.py"
    spec = importlib.util.spec_from_file_location("hf_widen_sweep", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# (kind, dynamo) -> layers verified at 1.5x and at 2x, and the layers counted (whose channels do not reach a
# graph output), as measured with tests/hf_support.py's models (transformers 5, torch 2.x).
EXPECTED = {
    ("bert", True): (8, 13, 13), ("bert", False): (8, 13, 13),  # 1.5x: post-norm (below)
    ("gpt2", True): (8, 8, 8), ("gpt2", False): (8, 8, 8),
    ("llama", True): (14, 14, 14), ("llama", False): (14, 14, 14),
    ("vit", True): (12, 12, 12), ("vit", False): (12, 12, 12),
    ("wav2vec2", True): (8, 13, 13), ("wav2vec2", False): (8, 13, 13),  # 1.5x: GELU after the positional conv
}
# Refused, with the reason: BERT's and wav2vec2's residual writers at 1.5x (BERT is post-norm, so the stream is a
# LayerNorm's output whose extra channels would not stay the mean; wav2vec2's positional conv passes a GELU, and
# GELU of a mean is not the mean of GELUs).


@pytest.mark.slow
@pytest.mark.parametrize("kind, dynamo", sorted(EXPECTED))
def test_sweep_share_of_layers_widened(hf_export, kind: str, dynamo: bool,  # noqa: F811
                                       capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep_module()
    path = hf_export(kind, dynamo).path
    layers = sweep.candidate_layers(path)
    counts = []
    for factor in (1.5, 2.0):
        results = [sweep.widen_layer(path, name, old, factor) for name, old in layers]
        counted = [r for r in results if r["verified"] or not r["reaches_output"]]
        counts.append(sum(r["verified"] for r in counted))
        refused = {r["layer"]: next(iter(r["refusals"].values())) for r in counted if not r["verified"]}
        with capsys.disabled():
            print(f"\n{kind} {'dynamo' if dynamo else 'torchscript'} {factor}x: {counts[-1]} of {len(counted)}")
    *least, total = EXPECTED[(kind, dynamo)]
    assert len(counted) == total
    assert counts[0] >= least[0] and counts[1] >= least[1], (counts, refused)
