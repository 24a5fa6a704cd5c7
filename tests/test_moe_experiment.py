"""The MoE experiment's --quick run: upcycled children start at the parent's loss; FLOPs are counted both ways."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from onnxmorph.experiments import moegrowth  # noqa: E402
from onnxmorph.experiments.moegrowth_report import equal_compute_loss  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("moegrowth")
    start = time.perf_counter()
    assert moegrowth.main(["--quick", "--out", str(out)]) == 0
    elapsed = time.perf_counter() - start
    return out, json.loads((out / "moegrowth-quick.json").read_text()), elapsed


def test_quick_run_writes_table_json_and_plot(quick_run) -> None:
    out, results, elapsed = quick_run
    assert elapsed < 120, f"--quick took {elapsed:.0f} s"
    png = (out / "moegrowth-quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "moegrowth-quick.md").read_text()
    for arm in moegrowth.QUICK.arms:
        assert f"| {arm}: " in table
    assert "| dense parent, trained on |" in table and "equal compute with top-2" in table


def test_every_upcycled_child_starts_at_its_parents_loss_and_trains_its_routers(quick_run) -> None:
    _, results, _ = quick_run
    (seed,) = results["seeds"]
    assert [a["arm"] for a in seed["arms"]] == list(moegrowth.QUICK.arms)
    for arm in seed["arms"]:
        assert abs(arm["curve"]["loss"][0] - arm["parent_loss"]) < 1e-5, arm["arm"]
        assert arm["max_logit_gap"] < 1e-4
        assert arm["curve"]["step"][0] == seed["at"] and arm["curve"]["step"][-1] == results["config"]["steps"]
        assert arm["curve"]["loss"][-1] < arm["curve"]["loss"][0]
        assert len(arm["load"]) == results["config"]["layers"] * (arm["params"].get("shards", 1))
        assert all(abs(sum(share) - 1) < 1e-3 for share in arm["load"])
    assert max(a["router_moved"] for a in seed["arms"]) > 0  # the routers get gradients


def test_flops_are_counted_active_and_dense(quick_run) -> None:
    _, results, _ = quick_run
    (seed,) = results["seeds"]
    parent = seed["parent"]["flops_per_step"]
    ffn = results["ffn_flops_per_step"]
    arms = {a["arm"]: a for a in seed["arms"]}
    # top-2 of copies: the FFN twice per token (and the router); fine8's 2 x top-2 half-size experts the same
    assert arms["moe4"]["active_flops_per_step"] > parent + ffn
    assert arms["fine8"]["active_flops_per_step"] == pytest.approx(arms["moe4"]["active_flops_per_step"], rel=0.02)
    assert arms["moe4"]["dense_flops_per_step"] >= parent + 3 * ffn
    assert arms["moe8"]["dense_flops_per_step"] >= parent + 7 * ffn
    # fine8's dense graph: 8 half-size experts, 4 FFNs' worth
    assert arms["fine8"]["dense_flops_per_step"] >= parent + 3 * ffn
    ratios = [d["ratio"] for d in seed["dense"]]
    assert ratios[0] == 1.0 and ratios[-1] >= arms["moe8"]["active_flops_per_step"] / parent


def test_equal_compute_reads_the_dense_run_that_reaches_it() -> None:
    dense = [{"ratio": 1.0, "curve": {"flops": [0, 10, 20], "loss": [3.0, 2.0, 1.5]}},
             {"ratio": 1.5, "curve": {"flops": [0, 10, 20, 30], "loss": [3.0, 2.5, 2.0, 1.0]}}]
    assert equal_compute_loss(dense, 15) == (1.75, 1.0)
    assert equal_compute_loss(dense, 25) == (1.5, 1.5)
    assert equal_compute_loss(dense, 40) == (1.0, 1.5)  # past the longest run: its last point
