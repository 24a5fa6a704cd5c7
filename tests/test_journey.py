"""Defects found by walking the user's journey on families no other test builds (docs/journey.md).

Each test pins one defect the sweep found and that is fixed, on the family that showed it (tests/journey_zoo.py:
tiny, random weights, no download), and compares every child with the eager model on fresh inputs. TorchScript
exports run by default (about a second each); dynamo exports are marked slow.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxmorph
from onnxmorph import cli
from onnxmorph.analysis import experts as mexperts
from onnxmorph.graph import core as mgraph

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

import journey_zoo as zoo  # noqa: E402  (needs torch and transformers)

_EXPORTS: dict[tuple[str, bool], zoo.Built] = {}


@pytest.fixture(scope="module")
def journey_export(tmp_path_factory: pytest.TempPathFactory):
    """`journey_export(family, dynamo)` -> zoo.Built, exported once per module."""

    def get(family: str, dynamo: bool) -> zoo.Built:
        if dynamo:
            pytest.importorskip("onnxscript")
        key = (family, dynamo)
        if key not in _EXPORTS or not _EXPORTS[key].path.is_file():
            _EXPORTS[key] = zoo.export(family, dynamo, tmp_path_factory.mktemp(f"journey_{family}_{int(dynamo)}"))
        return _EXPORTS[key]

    return get


def _exporters() -> list:
    return [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo", marks=pytest.mark.slow)]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _against_eager(built: zoo.Built, child: onnx.ModelProto | Path) -> None:
    """The child's onnxruntime output equals the eager model's on inputs of other sizes than verification's."""
    data = child.SerializeToString() if isinstance(child, onnx.ModelProto) else str(child)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for feed in (zoo.feed(built.spec, seed=11, batch=3, sequence=5), zoo.feed(built.spec, seed=12, batch=1,
                                                                              sequence=11)):
        np.testing.assert_allclose(session.run(None, feed)[0], built.eager(feed), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------ an FFN needs something non-linear inside


def _two_layers(between: str | None) -> onnx.ModelProto:
    """x @ W1 + b -> [between] -> @ W2: with nothing non-linear between them the pair is a factorised layer."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, s, rng.standard_normal(s).astype(np.float32).ravel())
             for n, s in (("w1", (8, 16)), ("b1", (16,)), ("w2", (16, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias")]
    last = "h1"
    if between is not None:
        nodes.append(helper.make_node(between, ["h1"], ["h2"], name="act"))
        last = "h2"
    nodes.append(helper.make_node("MatMul", [last, "w2"], ["y"], name="down"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])


@pytest.mark.parametrize(("between", "is_ffn"), [(None, False), ("Identity", False), ("Neg", False),
                                                 ("Relu", True), ("Tanh", True)])
def test_an_ffn_has_a_nonlinearity_between_its_projections(between: str | None, is_ffn: bool) -> None:
    model = _two_layers(between)
    found = mexperts.model_ffns(mgraph.Analysis(model))
    assert bool(found) is is_ffn, [f.name for f in found]


@pytest.mark.parametrize("dynamo", _exporters())
@pytest.mark.parametrize("family", ["electra", "albert"])
def test_an_embedding_projection_is_not_an_ffn(journey_export, family: str, dynamo: bool, tmp_path: Path) -> None:
    """ELECTRA and ALBERT project their 16-wide embeddings to the 32-wide stream (a Linear and its bias) straight
    into the first block's query, key and value: inspect listed those three as FFNs of block 0, and `moe --layer 0`
    (the README's command) was refused as ambiguous."""
    built = journey_export(family, dynamo)
    info = onnxmorph.inspect(onnxmorph.load(built.path))
    ffns = info["experts"]["ffns"]
    assert [f["block"] for f in ffns] == [0, 1], [f["name"] for f in ffns]
    assert all(f["hidden"] == zoo.FFN for f in ffns)
    out = tmp_path / "moe.onnx"
    code, _, err = _run(["moe", str(built.path), "--layer", "0", "--experts", "4", "--top-k", "2", "-o", str(out)])
    assert code == 0, err
    _against_eager(built, out)


# ------------------------------------------------------------------ an MoE that top-k routing does not describe


@pytest.mark.parametrize("dynamo", _exporters())
def test_argmax_routed_experts_are_refused_naming_the_routing(journey_export, dynamo: bool, tmp_path: Path) -> None:
    """PhiMoE's sparsemixer picks its two experts with ArgMax and masking, no TopK: `moe` said "no FFN or MoE in
    block 0" of a block that holds four experts. It now names the stacked weights and what picks them."""
    built = journey_export("phimoe", dynamo)
    out = tmp_path / "grown.onnx"
    code, _, err = _run(["moe", str(built.path), "--layer", "0", "--experts", "8", "--top-k", "4", "-o", str(out)])
    assert code == 2 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert "holds stacked expert weights" in line and "[4, 128, 32]" in line and "ArgMax" in line, line
    assert "not by a TopK" in line


# ------------------------------------------------------------------ heads merged with the batch


@pytest.mark.parametrize("dynamo", _exporters())
@pytest.mark.parametrize("family", ["bloom", "deberta_v2"])
def test_heads_merged_with_the_batch_are_counted(journey_export, family: str, dynamo: bool) -> None:
    # BLOOM (ALiBi, a fused per-head query/key/value) and DeBERTa-v2 multiply [B*H, T, d] tensors: inspect read
    # no heads at all, so --heads and every per-head analysis refused
    built = journey_export(family, dynamo)
    code, out, err = _run(["inspect", str(built.path), "--json"])
    assert code == 0, err
    found = json.loads(out)["attention"]
    spec = built.spec
    assert [(a["heads"], a["kv_heads"], a["head_dim"]) for a in found] == \
        [(spec.heads, spec.kv_heads, zoo.HIDDEN // spec.heads)] * zoo.LAYERS


def _single_head_attention() -> onnx.ModelProto:
    """A pre-norm block, softmax(x Wq (x Wk)^T) x Wv on [B, T, D] and an FFN: one head, its products on
    three-axis tensors like BLOOM's."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, (8, 8), rng.standard_normal((8, 8)).astype(np.float32).ravel())
             for n in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["n", "wk"], ["k"],
                                                                                   name="k"),
             helper.make_node("MatMul", ["n", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["a"], name="mix"), helper.make_node("MatMul", ["a", "wo"], ["o"],
                                                                                        name="o"),
             helper.make_node("Add", ["x", "o"], ["r"], name="residual"),
             helper.make_node("LayerNormalization", ["r", "g", "b"], ["n2"], name="norm2", axis=-1),
             helper.make_node("MatMul", ["n2", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "w2"], ["f"], name="down"),
             helper.make_node("Add", ["r", "f"], ["y"], name="residual2")]
    inits += [helper.make_tensor("g", TensorProto.FLOAT, (8,), np.ones(8, np.float32)),
              helper.make_tensor("b", TensorProto.FLOAT, (8,), np.zeros(8, np.float32)),
              helper.make_tensor("w1", TensorProto.FLOAT, (8, 16), rng.standard_normal(128).astype(np.float32)),
              helper.make_tensor("w2", TensorProto.FLOAT, (16, 8), rng.standard_normal(128).astype(np.float32))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])


def test_a_three_axis_product_that_merges_no_heads_is_not_counted_as_the_batch() -> None:
    found = onnxmorph.inspect(_single_head_attention())["attention"]
    assert len(found) == 1
    assert found[0]["heads"] in (None, 1), found  # never the batch size the shapes were evaluated with
