"""The digits experiment's --quick run: every morph is made, starts at the parent's accuracy, and is reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxmorph  # noqa: E402  (after the torch check)
from onnxmorph import train as ot  # noqa: E402  (after the torch check)
from onnxmorph.experiments import digits  # noqa: E402  (after the torch check)
from onnxmorph.graph.build import P_ACTIVATION_SUFFIX  # noqa: E402  (after the torch check)

# One thread: these tensors are too small for intra-op threads, and on a busy 2-core machine a
# second thread made a step up to 100x slower (measured: 60 steps of a tiny MLP, 8 s against 0.07 s).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("digits")
    start = time.perf_counter()
    assert digits.main(["--quick", "--out", str(out)]) == 0
    elapsed = time.perf_counter() - start
    return out, json.loads((out / "digits-quick.json").read_text()), elapsed


def test_quick_run_writes_table_json_and_plot(quick_run) -> None:
    out, results, elapsed = quick_run
    assert elapsed < 120, f"--quick took {elapsed:.0f} s"
    png = (out / "digits-quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "digits-quick.md").read_text()
    for child in digits.CNN_CHILDREN + digits.MLP_CHILDREN:
        assert f"{child.label} (morph)" in table and f"{child.label} (scratch)" in table
    assert "not run" not in table
    assert results["config"]["seeds"] == list(digits.QUICK.seeds)


def test_every_morphed_child_starts_at_the_parents_accuracy(quick_run) -> None:
    _, results, _ = quick_run
    morph_rows = [row for family in results["families"] for row in family["rows"] if row["model"].endswith("(morph)")]
    assert len(morph_rows) == len(digits.CNN_CHILDREN) + len(digits.MLP_CHILDREN)
    for row in morph_rows:
        assert row["step0_equals_parent"], row["model"]
        assert row["max_logit_gap_at_step_0"] < 1e-4, row["model"]
    for family in results["families"]:
        parents = {r["seed"]: r["curve"]["accuracy"][-1] for r in family["runs"]["parent"]}
        for label, entries in family["runs"].items():
            for entry in entries:
                curve = entry["curve"]
                assert curve["step"][0] == 0 and len(curve["step"]) == len(curve["accuracy"])
                if label.endswith("(morph)"):
                    assert curve["accuracy"][0] == parents[entry["seed"]]
                    assert entry["steps_to_parent_accuracy"] == 0


def test_p_activations_start_linear_and_move_while_fine_tuning(quick_run) -> None:
    _, results, _ = quick_run
    deep = [entries for family in results["families"] for label, entries in family["runs"].items()
            if label.startswith("deeper") and label.endswith("(morph)")]
    assert len(deep) == 5
    for entries in deep:
        for entry in entries:
            a = entry["curve"]["a"]
            assert a[0] == 1.0 and a[-1] != 1.0


def test_annealed_p_activations_end_at_zero(quick_run) -> None:
    _, results, _ = quick_run
    annealed = [(label, entries) for family in results["families"] for label, entries in family["runs"].items()
                if "a annealed" in label]
    assert len(annealed) == 4  # CNN and MLP, morph and scratch
    for label, entries in annealed:
        for entry in entries:
            a = entry["curve"]["a"]
            assert a[0] == (1.0 if label.endswith("(morph)") else 0.0)
            assert a[-1] == 0.0, label


def test_scratch_initialisation_keeps_the_graph_and_zeroes_a() -> None:
    parent = digits.parent_mlp(0)
    child = onnxmorph.deepen(parent, layer="fc1", activation="tanh", method="netmorph", seed=0)
    fresh = digits.initialise(child, 5, gain=1.0)
    assert [n.op_type for n in fresh.graph.node] == [n.op_type for n in child.graph.node]
    net = ot.to_torch(fresh)
    alphas = ot.activation_parameters(net)
    assert alphas and all(name.endswith(P_ACTIVATION_SUFFIX) for name in alphas)
    assert all(torch.all(a == 0) for a in alphas.values())
    # The 1 of the P-tanh's 1 - a is a constant of the formula: a fresh start keeps it (with 0 the
    # layer's output would be -a * tanh(x) + a * x, nothing at all while a is held at 0).
    ones = [p for name, p in net.onnx_parameters().items() if p.numel() == 1 and name not in alphas]
    assert ones and all(float(p) == 1.0 for p in ones)
    weights = {n: p.detach().numpy() for n, p in net.onnx_parameters().items() if p.dim() == 2}
    assert all(np.abs(w).sum() > 0 for w in weights.values())
    again = ot.to_torch(digits.initialise(child, 5, gain=1.0)).onnx_parameters()
    assert all(np.array_equal(again[n].detach().numpy(), w) for n, w in weights.items())
