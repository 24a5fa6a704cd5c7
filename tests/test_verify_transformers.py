"""verify with no flags on exported transformers: sequence axes, token ids and masks drawn by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hf_support import hf_export  # noqa: F401  (fixture)
from onnx import TensorProto, helper, numpy_helper

import onnxmorph
from onnxmorph import cli
from onnxmorph.verification import feeds
from onnxmorph.verification.verifier import Verifier, read_model_file

TEXT_MODELS = [("gpt2", False), ("bert", False), ("llama", False), ("llama", True),
               pytest.param("gpt2", True, marks=pytest.mark.slow), pytest.param("bert", True, marks=pytest.mark.slow)]


def _perturbed(path: Path, out: Path) -> Path:
    """A copy of the model with one MatMul/Gemm weight changed by 0.1%."""
    model = onnxmorph.load(path)
    consumers = {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input[1:2]}
    weight = next(t for t in model.graph.initializer if t.name in consumers and len(t.dims) == 2)
    array = numpy_helper.to_array(weight) * 1.001
    weight.CopyFrom(numpy_helper.from_array(array.astype(np.float32), weight.name))
    onnx.save(model, out)
    return out


@pytest.mark.parametrize(("kind", "dynamo"), TEXT_MODELS, ids=lambda v: str(v))
def test_verify_with_no_flags_passes_on_itself_and_fails_on_a_modified_copy(
        hf_export, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    assert cli.main(["verify", str(hf.path), str(hf.path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "input_ids int64[2x16] token ids in [0, 100)" in header
    assert "attention_mask int64[2x16] ones" in header
    assert "uniform" not in header
    assert cli.main(["verify", str(hf.path), str(_perturbed(hf.path, tmp_path / "changed.onnx"))]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True])
def test_verify_with_no_flags_on_an_audio_model(hf_export, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export("wav2vec2", dynamo)
    report = onnxmorph.verify(hf.path, hf.path)
    assert report and report.inputs == {"input_values": [2, 16]}
    assert "input_values float32[2x16] uniform [-1, 1)" in report.input_source


def test_token_ids_and_masks_as_drawn(hf_export) -> None:  # noqa: F811
    hf = hf_export("bert", False)
    verifier = Verifier(read_model_file(hf.path), trials=3)
    for feed in verifier.feeds:
        assert feed["input_ids"].shape == (2, 16) and feed["input_ids"].max() < 100
        assert feed["token_type_ids"].max() <= 1 and len(np.unique(feed["token_type_ids"])) == 2
        assert (feed["attention_mask"] == 1).all()
    ids = np.concatenate([f["input_ids"].ravel() for f in verifier.feeds])
    assert len(np.unique(ids)) > 50  # the whole vocabulary is used, not [0, 10)
    # The exported graph computes what the Hugging Face model computes on the same arrays.
    ours = onnxmorph.verify(hf.path, hf.path, inputs=verifier.feeds[0])
    assert ours
    import onnxruntime as ort
    session = ort.InferenceSession(str(hf.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, verifier.feeds[0])[0], hf.logits(verifier.feeds[0]),
                               atol=1e-4, rtol=1e-4)


def _graph(nodes, inputs, tables) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=tables)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_ids_through_reshape_and_cast_stay_in_the_vocabulary_and_names_share_sizes() -> None:
    table = numpy_helper.from_array(np.zeros((7, 3), np.float32), "table")
    shape = numpy_helper.from_array(np.array([-1], np.int64), "flat")
    nodes = [helper.make_node("Reshape", ["ids", "flat"], ["ids_flat"]),
             helper.make_node("Cast", ["ids_flat"], ["ids_cast"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "ids_cast"], ["emb"]),
             helper.make_node("Cast", ["keep"], ["keep_f"], to=TensorProto.FLOAT),
             helper.make_node("Where", ["flag", "emb", "emb"], ["w"]),
             helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["keep_f"], ["k"], keepdims=0),
             helper.make_node("Add", ["s", "k"], ["y"])]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("keep", TensorProto.INT64, ["B2", "other"]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [1])]
    model = _graph(nodes, inputs, [table, shape])
    draws = feeds.input_draws(model)
    assert (draws["ids"].kind, draws["ids"].high) == ("ids", 7)
    assert draws["keep"].kind == "int" and draws["flag"].kind == "mask"
    # A size given for one input's axis is taken by the same axis of an input of the same rank.
    assert feeds.resolve_shapes(model, {"ids": [3, 5]}) == {"ids": [3, 5], "keep": [3, 5], "flag": [1]}
    assert feeds.resolve_shapes(model, None) == {"ids": [2, 16], "keep": [2, 16], "flag": [1]}
    rng = np.random.default_rng(0)
    feed = feeds.random_inputs(model, feeds.resolve_shapes(model, None), rng)
    assert feed["ids"].max() < 7 and feed["flag"].all()
    assert "ids int64[2x16] token ids in [0, 7)" in feeds.describe_inputs(model, {"ids": [2, 16], "keep": [2, 16],
                                                                                  "flag": [1]})
