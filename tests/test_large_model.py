"""Big models: a VGG-like model with external data loads, morphs, verifies by path and saves, in bounded memory.

CI runs the whole path on a 40 MB model with the external-data threshold lowered to 4 MB;
`ONNXMORPH_LARGE=1` adds the same run on a model over 2 GiB (about 3 minutes, 12 GB of RAM).
"""

from __future__ import annotations

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
from robust_support import PASSES, ROOT, applicable, cli_flags

import onnxmorph
from onnxmorph.contract.registry import REGISTRY
from onnxmorph.io import saving

LARGE = os.environ.get("ONNXMORPH_LARGE") == "1"

# Hidden width of the fully connected layers: 16384 makes fc2 and fc3 1 GiB each, the model 2.13 GiB
# (protobuf cannot hold a single tensor of 2 GiB even in memory, so no layer is that big).
LARGE_HIDDEN = 16384
SMALL_HIDDEN = 2000
SMALL_THRESHOLD = 4 * 2**20


def build_vgg_like(hidden: int, seed: int = 0) -> onnx.ModelProto:
    """conv(3->16) relu pool conv(16->32) relu pool flatten, fc1(2048->H) fc2(H->H) fc3(H->H) with relu, fc4(H->10)."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        array = rng.standard_normal(shape, dtype=np.float32)
        array *= np.float32(np.sqrt(2.0 / fan_in))
        inits.append(numpy_helper.from_array(array, name))
        return name

    def bias(name: str, size: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(size) * 0.01).astype(np.float32), name))
        return name

    nodes = [
        helper.make_node("Conv", ["input", weight("conv1.w", (16, 3, 3, 3), 27), bias("conv1.b", 16)], ["c1"],
                         name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", weight("conv2.w", (32, 16, 3, 3), 144), bias("conv2.b", 32)], ["c2"],
                         name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], name="flatten"),
    ]
    previous, fan_in = "f", 32 * 8 * 8
    for k, width in ((1, hidden), (2, hidden), (3, hidden), (4, 10)):
        w = weight(f"fc{k}.w", (width, fan_in), fan_in)
        out = "logits" if k == 4 else f"h{k}"
        nodes.append(helper.make_node("Gemm", [previous, w, bias(f"fc{k}.b", width)], [out], name=f"fc{k}", transB=1))
        previous, fan_in = out, width
        if k < 4:
            nodes.append(helper.make_node("Relu", [out], [f"hr{k}"], name=f"fc_relu{k}"))
            previous = f"hr{k}"
    graph = helper.make_graph(
        nodes, "vgg_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                             producer_name="onnxmorph-tests")


# Runs in a fresh interpreter: build the model and write it with external data.
_BUILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
import onnx
import pytest
from test_large_model import build_vgg_like
model = build_vgg_like(int(sys.argv[1]))
onnx.save_model(model, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
                location="parent.onnx.data", size_threshold=1024)
"""

# Runs one CLI command in a fresh interpreter and records its peak memory and time.
_MEASURE = r"""
import json, os, resource, sys, time
from onnxmorph import cli
from onnxmorph.io import saving
threshold = os.environ.get("ONNXMORPH_TEST_THRESHOLD")
if threshold:
    saving.EXTERNAL_DATA_THRESHOLD = int(threshold)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
code = cli.main(sys.argv[2:])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "seconds": seconds, "peak": peak, "baseline": baseline}, f)
"""


def _env(threshold: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if threshold:
        env["ONNXMORPH_TEST_THRESHOLD"] = str(threshold)
    return env


def _measure(args: list[str], folder: Path, threshold: int | None, timeout: float) -> dict[str, Any]:
    figures = folder / "figures.json"
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(figures), *args], cwd=folder, env=_env(threshold),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(figures.read_text())
    figures.unlink()
    assert result["code"] == 0, proc.stderr
    return result


def _morph_step() -> tuple[str, list[str]]:
    """A registered pass and its flags for a conv layer of the VGG-like model (same at every size)."""
    model = build_vgg_like(64)
    for name in ("widen", "kernel", "deepen", *PASSES):
        if name not in REGISTRY:
            continue
        for step in applicable(name, model):
            if any(v in ("conv1", "conv2", "c1", "c2") for v in step.config.values()):
                return name, cli_flags(step)
    raise AssertionError(f"no registered pass ({', '.join(PASSES)}) applies to a conv layer of the model")


def run_large_roundtrip(folder: Path, hidden: int, threshold: int | None, timeout: float) -> dict[str, Any]:
    """Build, morph (CLI, verified), verify by path (CLI) and reload; returns the figures."""
    parent = folder / "parent.onnx"
    subprocess.run([sys.executable, "-c", _BUILD, str(hidden), str(parent), str(Path(__file__).parent)],
                   env=_env(None), check=True, timeout=timeout)
    size = parent.stat().st_size + (folder / "parent.onnx.data").stat().st_size
    name, flags = _morph_step()
    morph = _measure([name, "parent.onnx", "-o", "child.onnx", "--trials", "1", "-q", *flags],
                     folder, threshold, timeout)
    child_size = sum(p.stat().st_size for p in folder.glob("child.onnx*"))
    verify = _measure(["verify", "parent.onnx", "child.onnx", "--trials", "1", "-q"], folder, threshold, timeout)
    return {"pass": name, "model_bytes": size, "child_bytes": child_size, "morph": morph, "verify": verify}


def _check(figures: dict[str, Any], folder: Path, multiple: float) -> None:
    # The child was written with external data beside it, and nothing else was left behind.
    assert sorted(p.name for p in folder.iterdir()) == [
        "child.onnx", "child.onnx.data", "parent.onnx", "parent.onnx.data"]
    assert (folder / "child.onnx").stat().st_size < 2**20
    assert figures["child_bytes"] > figures["model_bytes"]
    for phase in ("morph", "verify"):
        extra = figures[phase]["peak"] - figures[phase]["baseline"]
        assert extra <= multiple * figures["model_bytes"], (phase, extra / figures["model_bytes"], figures)


def test_a_model_with_external_data_morphs_verifies_and_saves_in_bounded_memory(tmp_path: Path) -> None:
    figures = run_large_roundtrip(tmp_path, SMALL_HIDDEN, SMALL_THRESHOLD, timeout=300)
    assert figures["model_bytes"] > 10 * SMALL_THRESHOLD
    _check(figures, tmp_path, multiple=8)
    child = onnxmorph.load(tmp_path / "child.onnx")
    assert onnxmorph.history(child)[-1]["steps"][0]["pass"] == figures["pass"]
    # The fully connected weights are not touched by a conv morph: the parent's bytes, copied file to file.
    from test_streaming import _spans

    parent_spans, child_spans = _spans(tmp_path / "parent.onnx"), _spans(tmp_path / "child.onnx")
    for name in ("fc2.w", "fc3.w", "fc4.w"):
        assert child_spans[name][0] == parent_spans[name][0], name
    assert onnxmorph.verify(tmp_path / "parent.onnx", tmp_path / "child.onnx", trials=1)


if LARGE:

    def test_a_model_over_2_gib_morphs_verifies_and_saves(tmp_path: Path) -> None:
        figures = run_large_roundtrip(tmp_path, LARGE_HIDDEN, None, timeout=3600)
        assert figures["model_bytes"] > 2**31
        print(json.dumps(figures, indent=2))
        _check(figures, tmp_path, multiple=6)


def test_external_data_goes_beside_the_model_whatever_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # onnx's converter checks its data location against the current directory: saving into the
    # current directory (or verifying a large model from a folder holding a parent.onnx.data) failed.
    model = build_vgg_like(256)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parent.onnx.data").write_bytes(b"someone else's data")
    onnxmorph.save(model, "child.onnx", external_data=True)
    onnxmorph.save(model, "child.onnx", external_data=True)  # over an earlier output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.onnx", "child.onnx.data", "parent.onnx.data"]
    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD", 2**20)
    assert onnxmorph.verify(model, onnxmorph.load("child.onnx"), trials=1)
    assert (tmp_path / "parent.onnx.data").read_bytes() == b"someone else's data"
