"""Models larger than memory: a morph of a model with external data streams what it does not touch.

The child's untouched weights are the parent's bytes, copied file to file at aligned offsets; a
one-layer morph's memory does not grow with the model; a morph that recomputes every weight holds
a few of them at a time; the parent is never written; a failed verification replaces nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_large_model import build_vgg_like

import onnxmorph
from onnxmorph.errors import VerificationFailed
from onnxmorph.io import streaming
from onnxmorph.pipeline.recipe import read_recipe
from onnxmorph.pipeline.run import VerifyOptions, run_passes
from onnxmorph.verification.verifier import Verifier

ROOT = Path(__file__).resolve().parent.parent

# Runs one CLI command in a fresh interpreter; prints its peak memory above the interpreter's own.
_MEASURE = r"""
import json, sys


def high_water():
    # VmHWM belongs to this process's own memory; ru_maxrss would carry the forking test runner's.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


from onnxmorph import cli
from onnxmorph.analysis import channels  # noqa: F401  (code, not data: the channel rules load with it)
from onnxmorph.pipeline import run  # noqa: F401
baseline = high_water()
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "extra": high_water() - baseline}))
"""


def _save_external(model: onnx.ModelProto, path: Path) -> int:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size


def _measure(folder: Path, *args: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["code"] == 0, proc.stderr
    return int(figures["extra"])


def _spans(path: Path) -> dict[str, tuple[bytes, int]]:
    """{weight name: (its bytes, its offset)} of a model kept with external data (read here, in the test)."""
    header = onnx.load(str(path), load_external_data=False)
    out = {}
    for tensor in header.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(path.parent / info["location"], "rb") as f:
            f.seek(offset)
            out[tensor.name] = (f.read(length), offset)
    return out


def _chain(width: int, depth: int, seed: int = 0) -> onnx.ModelProto:
    """A Gemm-ReLU chain of `depth` square layers: every weight the same size, none dominating."""
    rng = np.random.default_rng(seed)
    nodes, inits, previous = [], [], "x"
    for k in range(depth):
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{k}.w"),
                  numpy_helper.from_array((rng.standard_normal(width) * 0.01).astype(np.float32), f"fc{k}.b")]
        nodes.append(helper.make_node("Gemm", [previous, f"fc{k}.w", f"fc{k}.b"], [f"h{k}"], name=f"fc{k}", transB=1))
        nodes.append(helper.make_node("Relu", [f"h{k}"], [f"r{k}"], name=f"relu{k}"))
        previous = f"r{k}"
    nodes[-1] = helper.make_node("Identity", [f"h{depth - 1}"], ["y"], name="out")
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("streaming")
    path = folder / "parent.onnx"
    _save_external(build_vgg_like(2000), path)
    return path


def test_untouched_weights_are_the_parents_bytes_at_aligned_offsets_and_the_child_verifies(parent: Path) -> None:
    before = {p.name: p.read_bytes() for p in parent.parent.glob("parent.onnx*")}
    out = parent.parent / "widened.onnx"
    assert onnxmorph.cli.main(["widen", str(parent), "--layer", "conv2", "--width", "48", "-o", str(out),
                               "--trials", "1", "-q"]) == 0
    parent_spans, child_spans = _spans(parent), _spans(out)
    untouched = [name for name in parent_spans if not name.startswith(("conv2.", "fc1."))]
    assert untouched and len(child_spans) == len(parent_spans)
    for name in untouched:
        assert child_spans[name][0] == parent_spans[name][0], name
    for data, offset in child_spans.values():
        assert offset % (streaming.BIG_ALIGNMENT if len(data) >= streaming.BIG_TENSOR else streaming.PAGE) == 0
    assert child_spans["conv2.w"][0] != parent_spans["conv2.w"][0]
    assert {p.name: p.read_bytes() for p in parent.parent.glob("parent.onnx*")} == before  # the parent as it was
    assert onnxmorph.verify(parent, out, trials=2)
    receipt = onnxmorph.history(onnxmorph.load(out))[-1]
    assert receipt["verification"]["passed"]
    assert receipt["parent_sha256"] == hashlib.sha256(parent.read_bytes()).hexdigest()


def test_a_one_layer_morph_reads_only_the_weights_it_touches(parent: Path, tmp_path: Path) -> None:
    """Memory of a one-conv widen does not grow with the model: a model of 0.3 MB costs the same as 48 MB."""
    small = tmp_path / "small.onnx"
    _save_external(build_vgg_like(64), small)
    size = sum(p.stat().st_size for p in parent.parent.glob("parent.onnx*"))
    args = ["--layer", "conv1", "--width", "24", "--no-verify", "-q"]  # touches conv1 and conv2 only
    extra_small = _measure(tmp_path, "widen", str(small), "-o", str(tmp_path / "a.onnx"), *args)
    extra_big = _measure(tmp_path, "widen", str(parent), "-o", str(tmp_path / "b.onnx"), *args)
    assert size > 40 * 2**20
    assert extra_big - extra_small < 0.1 * size, (extra_small, extra_big, size)


def test_growing_every_layer_holds_a_few_weights_at_a_time(tmp_path: Path) -> None:
    """24 layers widened 2x (a child of 4x the parameters): memory is a few child weights, not the child."""
    depth, width = 24, 384
    path = tmp_path / "chain.onnx"
    _save_external(_chain(width, depth), path)
    recipe = tmp_path / "grow.json"
    recipe.write_text(json.dumps([{"morph": "widen", "layer": f"fc{k}", "width": 2 * width} for k in range(depth - 1)]))
    small = tmp_path / "one.json"
    small.write_text(json.dumps([{"morph": "widen", "layer": "fc0", "width": 2 * width}]))
    extra_one = _measure(tmp_path, "apply", str(path), "--recipe", str(small), "-o", str(tmp_path / "one.onnx"),
                         "--no-verify", "-q")
    extra_all = _measure(tmp_path, "apply", str(path), "--recipe", str(recipe), "-o", str(tmp_path / "all.onnx"),
                         "--no-verify", "-q")
    child_bytes = (tmp_path / "all.onnx.data").stat().st_size
    largest = (2 * width) ** 2 * 4
    assert child_bytes > 3.5 * depth * width * width * 4
    # 23 steps, each recomputing two weights: the growth beyond one step is a few weights, not the child.
    assert child_bytes > 20 * largest
    assert extra_all - extra_one < 8 * largest, (extra_one, extra_all, child_bytes, largest)
    assert onnxmorph.verify(path, tmp_path / "all.onnx", trials=1)


def test_spilled_weights_are_references_and_the_child_saves_and_verifies_in_process(parent: Path,
                                                                                   tmp_path: Path) -> None:
    steps = [{"morph": "widen", "layer": "fc1", "width": 2400}, {"morph": "widen", "layer": "fc2", "width": 2400}]
    passes = read_recipe(steps)
    outcome = run_passes(parent, passes, VerifyOptions(trials=1))
    assert outcome.report and outcome.saved is None
    references = [t.name for t in outcome.child.graph.initializer if streaming.is_reference(t)]
    assert {"fc1.w", "fc2.w", "fc3.w", "conv1.w"} <= set(references)
    out = onnxmorph.save(outcome.child, tmp_path / "child.onnx", external_data=True)
    assert (tmp_path / "child.onnx.data").is_file()
    assert onnxmorph.verify(parent, out, trials=1)
    assert _spans(out)["conv1.w"][0] == _spans(parent)["conv1.w"][0]
    # Small enough for one file: the referenced bytes are framed into it, and it reads back whole.
    inline = onnxmorph.save(outcome.child, tmp_path / "inline.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.onnx", "child.onnx.data", "inline.onnx"]
    model = onnx.load(str(inline))
    onnx.checker.check_model(model)
    assert onnxmorph.verify(parent, model, trials=1)


def test_a_failed_verification_by_path_replaces_nothing(parent: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "child.onnx"
    out.write_bytes(b"an earlier child")
    (tmp_path / "child.onnx.data").write_bytes(b"its weights")
    original = Verifier.check

    def failing(self: Any, child: Any) -> Any:
        report = original(self, child)
        report.problems.append("forced failure")
        return report

    monkeypatch.setattr(Verifier, "check", failing)
    with pytest.raises(VerificationFailed):
        run_passes(parent, read_recipe([{"morph": "widen", "layer": "conv2", "width": 40}]),
                   VerifyOptions(trials=1), output=out)
    assert out.read_bytes() == b"an earlier child"
    assert (tmp_path / "child.onnx.data").read_bytes() == b"its weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.onnx", "child.onnx.data"]


def test_a_weight_read_by_a_pass_is_mapped_not_loaded(parent: Path) -> None:
    model = onnxmorph.load(parent, lazy=True)
    tensor = next(t for t in model.graph.initializer if t.name == "fc2.w")
    array = streaming.map_array(tensor)
    assert isinstance(array, np.memmap) and not array.flags.writeable
    full = onnxmorph.load(parent)
    expected = numpy_helper.to_array(next(t for t in full.graph.initializer if t.name == "fc2.w"))
    np.testing.assert_array_equal(array, expected)


def test_a_model_in_one_file_streams_through_the_cli_too(tmp_path: Path) -> None:
    """The CLI refers to an inline model's weights where they lie and frames the child around their bytes."""
    parent = tmp_path / "parent.onnx"
    onnx.save(build_vgg_like(2000), str(parent))
    size = parent.stat().st_size
    child = tmp_path / "child.onnx"
    extra = _measure(tmp_path, "widen", str(parent), "--layer", "conv1", "--width", "24", "-o", str(child),
                     "--no-verify", "-q")
    # Copies go a bounded chunk at a time (16 MiB, whatever the model's size): the model itself is never held.
    assert extra < 0.25 * size + streaming._READ_CHUNK, (extra, size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.onnx", "parent.onnx"]
    before, after = onnx.load(str(parent)), onnx.load(str(child))
    onnx.checker.check_model(after)
    weights = {t.name: t for t in before.graph.initializer}
    for tensor in after.graph.initializer:
        if not tensor.name.startswith(("conv1.", "conv2.")):
            assert tensor.raw_data == weights[tensor.name].raw_data, tensor.name
    assert [p.key for p in after.metadata_props] == ["onnxmorph.history"]
    # The receipt names the parent file's own digest (computed in chunks beside the morph).
    assert onnxmorph.history(after)[-1]["parent_sha256"] == hashlib.sha256(parent.read_bytes()).hexdigest()
    assert onnxmorph.verify(parent, child, trials=2)
