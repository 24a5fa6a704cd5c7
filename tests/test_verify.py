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
from onnxmorph.errors import InvalidModelError, UnsafeModelError, UsageError
from onnxmorph.verification.report import OutputCheck, compare, default_tolerances
from onnxmorph.verification.verifier import parse_shape, read_model_file


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
    compare(check, expected, actual)
    assert check.passed
    # the tolerance each would have needed, given the other: both below what was allowed
    assert check.needed_atol == pytest.approx(1e-7, rel=0.01)
    assert check.needed_rtol == pytest.approx(5e-5, rel=0.05)
    check = OutputCheck(name="y", shape=[3], dtype="float32", atol=1e-5, rtol=1e-6)
    compare(check, expected, actual)
    assert not check.passed and check.mismatched == 1
    assert check.needed_rtol == pytest.approx(5e-5, rel=0.05)  # only the element above atol counts


def test_nan_positions_must_agree() -> None:
    check = OutputCheck(name="y", shape=[2], dtype="float32", atol=1e-5, rtol=1e-4)
    compare(check, np.array([np.nan, 1.0], np.float32), np.array([np.nan, 1.0], np.float32))
    assert check.passed
    compare(check, np.array([np.nan, 1.0], np.float32), np.array([0.0, 1.0], np.float32))
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


def test_dynamic_sequence_axis_has_a_default_and_other_axes_a_suggestion_that_parses() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert onnxmorph.verify(model, model).inputs == {"x": [2, 16]}
    assert onnxmorph.verify(model, model, shapes={"x": [3, 9]}).inputs == {"x": [3, 9]}
    image = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    model = helper.make_model(image, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UsageError, match="--shape x:2x3x32x32") as refusal:
        onnxmorph.verify(model, model)
    suggested = str(refusal.value).rsplit("--shape ", 1)[1]
    assert onnxmorph.verify(model, model, shapes=dict([parse_shape(suggested)])).inputs == {"x": [2, 3, 32, 32]}


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


# --------------------------------------------------------------------------- by path


def _add_model(*tensors: onnx.TensorProto) -> onnx.ModelProto:
    """y = x + w for the first tensor `w`; the others are unused initializers."""
    w = tensors[0]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", w.name], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(w.dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(w.dims))], initializer=list(tensors))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _weight(name: str, n: int, raw_bytes: int | None = None) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.arange(n, dtype=np.float32), name)
    if raw_bytes is not None:  # data that does not match the dims
        tensor.raw_data = b"\0" * raw_bytes
    return tensor


def _changed_mlp(tmp_path: Path) -> Path:
    child = onnx.load(MODELS / "mlp_relu.onnx")
    tensor = _initializer(child, "fc2.weight")
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.001, tensor.name))
    onnx.save(child, tmp_path / "changed.onnx")
    return tmp_path / "changed.onnx"


def _widened_cifar(tmp_path: Path) -> Path:
    child, _ = onnxmorph.morph(MODELS / "cifar10_quick.onnx", "widen", layer="conv2", width=40, verify=False)
    onnxmorph.save(child, tmp_path / "widened.onnx")
    return tmp_path / "widened.onnx"


@pytest.mark.parametrize("case", ["same", "changed", "widened", "light"])
def test_by_path_gives_the_in_memory_report(tmp_path: Path, case: str) -> None:
    parent = {"widened": MODELS / "cifar10_quick.onnx", "light": LIGHT / "light_squeezenet.onnx"}.get(
        case, MODELS / "mlp_relu.onnx")
    child = {"changed": _changed_mlp, "widened": _widened_cifar}.get(case, lambda _: parent)(tmp_path)
    by_path = onnxmorph.verify(parent, child, trials=2, seed=3)
    # In memory, the models are loaded (and normalised: Constant/ConstantOfShape weights folded).
    in_memory = onnxmorph.verify(onnxmorph.load(parent), onnxmorph.load(child), trials=2, seed=3)
    assert by_path.to_dict() == in_memory.to_dict()
    assert bool(by_path) == (case != "changed")
    assert by_path.outputs and by_path.outputs[0].elements > 0


def test_a_file_is_read_without_its_weights() -> None:
    path = MODELS / "mlp_relu.onnx"
    model_file = read_model_file(path)
    full = onnx.load(path)
    assert model_file.checked and model_file.skipped
    assert model_file.header.ByteSize() < path.stat().st_size / 50
    for index, tensor in enumerate(model_file.header.graph.initializer):
        original = full.graph.initializer[index]
        assert tensor.name == original.name and list(tensor.dims) == list(original.dims)
        if index in model_file.skipped:
            assert not tensor.HasField("raw_data") and model_file.skipped[index] == len(original.raw_data)
        else:
            assert tensor == original
    assert model_file.header.graph.node == full.graph.node
    assert model_file.header.graph.input == full.graph.input and model_file.header.graph.output == full.graph.output


def test_merged_graph_fields_are_checked_tensor_by_tensor(tmp_path: Path) -> None:
    # Protobuf merges a message given twice; a reader that restarted its count would check the wrong tensor.
    first = _add_model(_weight("w1", 1024)).SerializeToString()
    extra = onnx.ModelProto()
    extra.graph.initializer.append(_weight("w2", 1024))
    (tmp_path / "good.onnx").write_bytes(first + extra.SerializeToString())
    model_file = read_model_file(tmp_path / "good.onnx")
    assert model_file.skipped == {0: 4096, 1: 4096}
    assert [t.name for t in model_file.header.graph.initializer] == ["w1", "w2"]
    assert onnxmorph.verify(model_file, tmp_path / "good.onnx", trials=1)
    extra.graph.initializer[0].raw_data = b"\0" * 2048
    (tmp_path / "bad.onnx").write_bytes(first + extra.SerializeToString())
    with pytest.raises(InvalidModelError, match="tensor 'w2' declares 4096 bytes .* but holds 2048"):
        read_model_file(tmp_path / "bad.onnx")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "short-weight", "checker"])
def test_bad_files_are_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.onnx"
    good = _add_model(_weight("w", 1024)).SerializeToString()
    if kind == "truncated":
        path.write_bytes(good[: len(good) - 100])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "short-weight":
        onnx.save(_add_model(_weight("w", 1024, raw_bytes=2048)), path)
    else:  # the Add reads a name nothing defines
        model = _add_model(_weight("w", 1024))
        model.graph.node[0].input[0] = "nowhere"
        onnx.save(model, path)
    expected = {"truncated": "not an ONNX model", "garbage": "not an ONNX model",
                "short-weight": "declares 4096 bytes", "checker": "invalid ONNX model"}[kind]
    with pytest.raises(InvalidModelError, match=expected):
        read_model_file(path)
    result = _run_cli("verify", str(MODELS / "mlp_relu.onnx"), str(path))
    assert result.returncode == 2 and expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def _with_external_weight(folder: Path, location: str, data_file: Path) -> Path:
    folder.mkdir(exist_ok=True)
    data_file.write_bytes(np.arange(1024, dtype=np.float32).tobytes())
    model = _add_model(_weight("w", 1024))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value="4096")
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


def test_external_data_outside_the_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    evil = _with_external_weight(tmp_path / "sub", "../secret.bin", tmp_path / "secret.bin")
    with pytest.raises(UnsafeModelError, match="outside the model's folder"):
        read_model_file(evil)
    with pytest.raises(UnsafeModelError):
        onnxmorph.verify(evil, evil)
    for args in (["verify", str(evil), str(evil)], ["verify", "model.onnx", "model.onnx", "--trials", "1"]):
        result = _run_cli(*args, cwd=evil.parent)
        assert result.returncode == 2 and "outside the model's folder; refused" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and not result.stdout


def test_external_data_resolves_beside_the_file_and_a_changed_child_exits_1(tmp_path: Path) -> None:
    parent = _with_external_weight(tmp_path / "a", "w.bin", tmp_path / "a" / "w.bin")
    child = _with_external_weight(tmp_path / "b", "w.bin", tmp_path / "b" / "w.bin")
    same = _run_cli("verify", str(parent), str(child), "--trials", "1", "--json", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    (tmp_path / "b" / "w.bin").write_bytes((np.arange(1024, dtype=np.float32) * 1.001).tobytes())
    changed = _run_cli("verify", str(parent), str(child), "--trials", "1", "--json", cwd=tmp_path)
    assert changed.returncode == 1 and changed.stderr == ""
    data = json.loads(changed.stdout)["verification"]
    assert data == onnxmorph.verify(onnxmorph.load(parent), onnxmorph.load(child), trials=1).to_dict()
    assert data["passed"] is False and data["outputs"][0]["mismatched"] > 0
