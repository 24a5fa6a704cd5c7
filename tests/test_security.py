"""Hostile models: escaping external data, sizes that would exhaust memory, strings that must never run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper
from robust_support import (
    PASSES,
    ROOT,
    assert_refused,
    cli_flags,
    first_use,
    listing,
    run_cli,
    run_cli_batch,
    small_mlp,
)

import onnxmorph
from onnxmorph.io import loading as mio

# --------------------------------------------------------------------------- external data


def _with_external_data(folder: Path, location: str) -> Path:
    """small_mlp saved in `folder` with its first weight's external data at `location` (unchecked)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = small_mlp()
    tensor = model.graph.initializer[0]
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _escapes(tmp_path: Path) -> dict[str, Path]:
    """Models whose external data points out of their folder, at a FIFO that blocks whoever opens it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    fifo = outside / "secret.bin"
    os.mkfifo(fifo)
    cases = {
        "dotdot": _with_external_data(tmp_path / "dotdot", "../outside/secret.bin"),
        "deep-dotdot": _with_external_data(tmp_path / "deep", "../" * 40 + "etc/passwd"),
        "absolute": _with_external_data(tmp_path / "absolute", str(fifo)),
        "inner-dotdot": _with_external_data(tmp_path / "inner", "sub/../../outside/secret.bin"),
    }
    link_file = tmp_path / "link-file"
    cases["symlink-file"] = _with_external_data(link_file, "w.bin")
    (link_file / "w.bin").symlink_to(fifo)
    link_dir = tmp_path / "link-dir"
    cases["symlink-folder"] = _with_external_data(link_dir, "data/secret.bin")
    (link_dir / "data").symlink_to(outside, target_is_directory=True)
    return cases


ESCAPES = ["dotdot", "deep-dotdot", "absolute", "inner-dotdot", "symlink-file", "symlink-folder"]


@pytest.mark.parametrize("kind", ESCAPES)
def test_escaping_external_data_is_refused_before_it_is_read(kind: str, tmp_path: Path) -> None:
    evil = _escapes(tmp_path)[kind]
    good = tmp_path / "good.onnx"
    shutil.copyfile(MODELS / "mlp_relu.onnx", good)
    commands = [["inspect", evil], ["verify", good, evil], ["verify", evil, good]]
    for name in PASSES[:1]:
        commands.append([name, evil, "-o", tmp_path / "out.onnx", *cli_flags(first_use(name)[1])])
    before = listing(tmp_path)
    # Reading the FIFO would block until the timeout: a refusal must come first.
    for result in run_cli_batch(commands, cwd=tmp_path, report=tmp_path.parent / f"{kind}.json", timeout=60):
        line = assert_refused(result, 2)
        assert "refused" in line or "only files inside" in line, line
        assert "W1" in line, line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ESCAPES)
def test_the_api_refuses_escaping_external_data(kind: str, tmp_path: Path) -> None:
    evil = _escapes(tmp_path)[kind]
    # Replace the FIFO by a plain file: the API runs in this process and must not block if it failed.
    fifo = tmp_path / "outside" / "secret.bin"
    fifo.unlink()
    fifo.write_bytes(b"\0" * 256)
    with pytest.raises(onnxmorph.UnsafeModelError, match="W1"):
        onnxmorph.load(evil)
    with pytest.raises(onnxmorph.UnsafeModelError):
        onnxmorph.verify(MODELS / "mlp_relu.onnx", evil)


def test_external_data_inside_the_folder_still_loads(tmp_path: Path) -> None:
    model = small_mlp()
    data = model.graph.initializer[0].raw_data
    for location in ("w.bin", "sub/w.bin", "sub/../w.bin"):
        path = _with_external_data(tmp_path, location)
        (tmp_path / "sub").mkdir(exist_ok=True)
        for target in ("w.bin", "sub/w.bin"):
            (tmp_path / target).write_bytes(data)
        loaded = onnxmorph.load(path)
        np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                      numpy_helper.to_array(model.graph.initializer[0]))
    # Resolved against the model's folder, not the current directory.
    result = run_cli(["inspect", path], cwd=ROOT)
    assert result.code == 0, result.err


# --------------------------------------------------------------------------- sizes


def _constant_of_shape_model(*shapes: list[int]) -> onnx.ModelProto:
    """y = x + sum of ConstantOfShape(shape) fills (broadcast); each fill is declared, never stored."""
    nodes, inits = [], []
    previous = "x"
    for k, shape in enumerate(shapes):
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), f"shape{k}"))
        nodes.append(helper.make_node("ConstantOfShape", [f"shape{k}"], [f"fill{k}"], name=f"fill{k}",
                                      value=numpy_helper.from_array(np.array([0.0], np.float32))))
        nodes.append(helper.make_node("Add", [previous, f"fill{k}"], [f"sum{k}"], name=f"add{k}"))
        previous = f"sum{k}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _huge_models(folder: Path) -> dict[str, Path]:
    """Models that declare far more memory than any machine has, in a few bytes each."""
    folder.mkdir(parents=True, exist_ok=True)
    models: dict[str, onnx.ModelProto] = {"constant-of-shape": _constant_of_shape_model([2**40])}
    # An embedded weight whose dims declare 16 TiB but which holds 48 bytes.
    lying = small_mlp()
    del lying.graph.initializer[0].dims[:]
    lying.graph.initializer[0].dims.extend([8, 2**40])
    models["lying-dims"] = lying
    # A weight with dims whose int64 product wraps to 0, and no data at all.
    wrapping = small_mlp()
    tensor = wrapping.graph.initializer[0]
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend([2**32, 2**32])
    models["wrapping-dims"] = wrapping
    # An input of 2**40 x 8 floats that verification would have to fill.
    huge_input = small_mlp()
    huge_input.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    models["huge-input"] = huge_input
    paths = {}
    for label, model in models.items():
        paths[label] = folder / f"{label}.onnx"
        paths[label].write_bytes(model.SerializeToString())
    # External data of 1 TiB (a sparse file: no disk used) matching the declared dims exactly.
    sparse = small_mlp()
    tensor = sparse.graph.initializer[0]
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend([8, 2**37])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="huge.bin")
    tensor.external_data.add(key="length", value=str(2**40))
    with open(folder / "huge.bin", "wb") as f:
        f.truncate(2**40)
    paths["sparse-external"] = folder / "sparse-external.onnx"
    paths["sparse-external"].write_bytes(sparse.SerializeToString())
    return paths


HUGE = ["constant-of-shape", "lying-dims", "wrapping-dims", "huge-input", "sparse-external"]


@pytest.mark.parametrize("kind", HUGE)
def test_a_model_declaring_too_much_memory_is_refused_not_allocated(kind: str, tmp_path: Path) -> None:
    path = _huge_models(tmp_path / "models")[kind]
    good = tmp_path / "good.onnx"
    onnx.save(small_mlp(), good)
    before = listing(tmp_path / "models")
    # Each run answers with a refusal, not with an attempt (which would end in "out of memory").
    checks = [["verify", path, path]] + ([["verify", good, path]] if kind != "huge-input" else [])
    if kind != "huge-input":  # inspecting that one is fine: nothing is allocated for an input
        checks.append(["inspect", path])
    for name in PASSES[:1]:
        checks.append([name, path, "-o", tmp_path / "out.onnx", *cli_flags(first_use(name)[1])])
    for result in run_cli_batch(checks, cwd=tmp_path, report=tmp_path.parent / f"{kind}.json", timeout=60):
        assert_refused(result, 2)
        assert "out of memory" not in result.err
    assert listing(tmp_path / "models") == before
    assert not (tmp_path / "out.onnx").exists()


def test_a_file_larger_than_memory_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "sparse.onnx"
    with open(path, "wb") as f:
        f.truncate(2**40)
    line = assert_refused(run_cli(["inspect", path], cwd=tmp_path, timeout=60), 2)
    assert "more than this machine can hold" in line


def test_a_huge_shape_option_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    shutil.copyfile(MODELS / "mlp_relu.onnx", model)
    line = assert_refused(run_cli(["verify", model, model, "--shape", "input:4000000000x784"], cwd=tmp_path), 2)
    assert "refused" in line


def test_fills_are_budgeted_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each fill alone is under the limit; together they are over it.
    monkeypatch.setenv("ONNXMORPH_MAX_MODEL_BYTES", str(2**20))
    model = _constant_of_shape_model([200_000], [200_000])
    with pytest.raises(onnxmorph.UnsafeModelError, match="refused"):
        mio.normalize(model)
    with pytest.raises(onnxmorph.UnsafeModelError, match="refused"):
        mio.check_declared_sizes(model)
    single = mio.normalize(_constant_of_shape_model([200_000]))
    assert [t.name for t in single.graph.initializer] == ["fill0"]


def test_a_lying_tensor_is_refused_by_the_api(tmp_path: Path) -> None:
    paths = _huge_models(tmp_path)
    for kind in HUGE:
        with pytest.raises(onnxmorph.InvalidModelError) as caught:
            onnxmorph.load(paths[kind]) if kind != "huge-input" else onnxmorph.verify(paths[kind], paths[kind])
        assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- nothing runs


PAYLOAD = "__import__('os').system('touch PWNED') or exec('open(\"PWNED\", \"w\")')"


def _poisoned(folder: Path) -> Path:
    """A valid model whose every free-text field holds Python code that would leave a file if run."""
    model = small_mlp()
    model.doc_string = PAYLOAD
    model.producer_name = PAYLOAD
    model.graph.doc_string = PAYLOAD
    model.graph.node[0].doc_string = PAYLOAD
    history = [{"tool": PAYLOAD, "steps": [{"pass": PAYLOAD, "params": {"layer": PAYLOAD}}], "verification": None}]
    helper.set_model_props(model, {"onnxmorph.history": json.dumps(history), "note": PAYLOAD,
                                   "onnxmorph.source_sha256": PAYLOAD})
    path = folder / "poisoned.onnx"
    onnx.save(model, path)
    return path


def test_strings_in_a_model_are_never_evaluated(tmp_path: Path) -> None:
    path = _poisoned(tmp_path)
    runs = [["inspect", path], ["inspect", path, "--json"], ["verify", path, path, "--trials", "1"]]
    for name in PASSES:
        _, step = first_use(name)
        layer = {p: "fc2" for p in ("layer",) if p in step.config}
        runs.append([name, path, "-o", "out.onnx", "--trials", "1", *cli_flags(step, **layer)])
    results = run_cli_batch(runs, cwd=tmp_path, report=tmp_path.parent / "poisoned.json")
    assert [r.code for r in results[:3]] == [0, 0, 0], [r.err for r in results]
    assert all("internal error" not in r.err for r in results)
    shown = json.loads(results[1].out)
    assert shown["history"][0]["tool"] == PAYLOAD  # shown as text, nothing more
    assert not (tmp_path / "PWNED").exists()


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch PWNED",))


def test_a_pickle_in_an_inputs_file_is_refused_unread(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    shutil.copyfile(MODELS / "mlp_relu.onnx", model)
    np.savez(tmp_path / "evil.npz", input=np.array([_Exploit()], dtype=object))
    line = assert_refused(run_cli(["verify", model, model, "--inputs", "evil.npz"], cwd=tmp_path), 2)
    assert "evil.npz" in line
    assert not (tmp_path / "PWNED").exists()


def test_the_package_has_no_way_to_run_model_content() -> None:
    # No eval/exec of strings, no unpickling, no unsafe YAML anywhere in the package or the passes.
    pattern = re.compile(
        r"(?<![\w.])eval\(|(?<![\w.])exec\(|\bpickle\b|allow_pickle\s*=\s*True|yaml\.load\(|\bmarshal\b"
    )
    offenders = []
    for folder in (ROOT / "onnxmorph", ROOT / "passes"):
        for source in folder.rglob("*.py"):
            for number, text in enumerate(source.read_text().splitlines(), 1):
                if pattern.search(text):
                    offenders.append(f"{source.relative_to(ROOT)}:{number}: {text.strip()}")
    assert offenders == []
