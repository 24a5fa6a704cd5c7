"""Tests of `onnxmorph diff`: the text and JSON diff, FLOPs and parameters, Model Explorer's mapping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper

import onnxmorph
from onnxmorph.cli import main
from onnxmorph.diff import diff, model_explorer_mapping, model_view, node_flops

CIFAR = MODELS / "cifar10_quick.onnx"
# cifar10_quick per example: three 5x5 convs (32x32, 16x16, 8x8 outputs) and two Gemms, 2 FLOPs a multiply-add.
CIFAR_FLOPS = 2 * (32 * 32 * 32 * 3 * 25 + 32 * 16 * 16 * 32 * 25 + 64 * 8 * 8 * 32 * 25 + 1024 * 64 + 64 * 10)

MORPHS = {
    "deepen": ("deepen", {"layer": "conv2"}),
    "widen": ("widen", {"layer": "conv2", "width": 48}),
    "subnet": ("subnet", {"layer": "conv2", "kind": "parallel", "kernels": "1,3,5"}),
    "skip": ("skip", {"source": "conv1_out", "target": "conv3_out", "mode": "concat"}),
    "kernel": ("kernel", {"layer": "conv1", "size": 7}),
}


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One verified child of cifar10_quick per morph, saved as a file (the receipt names the parent file)."""
    folder = tmp_path_factory.mktemp("diff")
    out = {}
    for key, (name, params) in MORPHS.items():
        child, report = onnxmorph.morph(CIFAR, name, **params)
        assert report
        out[key] = onnxmorph.save(child, folder / f"{key}.onnx")
    return out


def _float_parameters(path: Path) -> int:
    model = onnx.load(path)
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def test_deepen_diff_groups_the_new_nodes_under_the_receipt_step(children: dict[str, Path]) -> None:
    d = diff(CIFAR, children["deepen"])
    assert d.removed == ["conv2"]
    assert d.added == ["conv2/morph_deepen/conv_a", "conv2/morph_deepen/act", "conv2/morph_deepen/conv_b"]
    assert not d.rewired and not d.modified
    [group] = d.groups
    assert group["morph"] == "deepen" and group["origin"] == "conv2" and group["nodes"] == d.added
    assert group["step"]["index"] == 1 and group["step"]["params"]["layer"] == "conv2"
    assert d.mapping["conv2"] == d.added and d.mapping["conv1"] == ["conv1"]
    assert d.receipt_note == "" and d.history[0]["verification"]["passed"] is True
    info = d.to_dict()
    assert info["summary"]["parameters"] == [_float_parameters(CIFAR), _float_parameters(children["deepen"])]
    # conv2 (32->32 5x5, 16x16 out) became 32->32 5x5 then 3x3; all the padding moves to the first layer,
    # so it computes an 18x18 map that the unpadded 3x3 brings back to 16x16
    extra = 2 * (32 * (18 * 18 - 16 * 16) * 32 * 25 + 32 * 16 * 16 * 32 * 9)
    assert info["summary"]["flops_per_example"] == [CIFAR_FLOPS, CIFAR_FLOPS + extra]
    assert info["new_weights"]["conv2/morph_deepen/conv_b/weight"] == [32, 32, 3, 3]


def test_widen_diff_lists_grown_weights_old_to_new(children: dict[str, Path]) -> None:
    d = diff(CIFAR, children["widen"])
    assert not d.added and not d.removed and not d.rewired and not d.groups
    grown = {w["name"]: (w["old"], w["new"]) for w in d.weights}
    assert grown == {
        "conv2.weight": ([32, 32, 5, 5], [48, 32, 5, 5]),
        "conv2.bias": ([32], [48]),
        "conv3.weight": ([64, 32, 5, 5], [64, 48, 5, 5]),
    }
    assert d.changes("child") == {"conv2": ["grown"], "conv3": ["grown"]}
    params = d.to_dict()["summary"]["parameters"]
    assert params[1] - params[0] == 16 * 32 * 25 + 16 + 64 * 16 * 25
    text = str(d)
    assert "conv2.weight  32x32x5x5 -> 48x32x5x5  (read by conv2)" in text
    assert "widen(layer='conv2'" in text and "verification PASS" in text


def test_subnet_diff_and_model_explorer_mapping_is_one_to_many(children: dict[str, Path], tmp_path: Path) -> None:
    d = diff(CIFAR, children["subnet"])
    assert d.removed == ["conv2"] and len(d.added) == 4 and "conv2/morph_subnet/sum" in d.added
    assert [g["morph"] for g in d.groups] == ["subnet"] and d.groups[0]["step"]["index"] == 1
    out = tmp_path / "me.json"
    assert main(["diff", str(CIFAR), str(children["subnet"]), "--model-explorer", str(out), "-q"]) == 0
    data = json.loads(out.read_text())
    child_names = {n.name for n in onnx.load(children["subnet"]).graph.node}
    parent_names = {n.name for n in onnx.load(CIFAR).graph.node}
    entries = {tuple(e["leftNodeIds"]): e["rightNodeIds"] for e in data["mappingEntries"]}
    assert entries[("conv2",)] == d.added
    assert entries[("relu1",)] == ["relu1"]
    # every id names a node of the files Model Explorer opens (its ONNX adapter uses node names as ids)
    assert {k[0] for k in entries} <= parent_names and {i for v in entries.values() for i in v} <= child_names
    assert data["mapping"]["conv2"] == d.added[0] and data["showDiffHighlights"] is True
    assert model_explorer_mapping(d) == data


def test_skip_rewires_the_consumer_and_kernel_changes_attributes(children: dict[str, Path]) -> None:
    d = diff(CIFAR, children["skip"])
    assert d.rewired == [{"node": "relu3", "inputs": [["conv3_out"], ["conv3_out/morph_skip/out"]]}]
    assert d.groups[0]["morph"] == "skip" and d.groups[0]["origin"] == "conv3" and d.groups[0]["step"]
    assert d.mapping["conv3"] == ["conv3", *d.groups[0]["nodes"]]
    k = diff(CIFAR, children["kernel"])
    [entry] = k.modified
    assert entry["node"] == "conv1" and entry["attributes"]["kernel_shape"] == ["[5, 5]", "[7, 7]"]
    assert [w["name"] for w in k.weights] == ["conv1.weight"]


def test_cli_text_and_json(children: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(CIFAR), str(children["deepen"])]) == 0
    text = capsys.readouterr().out
    assert "added nodes (3), by the morph that made them:" in text
    assert "deepen of conv2 (receipt step 1):" in text
    assert "- conv2  Conv  (became 3 node(s)" in text
    assert f"{_float_parameters(CIFAR):,}" in text
    assert main(["diff", str(CIFAR), str(children["deepen"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["removed"] == ["conv2"] and data["groups"][0]["morph"] == "deepen"
    assert data["history"][0]["verification"]["outputs"][0]["name"] == "logits"


def test_receipt_of_another_parent_is_flagged(children: dict[str, Path]) -> None:
    d = diff(MODELS / "vgg_bn.onnx", children["deepen"])
    assert "another parent" in d.receipt_note
    assert "another parent" in str(d)


def _unnamed_model_with_symbolic_length(dims: tuple = ("N", "T", 8)) -> onnx.ModelProto:
    """MatMul on `dims` ([N, T, 8]: T symbolic), unnamed nodes, and a weight made by a Constant node."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["w_c"], value=w),
        helper.make_node("MatMul", ["x", "w_c"], ["h"]),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("MatMul", ["h_relu", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:-1], 4])],
        [numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_flops_are_counted_at_verifications_sequence_length_and_unnamed_nodes_match(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent_path = tmp_path / "parent.onnx"
    onnx.save(_unnamed_model_with_symbolic_length(), parent_path)
    child, _ = onnxmorph.morph(parent_path, "widen", layer="h", width=10, shapes={"x": [2, 5, 8]})
    child_path = onnxmorph.save(child, tmp_path / "child.onnx")
    d = diff(parent_path, child_path)
    # the parent's unnamed nodes get the names the morph gave them: nothing looks added or removed
    assert not d.added and not d.removed and d.parent.unnamed_nodes == 3
    assert [w["name"] for w in d.weights] == ["w_c", "w2"]
    info = d.to_dict()["summary"]
    # T is axis 1 of a rank-3 input: verification's sequence, 16; the batch N is 1 (per example)
    assert info["flops_unknown_nodes"] == [[], []]
    assert info["flops_input_sizes"] == [{"x": [1, 16, 8]}, {"x": [1, 16, 8]}]
    assert info["flops_per_example"] == [2 * 16 * (8 * 6 + 6 * 4), 2 * 16 * (8 * 10 + 10 * 4)]
    text = str(d)
    assert "at input sizes x 1x16x8" in text and "+66.7%" in text and "have no name" in text
    # --shape sets the length (the batch given is still counted as 1: FLOPs are per example)
    assert main(["diff", str(parent_path), str(child_path), "--shape", "x:3x5x8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["flops_input_sizes"][1] == {"x": [1, 5, 8]}
    assert summary["flops_per_example"] == [2 * 5 * (8 * 6 + 6 * 4), 2 * 5 * (8 * 10 + 10 * 4)]
    assert main(["diff", str(parent_path), str(child_path), "--shape", "x:3x5x9"]) == 2
    assert "dimension 2 is fixed at 8, not 9" in capsys.readouterr().err


def test_a_dynamic_axis_without_a_default_leaves_flops_unknown(tmp_path: Path) -> None:
    # axis 2 of a rank-4 input, named H: neither a batch nor a sequence, so verification has no size for it
    path = tmp_path / "parent.onnx"
    onnx.save(_unnamed_model_with_symbolic_length(("N", 2, "H", 8)), path)
    d = diff(path, path)
    info = d.to_dict()["summary"]
    assert info["flops_unknown_nodes"] == [["h", "y"], ["h", "y"]]  # not guessed
    assert info["flops_input_sizes"] == [{}, {}] and "no default" in info["flops_notes"][0]
    text = str(d)
    assert "FLOPs unknown for 2 node(s)" in text and "not comparable" in text and "--shape x:" in text
    assert diff(path, path, {"x": [1, 2, 7, 8]}).to_dict()["summary"]["flops_per_example"] == \
        [2 * 2 * 7 * (8 * 6 + 6 * 4)] * 2
    # counted from the symbolic shapes, a leading symbol of the inputs is the batch (1); no other is guessed
    view = model_view(path)
    assert view.flop_shapes is None
    view.shapes["h"] = (None, 2, 5, 6)
    view.shapes["x"] = ("N", 2, 5, 8)
    assert node_flops(view, view.nodes["h"]) is None  # a leading None is not a declared batch
    view.shapes["h"] = ("N", 2, 5, 6)
    assert node_flops(view, view.nodes["h"]) == 2 * 2 * 5 * 8 * 6


def test_morph_command_writes_the_page_after_saving(tmp_path: Path) -> None:
    out, page = tmp_path / "child.onnx", tmp_path / "page.html"
    assert main(["deepen", str(CIFAR), "--layer", "conv2", "-o", str(out), "--html", str(page), "-q"]) == 0
    text = page.read_text()
    assert text.count('data-change="added"') == 3 and 'data-node="conv2/morph_deepen/conv_a"' in text
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["diff", "missing.onnx", str(CIFAR)], "missing.onnx: no such file"),
    (["diff", str(MODELS / "generate.py"), str(CIFAR)], "not an ONNX model"),
    (["diff", str(CIFAR), str(CIFAR), "--html", "no/such/folder/x.html"], "does not exist"),
    (["diff", str(CIFAR), str(CIFAR), "--model-explorer", str(CIFAR)], "overwrite"),
])
def test_diff_bad_input_is_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_morph_html_into_the_child_itself_is_refused_before_morphing(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "child.onnx"
    assert main(["widen", str(CIFAR), "--layer", "conv2", "--width", "40", "-o", str(out), "--html", str(out)]) == 2
    assert "is the child's own file" in capsys.readouterr().err and not out.exists()


def test_child_with_external_data_is_read_from_its_header(tmp_path: Path) -> None:
    child, _ = onnxmorph.morph(CIFAR, "widen", layer="conv2", width=40)
    path = onnxmorph.save(child, tmp_path / "child.onnx", external_data=True)
    assert (tmp_path / "child.onnx.data").is_file()
    d = diff(CIFAR, path)
    assert {w["name"]: w["new"] for w in d.weights}["conv2.weight"] == [40, 32, 5, 5]
    assert d.to_dict()["summary"]["parameters"][1] == sum(
        math.prod(t.dims) for t in onnx.load(path).graph.initializer if t.data_type == TensorProto.FLOAT)


def test_duplicate_node_names_are_kept_apart_and_models_in_memory_work() -> None:
    model = _unnamed_model_with_symbolic_length()
    for node in model.graph.node:
        node.name = "same"
    view = model_view(model)
    assert list(view.nodes) == ["same", "same#2", "same#3"] and view.path == "<model>"
    d = diff(model, model)
    assert not (d.added or d.removed or d.rewired or d.modified or d.weights)
    assert d.receipt_note == "the child has no onnxmorph receipt"
    assert "no structural change" in str(d)


def test_a_grandchild_shows_the_runs_since_each_ancestor(children: dict[str, Path], tmp_path: Path) -> None:
    grandchild, _ = onnxmorph.morph(children["deepen"], "widen", layer="conv2/morph_deepen/conv_a", width=40)
    path = onnxmorph.save(grandchild, tmp_path / "grandchild.onnx")
    from_child = diff(children["deepen"], path)
    assert [r["steps"][0]["pass"] for r in from_child.history] == ["widen"] and from_child.receipt_note == ""
    assert {w["name"] for w in from_child.weights} >= {"conv2/morph_deepen/conv_a/weight"}
    from_parent = diff(CIFAR, path)
    assert [r["steps"][0]["pass"] for r in from_parent.history] == ["deepen", "widen"]
    assert from_parent.receipt_note == "" and from_parent.groups[0]["step"]["index"] == 1
    assert "run 2: widen(" in str(from_parent)


def _llama_flops(sequence: int, blocks: int) -> int:
    """FLOPs per example of tests/hf_support.py's Llama: hidden 32, 4 query and 2 key/value heads of 8, MLP 64."""
    s, h, kv, mlp, vocab = sequence, 32, 16, 64, 100
    projections = 2 * s * h * (h + kv + kv + h) + 3 * 2 * s * h * mlp  # q, k, v, o; gate, up, down
    attention = 2 * (2 * 4 * s * s * 8)  # scores and the weighted sum, 4 heads of 8
    return blocks * (projections + attention) + 2 * s * h * vocab


def test_transformer_flops_are_counted_at_the_sequence_length(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    hf_support = pytest.importorskip("hf_support")  # torch and transformers
    parent = hf_support.export("llama", False, tmp_path).path
    child = onnxmorph.save(onnxmorph.block(parent, after=0, verify=False), tmp_path / "grown.onnx")
    # the exported attention reshapes with sizes computed from Shape: counted after they are computed
    d = diff(parent, child)
    summary = d.to_dict()["summary"]
    assert summary["flops_unknown_nodes"] == [[], []]
    assert summary["flops_per_example"] == [_llama_flops(16, 2), _llama_flops(16, 3)]
    assert summary["flops_input_sizes"][0] == {"input_ids": [1, 16], "attention_mask": [1, 16]}
    [group] = d.groups  # `block --after 0` names its block by index: the one block step is still found
    assert group["morph"] == "block" and group["step"]["index"] == 1
    assert "block of model.model.layers.0 (receipt step 1):" in str(d)
    assert main(["diff", str(parent), str(child), "--shape", "input_ids:2x5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    # the mask's sequence axis takes the ids' size (as verification does); the batch is 1
    assert summary["flops_input_sizes"][1] == {"input_ids": [1, 5], "attention_mask": [1, 5]}
    assert summary["flops_per_example"] == [_llama_flops(5, 2), _llama_flops(5, 3)]
