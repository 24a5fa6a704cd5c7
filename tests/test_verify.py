"""Tests of verification: what it catches, what it lets through, and how it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import LIGHT, LIGHT_MODELS, MODELS
from onnx import TensorProto, helper, numpy_helper

import onnxmorph
from onnxmorph.errors import UsageError
from onnxmorph.verify import OutputCheck, _compare, default_tolerances


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxmorph", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def mlp() -> onnx.ModelProto:
    return onnxmorph.load(MODELS / "mlp_relu.onnx")


def test_identical_copy_passes_and_reports(mlp: onnx.ModelProto) -> None:
    report = onnxmorph.verify(mlp, _copy(mlp))
    assert report and report.passed
    assert report.trials == 3 and report.inputs == {"input": [2, 784]}
    assert report.max_abs_error == 0.0
    text = str(report)
    assert "PASS" in text and "logits" in text and "needed atol" in text
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["outputs"][0]["name"] == "logits"


def test_a_weight_tensor_changed_by_a_tenth_of_a_percent_fails(mlp: onnx.ModelProto) -> None:
    child = _copy(mlp)
    tensor = _initializer(child, "fc2.weight")
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.001, tensor.name))
    report = onnxmorph.verify(mlp, child)
    assert not report
    assert report.outputs[0].mismatched > 0
    assert report.max_rel_error > 1e-4


def test_one_weight_element_changed_by_a_tenth_of_a_percent_fails(mlp: onnx.ModelProto) -> None:
    child = _copy(mlp)
    tensor = _initializer(child, "fc3.weight")
    array = numpy_helper.to_array(tensor).copy()
    k = np.unravel_index(np.abs(array).argmax(), array.shape)
    array[k] *= 1.001
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    assert not onnxmorph.verify(mlp, child)


def test_a_renamed_output_fails(mlp: onnx.ModelProto) -> None:
    child = _copy(mlp)
    child.graph.output[0].name = "scores"
    for node in child.graph.node:
        node.output[:] = ["scores" if o == "logits" else o for o in node.output]
    report = onnxmorph.verify(mlp, child)
    assert not report
    assert any("outputs" in p and "scores" in p for p in report.problems)


def test_a_changed_output_shape_fails(mlp: onnx.ModelProto) -> None:
    child = _copy(mlp)
    w = _initializer(child, "fc3.weight")
    b = _initializer(child, "fc3.bias")
    w_arr, b_arr = numpy_helper.to_array(w), numpy_helper.to_array(b)
    w.CopyFrom(numpy_helper.from_array(np.vstack([w_arr, w_arr[:1]]), w.name))
    b.CopyFrom(numpy_helper.from_array(np.concatenate([b_arr, b_arr[:1]]), b.name))
    child.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 11
    report = onnxmorph.verify(mlp, child)
    assert not report
    assert any("shape" in p for p in report.problems)
    assert "shape [2, 11] differs" in (report.outputs[0].problem or "")


def test_polygraphy_rule_element_fails_only_beyond_both_tolerances() -> None:
    expected = np.array([1000.0, 1e-7, 1.0], dtype=np.float32)
    actual = np.array([1000.05, 2e-7, 1.0], dtype=np.float32)  # big abs but small rel; big rel but small abs
    check = OutputCheck(name="y", shape=[3], dtype="float32", atol=1e-5, rtol=1e-4)
    _compare(check, expected, actual)
    assert check.passed
    # the tolerance each would have needed, given the other: both below what was allowed
    assert check.needed_atol == pytest.approx(1e-7, rel=0.01)
    assert check.needed_rtol == pytest.approx(5e-5, rel=0.05)
    check = OutputCheck(name="y", shape=[3], dtype="float32", atol=1e-5, rtol=1e-6)
    _compare(check, expected, actual)
    assert not check.passed and check.mismatched == 1
    assert check.needed_rtol == pytest.approx(5e-5, rel=0.05)  # only the element above atol counts


def test_nan_positions_must_agree() -> None:
    check = OutputCheck(name="y", shape=[2], dtype="float32", atol=1e-5, rtol=1e-4)
    _compare(check, np.array([np.nan, 1.0], np.float32), np.array([np.nan, 1.0], np.float32))
    assert check.passed
    _compare(check, np.array([np.nan, 1.0], np.float32), np.array([0.0, 1.0], np.float32))
    assert not check.passed


def test_default_tolerances_by_type() -> None:
    assert default_tolerances(np.float32) == (1e-5, 1e-4)
    assert default_tolerances(np.float16) == (1e-2, 1e-2)
    assert default_tolerances(np.int64) == (0.0, 0.0)


def test_inputs_are_symmetric_and_seeded(mlp: onnx.ModelProto) -> None:
    first = onnxmorph.Verifier(mlp, seed=7)
    second = onnxmorph.Verifier(mlp, seed=7)
    feeds = [f["input"] for f in first.feeds]
    assert len(feeds) == 3 and all(f.min() < -0.9 and f.max() > 0.9 for f in feeds)
    np.testing.assert_array_equal(feeds[0], second.feeds[0]["input"])
    assert not np.array_equal(feeds[0], feeds[1])


def test_shapes_and_user_inputs(tmp_path: Path, mlp: onnx.ModelProto) -> None:
    report = onnxmorph.verify(mlp, mlp, shapes={"input": [5, 784]})
    assert report.inputs == {"input": [5, 784]}
    x = np.random.default_rng(0).normal(size=(4, 784)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    report = onnxmorph.verify(mlp, mlp, inputs=tmp_path / "x.npz")
    assert report and report.trials == 1 and report.inputs == {"input": [4, 784]}
    np.savez(tmp_path / "wrong.npz", data=x)
    with pytest.raises(UsageError, match="no array for input 'input'"):
        onnxmorph.verify(mlp, mlp, inputs=tmp_path / "wrong.npz")
    np.savez(tmp_path / "shape.npz", input=x[:, :100])
    with pytest.raises(UsageError, match="size 100 at axis 1"):
        onnxmorph.verify(mlp, mlp, inputs=tmp_path / "shape.npz")
    with pytest.raises(UsageError, match="does not have"):
        onnxmorph.verify(mlp, mlp, shapes={"nope": [1, 784]})


def test_integer_inputs_stay_in_the_table_range() -> None:
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="gather")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])], initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    verifier = onnxmorph.Verifier(model, trials=5)
    ids = np.concatenate([f["ids"].ravel() for f in verifier.feeds])
    assert ids.min() >= 0 and ids.max() <= 6 and len(set(ids.tolist())) > 3
    assert verifier.check(model)


def test_dynamic_non_batch_dimension_needs_a_shape() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UsageError, match="--shape x:NxN"):
        onnxmorph.verify(model, model)
    assert onnxmorph.verify(model, model, shapes={"x": [3, 9]}).inputs == {"x": [3, 9]}


def test_cli_verify_exit_codes(tmp_path: Path, mlp: onnx.ModelProto) -> None:
    parent = MODELS / "mlp_relu.onnx"
    same = _run_cli("verify", str(parent), str(parent), "--json")
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["verification"]["passed"] is True
    child = _copy(onnx.load(parent))
    tensor = _initializer(child, "fc1.weight")
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.001, tensor.name))
    onnx.save(child, tmp_path / "changed.onnx")
    changed = _run_cli("verify", str(parent), str(tmp_path / "changed.onnx"))
    assert changed.returncode == 1
    assert "FAIL" in changed.stdout
    assert changed.stderr.count("\n") == 1 and "Traceback" not in changed.stderr


@pytest.mark.parametrize("stem", LIGHT_MODELS)
def test_real_architectures_verify_against_themselves(stem: str) -> None:
    path = LIGHT / f"{stem}.onnx"
    report = onnxmorph.verify(path, path, trials=1)
    assert report, report.summary()
    assert report.outputs and report.outputs[0].elements > 0
