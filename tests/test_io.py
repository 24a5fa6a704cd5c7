"""Tests of model I/O: loading, normalisation, atomic saving and external data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import LIGHT, MODELS
from onnx import TensorProto, helper, numpy_helper

import onnxmorph
from onnxmorph.errors import InvalidModelError, UsageError
from onnxmorph.io import loading as mio
from onnxmorph.io import saving


def _conv_model_with_constants(ir_version: int = 8, opset: int = 13) -> onnx.ModelProto:
    """A Conv whose weight comes from ConstantOfShape, bias from Constant, via an Identity."""
    shape = numpy_helper.from_array(np.array([4, 3, 3, 3], dtype=np.int64), "w_shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                         value=numpy_helper.from_array(np.array([0.5], dtype=np.float32))),
        helper.make_node("Constant", [], ["b0"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32))),
        helper.make_node("Identity", ["b0"], ["b"]),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    inputs = [x]
    if ir_version < 4:
        inputs.append(helper.make_tensor_value_info("w_shape", TensorProto.INT64, [4]))
    graph = helper.make_graph(nodes, "g", inputs, [y], initializer=[shape], doc_string="graph doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], doc_string="model doc",
                              producer_name="test")
    model.ir_version = ir_version
    helper.set_model_props(model, {"author": "tests"})
    return model


def test_normalize_folds_constant_weights_and_names_nodes() -> None:
    model = _conv_model_with_constants()
    normal = mio.normalize(model)
    assert normal is not model
    assert [n.op_type for n in normal.graph.node] == ["Conv"]
    inits = {t.name: numpy_helper.to_array(t) for t in normal.graph.initializer}
    assert set(inits) == {"w", "b"}  # the shape tensor died with its ConstantOfShape
    np.testing.assert_array_equal(inits["w"], np.full((4, 3, 3, 3), 0.5, np.float32))
    np.testing.assert_array_equal(inits["b"], np.arange(4, dtype=np.float32))
    assert normal.graph.node[0].name == "y"  # unnamed node named after its output
    # the original is untouched
    assert [n.op_type for n in model.graph.node] == ["ConstantOfShape", "Constant", "Identity", "Conv"]
    assert onnxmorph.verify(model, normal)


def test_normalize_keeps_ir3_initializers_listed_as_inputs() -> None:
    model = _conv_model_with_constants(ir_version=3, opset=9)
    onnx.checker.check_model(model)
    normal = mio.normalize(model)
    onnx.checker.check_model(normal)
    listed = {i.name for i in normal.graph.input}
    assert {"w", "b"} <= listed
    assert [i.name for i in mio.true_inputs(normal)] == ["x"]


def test_load_returns_the_model_as_the_file_has_it() -> None:
    # Verification compares a child with this: normalising here would hide a folding mistake.
    path = LIGHT / "light_squeezenet.onnx"
    assert onnxmorph.load(path).graph == onnx.load(path).graph


def test_normalize_is_identity_on_normal_models() -> None:
    model = onnx.load(MODELS / "cifar10_quick.onnx")
    assert mio.normalize(model) is model


def test_stable_names_for_unnamed_nodes() -> None:
    first = onnxmorph.normalize(onnxmorph.load(LIGHT / "light_squeezenet.onnx"))
    second = onnxmorph.load(LIGHT / "light_squeezenet.onnx", normalize_model=True)
    names = [n.name for n in first.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names == [n.name for n in second.graph.node]


def test_save_keeps_metadata_opset_ir_and_dynamic_dims(tmp_path: Path) -> None:
    model = mio.normalize(_conv_model_with_constants())
    out = tmp_path / "m.onnx"
    onnxmorph.save(model, out)
    back = onnx.load(out)
    assert back.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in back.opset_import] == [("", 13)]
    assert back.doc_string == "model doc" and back.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in back.metadata_props} == {"author": "tests"}
    assert back.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_load_records_the_file_digest_and_save_drops_it(tmp_path: Path) -> None:
    import hashlib

    path = MODELS / "mlp_relu.onnx"
    model = onnxmorph.load(path)
    assert onnxmorph.digest(model) == hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "copy.onnx"
    onnxmorph.save(model, out)
    assert all(not p.key.startswith("onnxmorph.source") for p in onnx.load(out).metadata_props)


def test_save_with_external_data_round_trips(tmp_path: Path) -> None:
    model = onnxmorph.load(MODELS / "cifar10_quick.onnx")
    out = tmp_path / "ext.onnx"
    onnxmorph.save(model, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    assert out.stat().st_size < 20_000  # the weights live in the data file
    header = onnx.load(out, load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"ext.onnx.data"}
    # loading from another working directory resolves the data against the model's folder
    cwd = os.getcwd()
    try:
        os.chdir("/")
        back = onnxmorph.load(out)
    finally:
        os.chdir(cwd)
    assert onnxmorph.verify(model, back)


def test_save_consume_writes_the_same_model_without_a_copy(tmp_path: Path) -> None:
    model = onnxmorph.load(MODELS / "cifar10_quick.onnx")
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    onnxmorph.save(model, tmp_path / "kept.onnx", external_data=True)
    assert all(t.HasField("raw_data") for t in model.graph.initializer if t.dims)  # the model is intact
    mio.save(model, tmp_path / "used.onnx", external_data=True, consume=True)
    kept, used = onnxmorph.load(tmp_path / "kept.onnx"), onnxmorph.load(tmp_path / "used.onnx")
    for a, b in zip(kept.graph.initializer, used.graph.initializer):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert onnxmorph.verify(reference, used, trials=1)


def test_a_child_keeps_its_parents_external_data(tmp_path: Path) -> None:
    parent = tmp_path / "parent.onnx"
    onnxmorph.save(onnxmorph.load(MODELS / "cifar10_quick.onnx"), parent, external_data=True)
    assert mio.had_external_data(onnxmorph.load(parent))
    assert not mio.had_external_data(onnxmorph.load(MODELS / "cifar10_quick.onnx"))
    out = tmp_path / "child.onnx"
    result = subprocess.run([sys.executable, "-m", "onnxmorph", "widen", str(parent), "--layer", "conv2",
                             "--width", "48", "-o", str(out), "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "child.onnx.data").stat().st_size > out.stat().st_size
    child = onnxmorph.load(out)
    assert not any(p.key.startswith("onnxmorph.source") for p in onnx.load(out).metadata_props)
    assert onnxmorph.verify(onnxmorph.load(parent), child, trials=1)


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnxmorph.load(MODELS / "mlp_relu.onnx")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old content")

    def failing_write(path: Path, data: bytes) -> None:
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "_write_bytes", failing_write)
    with pytest.raises(UsageError, match="No space left"):
        onnxmorph.save(model, out)
    assert out.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"\x00\xff" * 64 + b"not a model", "not an ONNX model"),
])
def test_load_refuses_bad_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidModelError, match=message):
        onnxmorph.load(path)


def test_load_refuses_a_truncated_model(tmp_path: Path) -> None:
    data = (MODELS / "cifar10_quick.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(InvalidModelError):
        onnxmorph.load(path)


def test_load_refuses_a_model_that_fails_the_checker(tmp_path: Path) -> None:
    model = onnx.load(MODELS / "mlp_relu.onnx")
    model.graph.node[0].input[0] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(InvalidModelError, match="invalid ONNX model"):
        onnxmorph.load(path)


def test_normalize_folds_shape_ops_of_constants() -> None:
    w = numpy_helper.from_array(np.arange(24, dtype=np.float32), "w_flat")
    shape = numpy_helper.from_array(np.array([4, 6], dtype=np.int64), "w_shape")
    nodes = [
        helper.make_node("Reshape", ["w_flat", "w_shape"], ["w46"]),
        helper.make_node("Transpose", ["w46"], ["w"], perm=[1, 0]),
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              initializer=[w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    normal = mio.normalize(model)
    assert [n.op_type for n in normal.graph.node] == ["Gemm"]
    folded = numpy_helper.to_array(next(t for t in normal.graph.initializer if t.name == "w"))
    np.testing.assert_array_equal(folded, np.arange(24, dtype=np.float32).reshape(4, 6).T)
    assert onnxmorph.verify(model, normal)
