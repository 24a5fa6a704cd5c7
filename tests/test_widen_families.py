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
