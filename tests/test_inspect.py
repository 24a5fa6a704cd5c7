"""Tests of `inspect` and of the core CLI (inspect, help, usage errors)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import LIGHT, LIGHT_MODELS, MODELS, REFERENCE_MODELS

import onnxmorph
from onnxmorph.pipeline.inspection import format_inspection


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxmorph", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("stem", LIGHT_MODELS)
def test_inspect_lists_every_conv_and_gemm_of_real_architectures(stem: str) -> None:
    raw = onnx.load(LIGHT / f"{stem}.onnx")
    counts = collections.Counter(n.op_type for n in raw.graph.node)
    info = onnxmorph.inspect(onnxmorph.load(LIGHT / f"{stem}.onnx"))
    ops = collections.Counter(layer["op"] for layer in info["layers"])
    assert ops["Conv"] == counts["Conv"] and ops["Gemm"] == counts["Gemm"]
    assert info["ir_version"] == 3 and info["opsets"] == {"ai.onnx": 9}
    # weights made by ConstantOfShape are constants now, listed with their shapes
    assert all(len(layer["weight_shape"]) in (2, 4) for layer in info["layers"])
    # only the image is a true input (initializers listed as inputs are weights)
    assert len(info["inputs"]) == 1 and info["inputs"][0]["shape"] == [1, 3, 224, 224]
    names = [layer["name"] for layer in info["layers"]]
    assert len(set(names)) == len(names) and all(names)
    for layer in info["layers"]:
        for verdict in layer["morphs"].values():
            assert verdict["applies"] or "\n" not in verdict["reason"]


@pytest.mark.parametrize("stem", REFERENCE_MODELS)
def test_inspect_reference_models(stem: str) -> None:
    model = onnxmorph.load(MODELS / f"{stem}.onnx")
    info = onnxmorph.inspect(model)
    expected = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert [layer["name"] for layer in info["layers"]] == expected
    assert info["history"] == []
    text = format_inspection(info, title=stem)
    assert f"morphable layers ({len(expected)})" in text


def test_cli_inspect_text_and_json() -> None:
    path = str(MODELS / "cifar10_quick.onnx")
    text = _run_cli("inspect", path)
    assert text.returncode == 0, text.stderr
    assert "conv2  Conv  weight 32x32x5x5  output conv2_out" in text.stdout
    data = json.loads(_run_cli("inspect", path, "--json").stdout)
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert data["inputs"] == [{"name": "input", "type": "float", "shape": ["N", 3, 32, 32]}]


@pytest.mark.parametrize("args, message", [
    (["inspect", "missing.onnx"], "no such file"),
    (["verify", "missing.onnx", "missing.onnx"], "no such file"),
    (["inspect"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
