"""Hostile inputs, second round: an honest verification, outputs that must not destroy files,
sizes bounded before allocating, and one-line errors for inputs that used to crash."""

from __future__ import annotations

import os
import shutil
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper
from robust_support import assert_refused, listing, run_cli, run_main

import onnxmorph
from onnxmorph import limits
from onnxmorph.io import folding
from onnxmorph.io import loading as mio

# --------------------------------------------------------------------------- models


def _conv_model(weight_nodes: list[onnx.NodeProto], weight: str, inits: list[onnx.TensorProto],
                opset: int = 21, channels: int = 3) -> onnx.ModelProto:
    """x[N,C,6,6] -> Conv(weight made by `weight_nodes`) -> Relu -> Conv -> y: a weight computed by data movement."""
    rng = np.random.default_rng(0)
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (2, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [*weight_nodes,
             helper.make_node("Conv", ["x", weight], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])], [*inits, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _flatten_weight_model(axis: int) -> onnx.ModelProto:
    """A Gemm whose weight is Flatten(axis) of a constant: axis == rank gives [size, 1]."""
    rng = np.random.default_rng(1)
    raw = rng.normal(0, 1, (6, 2)).astype(np.float32)
    shape = {2: (12, 1), -2: (1, 12), 0: (1, 12), 1: (6, 2), -1: (6, 2)}[axis]
    nodes = [helper.make_node("Flatten", ["raw"], ["w"], name="flat", axis=axis),
             helper.make_node("Gemm", ["x", "w"], ["h"], name="fc1"),
             helper.make_node("Tanh", ["h"], ["y"], name="act")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", shape[1]])],
        [numpy_helper.from_array(raw, "raw")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _cast_weight_model(to: int) -> onnx.ModelProto:
    """conv1's weight is Cast(float32 -> `to`) -> Cast(-> float32) of weights partly out of `to`'s range."""
    rng = np.random.default_rng(2)
    raw = (rng.normal(0, 1, (4, 3, 3, 3)) * np.array([1, 30, 1000, 1])[:, None, None, None]).astype(np.float32)
    nodes = [helper.make_node("Cast", ["raw"], ["narrow"], name="to_narrow", to=to),
             helper.make_node("Cast", ["narrow"], ["w1"], name="to_float", to=TensorProto.FLOAT)]
    return _conv_model(nodes, "w1", [numpy_helper.from_array(raw, "raw")])


# --------------------------------------------------------------------------- the parent as given


@pytest.mark.parametrize("axis", [2, -2, 0, 1])
def test_a_flatten_folded_weight_matches_the_parent_file(axis: int, tmp_path: Path) -> None:
    path = tmp_path / "parent.onnx"
    onnx.save(_flatten_weight_model(axis), path)
    child, report = onnxmorph.morph(path, "deepen", layer="fc1", activation="none")
    assert report
    # and independently of the morph's own verification: the file against the child
    assert onnxmorph.verify(path, child, trials=2)


@pytest.mark.parametrize("to", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E4M3FNUZ,
                                TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_a_cast_folded_weight_saturates_as_onnxruntime_does(to: int, tmp_path: Path) -> None:
    path = tmp_path / "parent.onnx"
    onnx.save(_cast_weight_model(to), path)
    child, report = onnxmorph.morph(path, "widen", layer="conv1", width=6)
    assert report and report.max_abs_error < 1e-2 * max(1.0, report.max_abs_error)
    assert not any(np.isnan(numpy_helper.to_array(t)).any() for t in child.graph.initializer
                   if t.data_type == TensorProto.FLOAT)
    assert onnxmorph.verify(path, child, trials=2)


def _broken_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    real = folding.fold_shape_op

    def off_by_a_little(node, initializers, opset):  # type: ignore[no-untyped-def]
        return real(node, initializers, opset) * np.float32(1.01)

    monkeypatch.setattr(folding, "fold_shape_op", off_by_a_little)


def test_a_folding_mistake_fails_the_verification_of_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "parent.onnx"
    onnx.save(_flatten_weight_model(1), path)
    _broken_fold(monkeypatch)
    with pytest.raises(onnxmorph.VerificationFailed):
        onnxmorph.morph(path, "deepen", layer="fc1")
    result = run_main(["deepen", path, "--layer", "fc1", "-o", tmp_path / "child.onnx"], capfd)
    assert result.code == 1 and not (tmp_path / "child.onnx").exists()


def test_a_folding_mistake_fails_the_verification_of_a_model_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = _flatten_weight_model(1)
    _broken_fold(monkeypatch)
    with pytest.raises(onnxmorph.VerificationFailed):
        onnxmorph.deepen(parent, layer="fc1")
    with pytest.raises(onnxmorph.VerificationFailed):
        onnxmorph.subnet(parent, layer="fc1", kind="residual")


# Every data-movement fold against onnxruntime running the same node.

_FOLD_CASES = [
    ("Reshape", {}, [np.array([3, -1], np.int64)]),
    ("Reshape", {}, [np.array([0, -1], np.int64)]),
    ("Reshape", {"allowzero": 1}, [np.array([2, 3, 4], np.int64)]),
    ("Transpose", {}, []),
    ("Transpose", {"perm": [2, 0, 1]}, []),
    ("Flatten", {"axis": 0}, []),
    ("Flatten", {"axis": 3}, []),
    ("Flatten", {"axis": -3}, []),
    ("Flatten", {"axis": -1}, []),
    ("Unsqueeze", {}, [np.array([0, -1], np.int64)]),
    ("Unsqueeze", {}, [np.array([1, 4], np.int64)]),
    ("Squeeze", {}, [np.array([-2], np.int64)]),
]
_FOLD_DTYPES = [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64, np.bool_]
_CAST_TARGETS = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                 TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                 TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL,
                 TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
                 TensorProto.FLOAT8E5M2FNUZ]


def _in_onnxruntime(node: onnx.NodeProto, arrays: list[np.ndarray], opset: int) -> np.ndarray:
    """What onnxruntime computes for `node` on constant inputs (compared as float64 bits where it can)."""
    import onnxruntime as ort

    inits = [numpy_helper.from_array(a, f"in{k}") for k, a in enumerate(arrays)]
    probe = helper.make_node(node.op_type, [t.name for t in inits], ["out"],
                             **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    nodes = [probe]
    out_type = next((a.i for a in node.attribute if a.name == "to"), inits[0].data_type)
    if out_type != TensorProto.DOUBLE and node.op_type == "Cast":  # read the result back as doubles
        nodes.append(helper.make_node("Cast", ["out"], ["wide"], to=TensorProto.DOUBLE))
    final = nodes[-1].output[0]
    final_type = TensorProto.DOUBLE if node.op_type == "Cast" else inits[0].data_type
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(final, final_type, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


@pytest.mark.parametrize("dtype", _FOLD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_shape_fold_equals_onnxruntime(dtype: type) -> None:
    x = (np.arange(24).reshape(2, 3, 4) - 11).astype(dtype)
    for op, attrs, extra in _FOLD_CASES:
        if op == "Squeeze":
            x_in = x.reshape(2, 1, 12)
        else:
            x_in = x
        arrays = [x_in, *extra]
        node = helper.make_node(op, [f"in{k}" for k in range(len(arrays))], ["out"], name="n", **attrs)
        inits = {f"in{k}": numpy_helper.from_array(a, f"in{k}") for k, a in enumerate(arrays)}
        ours = folding.fold_shape_op(node, inits, 21)
        theirs = _in_onnxruntime(node, arrays, 21)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (op, attrs)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{op} {attrs}")


@pytest.mark.parametrize("to", _CAST_TARGETS, ids=lambda t: TensorProto.DataType.Name(t))
def test_every_cast_fold_equals_onnxruntime(to: int) -> None:
    special = [0.0, -0.0, 0.49, 0.5, 1.5, 2.5, -2.5, 127.7, 128.0, 255.9, 300.0, -300.0, 65504.0, 70000.0,
               1e10, -1e10, np.inf, -np.inf, np.nan, 3.0e-8]
    sources = [np.array(special, np.float32), np.array(special, np.float64),
               np.array([-300, -129, -1, 0, 1, 127, 255, 256, 70000, 2**40], np.int64)]
    for source in sources:
        node = helper.make_node("Cast", ["in0"], ["out"], name="c", to=to)
        ours = folding.fold_shape_op(node, {"in0": numpy_helper.from_array(source, "in0")}, 21)
        assert numpy_helper.from_array(ours).data_type == to
        # onnxruntime's own answer, read back as doubles: float8 and bfloat16 compare by value
        theirs = _in_onnxruntime(node, [source], 21)
        mine = _in_onnxruntime(helper.make_node("Cast", ["in0"], ["out"], to=TensorProto.DOUBLE),
                               [ours], 21) if to != TensorProto.DOUBLE else ours
        if to in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16) \
                or TensorProto.DataType.Name(to).startswith("FLOAT8"):
            np.testing.assert_array_equal(np.asarray(mine, np.float64), np.asarray(theirs, np.float64))
        else:
            np.testing.assert_array_equal(ours, theirs)


def test_a_chain_of_casts_folds_without_keeping_every_step() -> None:
    raw = np.random.default_rng(3).normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    nodes, previous = [], "raw"
    for k in range(24):
        to = TensorProto.DOUBLE if k % 2 == 0 else TensorProto.FLOAT
        nodes.append(helper.make_node("Cast", [previous], [f"c{k}"], name=f"cast{k}", to=to))
        previous = f"c{k}"
    model = _conv_model(nodes, previous, [numpy_helper.from_array(raw, "raw")])
    normal = mio.normalize(model)
    assert [t.name for t in normal.graph.initializer] == ["w2", previous]
    assert onnxmorph.verify(model, normal, trials=1)


def test_a_fold_over_the_memory_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = np.zeros((64, 64), np.float32)
    nodes = [helper.make_node("Cast", ["raw"], ["w"], name="widen_it", to=TensorProto.DOUBLE)]
    model = _flatten_weight_model(1)
    model.graph.initializer.append(numpy_helper.from_array(raw, "raw"))
    model.graph.node.insert(0, nodes[0])
    monkeypatch.setenv(limits.MODEL_BYTES.variable, str(20_000))
    with pytest.raises(onnxmorph.UnsafeModelError, match="ONNXMORPH_MAX_MODEL_BYTES"):
        mio.normalize(model)


# --------------------------------------------------------------------------- inputs that cannot distinguish


def _wrong_child(tmp_path: Path) -> tuple[Path, Path]:
    parent = tmp_path / "parent.onnx"
    shutil.copyfile(MODELS / "mlp_relu.onnx", parent)
    model = onnx.load(parent)
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * np.float32(2), first.name))
    child = tmp_path / "child.onnx"
    onnx.save(model, child)
    return parent, child


@pytest.mark.parametrize("kind", ["empty batch", "all NaN", "NaN outputs"])
def test_inputs_that_cannot_show_a_difference_fail(kind: str, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    parent, child = _wrong_child(tmp_path)
    x = {"empty batch": np.zeros((0, 784), np.float32), "all NaN": np.full((2, 784), np.nan, np.float32),
         "NaN outputs": np.full((2, 784), np.inf, np.float32)}[kind]
    np.savez(tmp_path / "x.npz", input=x)
    for pair in ((parent, child), (parent, parent)):  # a right child cannot be shown right on them either
        result = run_main(["verify", *pair, "--inputs", tmp_path / "x.npz"], capfd)
        assert result.code == 1, result
        assert "cannot" in result.err
    report = onnxmorph.verify(parent, parent, inputs={"input": x})
    assert not report and report.problems


def test_partly_nan_inputs_still_verify(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    parent, child = _wrong_child(tmp_path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 784)).astype(np.float32)
    x[0, :10] = np.nan
    np.savez(tmp_path / "x.npz", input=x)
    assert run_main(["verify", parent, parent, "--inputs", tmp_path / "x.npz"], capfd).code == 0
    assert run_main(["verify", parent, child, "--inputs", tmp_path / "x.npz"], capfd).code == 1


def test_a_0d_input_of_every_kind_is_drawn(tmp_path: Path) -> None:
    for elem, op in ((TensorProto.BOOL, "Not"), (TensorProto.FLOAT, "Neg"), (TensorProto.INT64, "Neg")):
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", elem, [])],
                                  [helper.make_tensor_value_info("y", elem, [])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        path = tmp_path / f"{op}.onnx"
        onnx.save(model, path)
        assert onnxmorph.verify(path, path), op


# --------------------------------------------------------------------------- tolerances


def _scaled_mlp(tmp_path: Path, scale: float) -> Path:
    model = onnx.load(MODELS / "mlp_relu.onnx")
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(scale), t.name))
    path = tmp_path / f"mlp_x{scale:g}.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_a_correct_morph_of_large_activations_passes_and_a_small_change_fails(scale: float, tmp_path: Path) -> None:
    path = _scaled_mlp(tmp_path, scale)
    for layer in ("fc1", "fc2"):
        child, report = onnxmorph.morph(path, "deepen", layer=layer)
        assert report, report
    model = onnx.load(path)
    for k in range(len(model.graph.initializer)):
        changed = onnx.load(path)
        t = changed.graph.initializer[k]
        array = numpy_helper.to_array(t)
        if array.ndim < 2:
            continue
        t.CopyFrom(numpy_helper.from_array(array * np.float32(1.001), t.name))
        assert not onnxmorph.verify(path, changed), t.name


# --------------------------------------------------------------------------- outputs


def test_a_fifo_or_a_device_is_never_replaced(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "parent.onnx"
    shutil.copyfile(MODELS / "cifar10_quick.onnx", model)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    device_link = tmp_path / "null_link"
    device_link.symlink_to(os.devnull)
    for target in (fifo, device_link):
        result = run_main(["deepen", model, "--layer", "conv2", "-o", target], capfd)
        assert_refused(result, 2, "not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert device_link.is_symlink() and stat.S_ISCHR(device_link.stat().st_mode)
    with pytest.raises(onnxmorph.UsageError, match="regular file"):
        onnxmorph.save(onnx.load(model), fifo)


def test_a_symlinked_output_replaces_its_target_and_keeps_the_link(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "parent.onnx"
    shutil.copyfile(MODELS / "mlp_relu.onnx", model)
    (tmp_path / "real.onnx").write_bytes(b"old")
    (tmp_path / "link.onnx").symlink_to("real.onnx")
    assert run_main(["deepen", model, "--layer", "fc2", "-o", tmp_path / "link.onnx"], capfd).code == 0
    assert (tmp_path / "link.onnx").is_symlink()
    assert onnxmorph.verify(model, tmp_path / "real.onnx", trials=1)


def test_a_parent_named_like_the_childs_weights_is_untouchable(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    # The parent X.onnx.data (itself with external weights); `-o X.onnx` would write X.onnx.data.
    parent = tmp_path / "X.onnx.data"
    onnxmorph.save(onnx.load(MODELS / "cifar10_quick.onnx"), parent, external_data=True)
    hard_link = tmp_path / "Y.onnx.data"
    os.link(parent, hard_link)
    before = listing(tmp_path)
    for out in ("X.onnx", "Y.onnx"):
        result = run_main(["deepen", parent, "--layer", "conv2", "-o", tmp_path / out], capfd)
        assert_refused(result, 2, "overwrite the parent")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("mode", [0o644, 0o640, None])
def test_the_output_keeps_the_mode_of_the_file_it_replaces(mode: int | None, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "child.onnx"
    if mode is not None:
        out.write_bytes(b"old")
        out.chmod(mode)
    old_mask = os.umask(0o022)
    try:
        assert run_main(["deepen", MODELS / "mlp_relu.onnx", "--layer", "fc2", "-o", out], capfd).code == 0
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(out.stat().st_mode) == (mode if mode is not None else 0o644)


def test_a_long_output_name_is_written(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("c" * 245 + ".onnx")
    assert run_main(["deepen", MODELS / "mlp_relu.onnx", "--layer", "fc2", "-o", out], capfd).code == 0
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # with external data, OUT.data must fit the folder's name limit too: one line, nothing written
    parent = tmp_path / "ext.onnx"
    onnxmorph.save(onnx.load(MODELS / "mlp_relu.onnx"), parent, external_data=True)
    out = tmp_path / ("d" * 250 + ".onnx")
    assert_refused(run_main(["deepen", parent, "--layer", "fc2", "-o", out], capfd), 2, "longer than")
    assert not out.exists()


# --------------------------------------------------------------------------- sizes from parameters


@pytest.mark.parametrize("args", [
    ["widen", "--layer", "conv2", "--width", "100000000"],
    ["kernel", "--layer", "conv2", "--size", "20001"],
    ["deepen", "--layer", "conv2", "--width", "10000000"],
    ["subnet", "--layer", "conv2", "--kind", "sequential", "--depth", "100000"],
    ["subnet", "--layer", "conv2", "--kind", "parallel", "--branches", "5000"],
])
def test_sizes_asked_by_parameters_are_refused_before_allocating(args: list[str], tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    result = run_main([args[0], MODELS / "cifar10_quick.onnx", *args[1:], "-o", tmp_path / "c.onnx"], capfd)
    assert_refused(result, 2, "ONNXMORPH_MAX_")
    assert time.monotonic() - started < 20
    assert not (tmp_path / "c.onnx").exists()


def test_a_limit_is_raised_and_lowered_by_its_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    args = ["subnet", MODELS / "cifar10_quick.onnx", "--layer", "conv2", "--kind", "sequential",
            "--depth", "3", "-o", tmp_path / "c.onnx"]
    monkeypatch.setenv(limits.NEW_LAYERS.variable, "2")
    assert_refused(run_main(args, capfd), 2, limits.NEW_LAYERS.variable)
    monkeypatch.setenv(limits.NEW_LAYERS.variable, "3")
    monkeypatch.setenv(limits.NEW_BYTES.variable, "1000")
    assert_refused(run_main(args, capfd), 2, limits.NEW_BYTES.variable)
    monkeypatch.delenv(limits.NEW_BYTES.variable)
    assert run_main(args, capfd).code == 0
    monkeypatch.setenv(limits.NEW_BYTES.variable, "lots")
    assert_refused(run_main(args, capfd), 2, "whole number")


# --------------------------------------------------------------------------- recipes


_RECIPES = {
    "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                 "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nsteps: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
    "deep.json": "[" * 100_000 + "]" * 100_000,
    "deep.yaml": "".join("  " * k + "- \n" for k in range(2_000)) + "  " * 2_000 + "- x\n",
    "flow.yaml": "[" * 10_000 + "]" * 10_000,
    "infinity.json": '[{"morph": "widen", "layer": "conv2", "width": Infinity}]',
    "huge.json": '[{"morph": "widen", "layer": "conv2", "width": 1e400}]',
    "nan.json": '[{"morph": "deepen", "layer": "conv2", "seed": NaN}]',
    "many.json": "[" + ",".join(['{"morph": "kernel", "layer": "conv1", "size": 5}'] * 5000) + "]",
    "big.json": '[{"morph": "deepen", "layer": "conv2"}' + " " * (2 * 2**20) + "]",
}


@pytest.mark.parametrize("name", sorted(_RECIPES))
def test_hostile_recipes_are_one_line(name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / name
    recipe.write_text(_RECIPES[name])
    result = run_main(["apply", MODELS / "cifar10_quick.onnx", "--recipe", recipe, "-o", tmp_path / "c.onnx"], capfd)
    line = assert_refused(result, 2)
    assert len(line) < 700
    assert not (tmp_path / "c.onnx").exists()


# --------------------------------------------------------------------------- npz and files


def _npz_bomb(path: Path, name: str = "input", shape: tuple[int, ...] = (2_000_000_000, 784)) -> None:
    """An .npz whose member declares a huge array but holds a few bytes (np.load would allocate it)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{name}.npy", buffer.getvalue() + b"\0" * 1024)


def test_an_npz_bomb_is_refused_before_decompressing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _npz_bomb(tmp_path / "bomb.npz")
    model = MODELS / "mlp_relu.onnx"
    assert_refused(run_main(["verify", model, model, "--inputs", tmp_path / "bomb.npz"], capfd), 2,
                   limits.INPUT_BYTES.variable)
    # names are checked before sizes: a wrong name says so, whatever its size
    _npz_bomb(tmp_path / "named.npz", name="other")
    assert_refused(run_main(["verify", model, model, "--inputs", tmp_path / "named.npz"], capfd), 2, "other")


def test_a_huge_junk_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    with open(junk, "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(int(2.5 * 2**30))
    # under a 1 GiB address-space limit, reading the file whole would be "out of memory"
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    for command in (["inspect", junk], ["verify", junk, junk],
                    ["deepen", junk, "--layer", "x", "-o", tmp_path / "c.onnx"]):
        result = run_cli(command, cwd=tmp_path, timeout=60, preexec_fn=cap)
        line = assert_refused(result, 2, "not an ONNX model")
        assert "memory" not in line


def test_a_nul_byte_in_an_external_data_location_is_one_line(tmp_path: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.onnx"
    onnxmorph.save(onnx.load(MODELS / "cifar10_quick.onnx"), path, external_data=True)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "m.onnx.data\x00.evil"
    onnx.save(model, path)
    for args in (["verify", path, path], ["deepen", path, "--layer", "conv2", "-o", tmp_path / "c.onnx"],
                 ["inspect", path]):
        assert_refused(run_main(args, capfd), 2, "NUL")


def test_error_lines_quote_bounded_values(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    long_name = "L" * 20_000
    result = run_main(["deepen", MODELS / "mlp_relu.onnx", "--layer", long_name, "-o", tmp_path / "c.onnx"], capfd)
    line = assert_refused(result, 2)
    assert len(line) <= 700
    result = run_main(["widen", MODELS / "mlp_relu.onnx", "--layer", "fc1", "--width", "9" * 5000,
                       "-o", tmp_path / "c.onnx"], capfd)
    assert len(assert_refused(result, 2)) <= 700


def test_channels_read_inside_an_if_branch_are_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    branches = {name: helper.make_graph([helper.make_node(op, ["h"], [f"{name}_out"])], name, [],
                                        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
                for name, op in (("then", "Relu"), ("else", "Neg"))}
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=branches["then"],
                              else_branch=branches["else"]),
             helper.make_node("Gemm", ["z", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "w2")])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    for args in (["widen", path, "--layer", "fc1", "--width", "8"], ["skip", path, "--from", "x", "--to", "h",
                                                                      "--mode", "concat"]):
        assert_refused(run_main([*args, "-o", tmp_path / "c.onnx"], capfd), 2)
