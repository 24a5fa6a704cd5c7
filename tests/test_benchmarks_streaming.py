"""Smoke tests of benchmarks/streaming.py (its model writer and a --quick section), so that it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "streaming.py"


def test_the_chain_writer_makes_a_valid_model_with_aligned_external_data(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import streaming as bench_streaming
    finally:
        sys.path.remove(str(SCRIPT.parent))
    info = bench_streaming.write_chain(tmp_path / "chain.onnx", width=16, depth=3)
    onnx.checker.check_model(str(tmp_path / "chain.onnx"))
    header = onnx.load(str(tmp_path / "chain.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in header.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == 4 * 2 + 2 and all(o % 65536 == 0 for o in offsets)
    assert info["bytes"] > sum(int(np.prod(t.dims)) * 4 for t in header.graph.initializer)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "chain.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.ones((2, 3, 4, 4), np.float32)})
    assert out.shape == (2, 10) and np.isfinite(out).all()


def test_a_quick_growth_section_runs_and_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", "growth", "--work", str(tmp_path / "work"),
                    "--out", str(out)], check=True, capture_output=True, timeout=300, cwd=ROOT)
    floor, grow = json.loads(out.read_text())["sections"]["growth"]
    assert floor["returncode"] == 0 and grow["returncode"] == 0, grow
    assert 3.5 < grow["child_vs_parent"] < 4.1
    assert grow["time_ratio"] > 0 and grow["peak_rss_bytes"] > 0
    assert not (tmp_path / "work").exists()  # the models are deleted
