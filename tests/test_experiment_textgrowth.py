"""The growth experiment's --quick run: grown children start at the parent's loss, scratch has their architecture."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import onnxmorph  # noqa: E402
from onnxmorph.experiments import lm, textgrowth  # noqa: E402
from onnxmorph.experiments.textgrowth_report import crossing, summarise  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("textgrowth")
    start = time.perf_counter()
    assert textgrowth.main(["--quick", "--out", str(out)]) == 0
    elapsed = time.perf_counter() - start
    return out, json.loads((out / "textgrowth-quick.json").read_text()), elapsed


def test_quick_run_writes_table_json_and_plot(quick_run) -> None:
    out, results, elapsed = quick_run
    assert elapsed < 120, f"--quick took {elapsed:.0f} s"
    png = (out / "textgrowth-quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "textgrowth-quick.md").read_text()
    ran = [arm for arm in textgrowth.QUICK.arms if arm not in results["arms_not_run"]]
    # This onnxmorph has the block morph and widens a transformer's residual stream by tiling.
    assert "block" in onnxmorph.REGISTRY
    assert ran == ["blocks", "width", "both"], results["arms_not_run"]
    for arm in ran:
        assert f"| {arm}, from scratch |" in table and f"| {arm}, grown at step 12 |" in table
    for arm, reason in results["arms_not_run"].items():
        assert f"{arm}: not run ({reason})" in table and "\n" not in reason
    corpus = results["corpus"]
    assert len(corpus["sha256"]) == 64 and corpus["train_bytes"] > 1_000_000
    assert not set(corpus["train_files"]) & set(corpus["validation_files"])


def test_every_grown_child_starts_at_its_parents_loss(quick_run) -> None:
    _, results, _ = quick_run
    children = [c for g in results["grown"] for c in g["children"]]
    assert children
    for child in children:
        assert abs(child["curve"]["loss"][0] - child["parent_loss"]) < 1e-5, child["arm"]
        assert abs(child["onnx_parent_loss"] - child["parent_loss"]) < 1e-5
        assert child["max_logit_gap"] < 1e-4
        assert child["curve"]["step"][0] == child["at"] and child["curve"]["step"][-1] == results["config"]["steps"]
        assert child["curve"]["loss"][-1] < child["curve"]["loss"][0]  # it trained on


def test_scratch_is_the_grown_childs_architecture(quick_run) -> None:
    _, results, _ = quick_run
    rows = {row["model"]: row for row in results["rows"]}
    for arm in {s["arm"] for s in results["scratch"]}:
        scratch, grown = rows[f"{arm}, from scratch"], rows[f"{arm}, grown at step 12"]
        assert scratch["parameters"] == grown["parameters"]
        assert scratch["flops_per_step"] == grown["flops_per_step"]
        assert grown["flops_per_step"] > rows["parent, no growth"]["flops_per_step"]


def test_crossing_interpolates_and_says_never() -> None:
    assert crossing([0, 10, 20], [3.0, 2.0, 1.0], 1.5) == 15.0
    assert crossing([5, 10], [1.0, 0.5], 2.0) == 5.0
    assert crossing([0, 10], [3.0, 2.0], 1.0) is None


def test_compute_saved_is_counted_over_parent_and_child() -> None:
    # Parent 1 FLOP/step, child and scratch 2; grown at 40, reaches scratch's final loss (1.0) at step 60.
    curve = {"step": [40, 50, 60, 100], "loss": [3.0, 2.0, 1.0, 0.8]}
    results = {
        "config": {"steps": 100}, "growth_steps": [40],
        "grown": [{"seed": 0, "parent": {"curve": {"step": [0, 100], "loss": [5.0, 1.2]}, "flops_per_step": 1,
                                         "parameters": 10},
                   "children": [{"arm": "blocks", "at": 40, "curve": curve, "parent_loss": 3.0,
                                 "onnx_parent_loss": 3.0, "max_logit_gap": 0.0, "flops_per_step": 2,
                                 "parameters": 20}]}],
        "scratch": [{"seed": 0, "arm": "blocks", "curve": {"step": [0, 50, 100], "loss": [5.0, 1.4, 1.0]},
                     "flops_per_step": 2, "parameters": 20}],
    }
    row = next(r for r in summarise(results) if r["model"] == "blocks, grown at step 40")
    assert row["reached"] == 1 and row["steps_to_scratch_loss"]["mean"] == 60.0
    assert row["steps_saved"]["mean"] == pytest.approx(0.4)
    assert row["flops_saved"]["mean"] == pytest.approx(1 - (40 * 1 + 20 * 2) / (100 * 2))
    # The grown run spent 40 + 120 = 160 FLOPs: scratch's loss after 80 steps is 1.16.
    assert row["compute_share"]["mean"] == pytest.approx(0.8)
    assert row["minus_scratch_equal_compute"]["mean"] == pytest.approx(0.8 - 1.16)
    assert row["minus_scratch_equal_steps"]["mean"] == pytest.approx(-0.2)
    assert row["minus_parent"]["mean"] == pytest.approx(0.8 - 1.2)


def test_corpus_windows_are_next_byte_pairs() -> None:
    text = lm.corpus()
    x, y = lm.windows(text["train"], 16, count=5)
    assert x.shape == y.shape == (5, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert bytes(x[0].astype("uint8")) == bytes(text["train"][:16])
