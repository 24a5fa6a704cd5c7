"""Smoke test of benchmarks/grow_hypercloning.py (its --quick run), so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "grow_hypercloning.py"


def test_a_quick_run_grows_both_ways_and_both_children_are_the_parent(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "-o", str(out), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    results = json.loads(out.read_text())
    model, r = results["model"], results["result"]
    assert results["quick"] and model["n_embd"] == 64
    assert "grow_no_verify" not in r  # a full run only
    for key in ("grow", "hypercloning"):
        assert r[key]["returncode"] == 0 and r[key]["seconds"] > 0 and r[key]["peak_rss_bytes"] > 0, r[key]
    # both children are the 2x model: 4x the parameters of the blocks, twice the embeddings
    assert 3.0 < r["hypercloning"]["parameters"] / model["parameters"] < 4.0
    assert 0.8 < r["grow"]["child_bytes"] / r["hypercloning"]["child_bytes"] < 1.25
    assert r["hypercloning"]["max_abs_error"] < 1e-4
    assert r["hypercloning"]["verify_against_parent"]["returncode"] == 0  # grow verified its own before writing
    assert r["grow"]["time_vs_hypercloning"] > 0 and r["grow"]["memory_vs_hypercloning"] > 0
    assert not list((tmp_path / "w").iterdir())  # the models are deleted
