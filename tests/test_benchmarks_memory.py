"""Smoke tests of benchmarks/memory.py and its model writer (benchmarks/llama.py), so that they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "memory.py"
sys.path.insert(0, str(SCRIPT.parent))
import llama  # noqa: E402

sys.path.remove(str(SCRIPT.parent))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_llama_writer_makes_the_same_model_in_one_file_and_with_external_data(dtype: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    shape = llama.PRESETS["tiny"]
    (tmp_path / "one").mkdir()
    one = llama.write_llama(tmp_path / "one" / "m.onnx", shape, dtype=dtype, one_file=True)
    ext = llama.write_llama(tmp_path / "ext.onnx", shape, dtype=dtype)
    assert one["one_file"] and not (tmp_path / "one" / "m.onnx.data").exists()
    onnx.checker.check_model(one["path"])
    onnx.checker.check_model(ext["path"])
    model = onnx.load(one["path"])
    counted = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name.endswith(".weight"))
    assert counted == shape.parameters() == one["parameters"]
    ids = {"input_ids": np.random.default_rng(0).integers(0, shape.vocab, (2, 7))}
    outputs = [ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"]).run(None, ids)[0]
               for info in (one, ext)]
    assert outputs[0].shape == (2, 7, shape.vocab) and np.isfinite(outputs[0]).all()
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_quick_regions_section_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "regions", "--work", str(tmp_path),
                    "--out", str(out)], check=True, capture_output=True, timeout=300, cwd=ROOT, env=env)
    parent, grown = json.loads(out.read_text())["sections"]["regions"]
    assert parent["parameters"] > 0
    assert grown["returncode"] == 0 and grown["verified"] and grown["method"] == "regions", grown
    assert grown["regions"] == 8 and grown["identical_weights"] > 0 and grown["peak_rss_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # the models are deleted
