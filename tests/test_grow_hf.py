"""Growing exported Hugging Face transformers (tests/hf_support.py), checked against the eager model.

For each tiny model and exporter: the hidden width by 2x (tiling) and by 1.5x (average
expansion), two more attention heads, and a wider feed-forward; each child verifies with the
default tolerances and its logits match the Hugging Face model's own on the same inputs. The
layers are found through `inspect` (its attention modules), as a user would find them.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hf_support import HIDDEN, hf_export  # noqa: F401  (fixture)

import onnxmorph
from onnxmorph.graph import core as mgraph
from onnxmorph.graph import layers


def _attention(model) -> dict:
    found = onnxmorph.inspect(model)["attention"]
    assert found, "inspect finds the attention modules"
    return found[0]


def _ffn_layer(model, attention: dict) -> dict:
    """The first MatMul/Gemm of attention's block that is none of its projections: the FFN's first layer."""
    taken = {attention[k] for k in ("query", "key", "value", "output")}
    block = attention["module"].rsplit(".", 1)[0]
    layers = [layer for layer in onnxmorph.inspect(model)["layers"] if layer["op"] in ("MatMul", "Gemm")
              and layer["name"] not in taken and (layer.get("module") or "").startswith(block + ".")]
    assert layers, block
    return layers[0]


def _request(model, morph: str) -> dict:
    attention = _attention(model)
    heads, head_dim = attention["heads"], attention["head_dim"]
    if morph == "hidden 2x":
        return {"layer": attention["output"], "width": 2 * HIDDEN, "method": "net2net"}
    if morph == "hidden 1.5x":
        return {"layer": attention["output"], "width": HIDDEN * 3 // 2, "method": "net2net"}
    if morph == "heads +2":
        # a fused QKV projection holds the three: it grows by two heads in each
        parts = 3 if attention["query"] == attention["key"] == attention["value"] else 1
        return {"layer": attention["query"], "width": parts * (heads + 2) * head_dim, "method": "netmorph"}
    layer = _ffn_layer(model, attention)
    return {"layer": layer["name"], "width": 2 * layer["weight_shape"][-1], "method": "netmorph"}


def _grow(hf, morph: str) -> None:
    parent = onnxmorph.load(hf.path)
    params = _request(parent, morph)
    child, report = onnxmorph.morph(parent, "widen", **params)
    assert report, report.summary()  # the default tolerances, no flags
    feed = hf.feed(seed=7, batch=3, sequence=9)
    session = ort.InferenceSession(child.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feed)[0], hf.logits(feed), atol=1e-4, rtol=1e-4)
    analysis = mgraph.Analysis(child)
    node = mgraph.find_layer(analysis.view, params["layer"])  # the widened layer keeps its name
    assert layers.out_channels(node, analysis.shapes)[1] == params["width"]


MORPHS = ("hidden 2x", "hidden 1.5x", "heads +2", "ffn 2x")
KINDS = ("bert", "gpt2", "llama", "vit")
# BERT is post-norm: LayerNorm(x + f(x)) is the stream, and under average expansion its extra
# channels would have to carry the mean of gamma * x_hat + beta, which no constant does (tiling is exact).
CASES = [(kind, morph) for kind in KINDS for morph in MORPHS if (kind, morph) != ("bert", "hidden 1.5x")]


@pytest.mark.parametrize(("kind", "morph"), CASES, ids=lambda v: str(v).replace(" ", ""))
def test_grow_torchscript_export(hf_export, kind: str, morph: str) -> None:  # noqa: F811
    _grow(hf_export(kind, False), morph)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "morph"), CASES, ids=lambda v: str(v).replace(" ", ""))
def test_grow_dynamo_export(hf_export, kind: str, morph: str) -> None:  # noqa: F811
    _grow(hf_export(kind, True), morph)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_post_norm_hidden_width_averages_no_further(hf_export, dynamo: bool) -> None:  # noqa: F811
    parent = onnxmorph.load(hf_export("bert", dynamo).path)
    with pytest.raises(onnxmorph.NotApplicable, match="post-norm"):
        onnxmorph.morph(parent, "widen", **_request(parent, "hidden 1.5x"))
