"""The morph search: a small search in local workers and on a local Ray, its files and receipts, resume, bad input."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT


def _extra(module: str) -> ModuleType:
    """An optional extra's module; in CI (CI=true) the test extra installs it, so it must be there."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


torch = _extra("torch")
_extra("sklearn")
_extra("matplotlib")

import onnxmorph  # noqa: E402
from onnxmorph.cli import main  # noqa: E402
from onnxmorph.errors import NotApplicable, UsageError  # noqa: E402
from onnxmorph.experiments import digits  # noqa: E402
from onnxmorph.pipeline import receipt  # noqa: E402
from onnxmorph.pipeline.inspection import format_inspection  # noqa: E402
from onnxmorph.search import STATE_FILE, search  # noqa: E402
from onnxmorph.search.space import parse_choice, propose  # noqa: E402

torch.set_num_threads(1)

# Two rounds of two morphed children (and NASH's trained-on control), 30 steps each: 7 candidates.
SMALL = ["--rounds", "2", "--children", "2", "--steps", "30", "--seed", "3"]
CANDIDATES = 7


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(outdir: Path) -> dict:
    return json.loads((outdir / STATE_FILE).read_text())


def _fingerprint(outdir: Path) -> dict[str, object]:
    """What must not depend on how or in how many pieces the search ran: every file's digest and every score."""
    files = {p.name: _sha(p) for p in sorted((outdir / "candidates").iterdir())}
    entries = {c["id"]: {k: v for k, v in c.items() if k != "seconds"} for c in _state(outdir)["candidates"]}
    return {"files": files, "candidates": entries, "leaderboard": (outdir / "leaderboard.csv").read_text()}


@pytest.fixture(scope="module")
def parent_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parent") / "digits_cnn.onnx"
    onnxmorph.save(digits.parent_cnn(0), path)
    return path


@pytest.fixture(scope="module")
def local_run(parent_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    outdir = tmp_path_factory.mktemp("search") / "out"
    start = time.perf_counter()
    code = main(["search", str(parent_file), "--data", "digits", "-o", str(outdir), "--workers", "2", "-q", *SMALL])
    assert code == 0
    return outdir, time.perf_counter() - start


# --------------------------------------------------------------------------- a local search


def test_local_search_writes_candidates_leaderboard_and_plot(local_run, parent_file) -> None:
    outdir, elapsed = local_run
    assert elapsed < 120, f"the small local search took {elapsed:.0f} s"
    state = _state(outdir)
    assert state["rounds_done"] == 2 and len(state["candidates"]) == CANDIDATES
    ok = [c for c in state["candidates"] if c["status"] == "ok"]
    assert len(ok) == CANDIDATES, [c.get("reason") for c in state["candidates"]]
    for entry in ok:
        assert (outdir / entry["file"]).is_file()
        onnx.checker.check_model(str(outdir / entry["file"]))
    # The root is the given file, byte for byte; every round has its control and its two morphed children.
    assert _sha(outdir / "candidates" / "root.onnx") == _sha(parent_file)
    for r in (1, 2):
        ids = sorted(c["id"] for c in ok if c["round"] == r)
        assert ids == [f"r0{r}c00", f"r0{r}c01", f"r0{r}c02"]
        # Siblings get different morphs (the seeds aside), and the control none.
        # (in id order: candidates are recorded as their workers finish, the control not always first)
        changes = [[{**m, "params": {k: v for k, v in m["params"].items() if k != "seed"}} for m in c["morphs"]]
                   for c in sorted(ok, key=lambda c: c["id"]) if c["round"] == r]
        assert changes[0] == [] and changes[1] and changes[2] and changes[1] != changes[2]
    board = json.loads((outdir / "leaderboard.json").read_text())
    rows = board["leaderboard"]
    assert [row["rank"] for row in rows] == list(range(1, CANDIDATES + 1))
    scores = [(-row["val_score"], row["parameters"]) for row in rows]
    assert scores == sorted(scores)
    csv_lines = (outdir / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,id,round,parent,change,parameters,val_score") and len(csv_lines) == 8
    assert _sha(outdir / "best.onnx") == _sha(outdir / rows[0]["file"])
    png = (outdir / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    # Thirty steps from random weights: the search must have improved on the untrained parent.
    root = next(row for row in rows if row["id"] == "root")
    assert rows[0]["val_score"] > root["val_score"]


def test_receipts_chain_every_candidate_back_to_the_root(local_run) -> None:
    outdir, _ = local_run
    by_id = {c["id"]: c for c in _state(outdir)["candidates"]}
    assert receipt.history(onnx.load(outdir / "candidates" / "root.onnx")) == []
    for cid, entry in by_id.items():
        if cid == "root":
            continue
        parent_file = outdir / by_id[entry["parent"]]["file"]
        before = receipt.history(onnx.load(parent_file))
        trained = receipt.history(onnx.load(outdir / entry["file"]))
        if entry["morphs"]:
            morphed_file = outdir / entry["morphed_file"]
            morphed = receipt.history(onnx.load(morphed_file))
            # parent's chain + the morph (from the parent's file) ; + the training (from the morphed file)
            assert morphed[:-1] == before and morphed[-1]["parent_sha256"] == _sha(parent_file)
            assert morphed[-1]["steps"] == entry["morphs"]
            assert trained[:-1] == morphed and trained[-1]["parent_sha256"] == _sha(morphed_file)
        else:  # NASH's control: the parent trained on
            assert trained[:-1] == before and trained[-1]["parent_sha256"] == _sha(parent_file)
        assert trained[-1]["kind"] == "train" and trained[-1]["steps"][0]["params"]["candidate"] == cid
        assert trained[-1]["steps"][0]["params"]["steps"] == 30
    # The leaderboard spells each chain out: root first, each step the parent of the next.
    for row in json.loads((outdir / "leaderboard.json").read_text())["leaderboard"]:
        chain = [step["id"] for step in row["lineage"]]
        assert chain[0] == "root" and chain[-1] == row["id"]
        assert all(step["sha256"] == _sha(outdir / by_id[step["id"]]["file"]) for step in row["lineage"])
        assert all(by_id[child]["parent"] == parent for parent, child in zip(chain, chain[1:]))
    text = format_inspection(onnxmorph.inspect(onnx.load(outdir / "best.onnx")))
    assert "trained, not a morph" in text and "verified PASS" in text


def test_every_child_was_verified_against_its_parent_before_training(local_run) -> None:
    outdir, _ = local_run
    by_id = {c["id"]: c for c in _state(outdir)["candidates"]}
    morphed = [c for c in by_id.values() if c["morphs"]]
    assert len(morphed) == 4
    for entry in morphed:
        parent = onnxmorph.load(outdir / by_id[entry["parent"]]["file"])
        child = onnxmorph.load(outdir / entry["morphed_file"])
        record = receipt.history(child)[-1]
        assert record["verification"]["passed"] and record["verification"]["max_abs_error"] <= 1e-5
        assert entry["verification"]["passed"] and entry["verification"]["max_abs_error"] <= 1e-5
        # Checked again here, independently, on other inputs: the untrained child is the parent's function.
        report = onnxmorph.verify(parent, child, seed=123)
        assert report, str(report)
        # ...and training changed it afterwards (the trained file is not the verified one).
        trained = onnxmorph.load(outdir / entry["file"])
        assert not onnxmorph.verify(child, trained)


# --------------------------------------------------------------------------- resume, Ray


def test_killed_search_resumes_to_the_same_result(local_run, parent_file, tmp_path, capsys) -> None:
    outdir = tmp_path / "out"
    command = [sys.executable, "-m", "onnxmorph", "search", str(parent_file), "--data", "digits", "-o", str(outdir),
               "--workers", "0", "-q", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (outdir / STATE_FILE).is_file() and len(_state(outdir)["candidates"]) >= 3:
                break
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = len(_state(outdir)["candidates"])
    assert 3 <= done < CANDIDATES, f"the search was not stopped midway ({done} candidates)"
    assert not (outdir / "leaderboard.png").exists()
    # The same command continues (here in this process, with no worker processes) and ends where an
    # uninterrupted run with two workers ended: the same files, byte for byte, and the same scores.
    assert main(command[3:]) == 0
    assert _fingerprint(outdir) == _fingerprint(local_run[0])
    # Rerunning a finished search changes nothing.
    before = _fingerprint(outdir)
    assert main(command[3:]) == 0
    assert _fingerprint(outdir) == before
    # A candidate file changed behind the search's back is not built upon.
    victim = outdir / "candidates" / "r01c01.morphed.onnx"
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert main([*command[3:], "--rounds", "3"]) == 2
    assert "r01c01.morphed.onnx: missing or changed" in capsys.readouterr().err


def test_search_on_a_local_ray_gives_the_same_files(local_run, parent_file, tmp_path) -> None:
    _extra("ray")
    outdir = tmp_path / "ray"
    start = time.perf_counter()
    result = search(parent_file, "digits", outdir, rounds=2, children=2, steps=30, seed=3, ray=True, workers=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"the Ray search took {elapsed:.0f} s"
    assert result.best["id"] == json.loads((local_run[0] / "leaderboard.json").read_text())["best"]
    assert _fingerprint(outdir) == _fingerprint(local_run[0])


# --------------------------------------------------------------------------- other data, the space


def test_npz_search_on_an_mlp_keeping_two(tmp_path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((784, 10))
    x = rng.uniform(-1, 1, (96, 784)).astype(np.float32)
    y = (x @ w).argmax(axis=1)
    np.savez(tmp_path / "data.npz", x_train=x[:64], y_train=y[:64], x_val=x[64:], y_val=y[64:])
    events: list[dict] = []
    result = search(MODELS / "mlp_relu.onnx", tmp_path / "data.npz", tmp_path / "out", rounds=2, children=2, keep=2,
                    steps=5, workers=0, morphs=["deepen:activation=relu|tanh", "widen:factor=1.25"],
                    progress=events.append)
    assert [(e["round"], e["done"], e["total"]) for e in events] == [(0, 1, 1)] + [
        (r, k, 3) for r in (1, 2) for k in (1, 2, 3)]
    assert events[-1]["best"]["id"] == result.best["id"]
    state = _state(tmp_path / "out")
    assert {c["id"] for c in state["candidates"]} == {"root"} | {f"r0{r}c0{c}" for r in (1, 2) for c in (0, 1, 2)}
    for entry in state["candidates"]:
        assert all(m["pass"] in ("deepen", "widen") for m in entry["morphs"]), entry["morphs"]
    # Round 2 grows the two best of what existed before it (score, then size): the control and the
    # first child come from the best, the second child from the runner-up.
    first, second = [c["id"] for c in sorted((c for c in state["candidates"] if c["round"] < 2),
                                             key=lambda c: (-c["val_score"], c["parameters"], c["id"]))[:2]]
    parents = {c["id"]: c["parent"] for c in state["candidates"] if c["round"] == 2}
    assert parents == {"r02c00": first, "r02c01": first, "r02c02": second}
    assert result.best_path.is_file() and "test_score" not in state["candidates"][0]


def test_proposals_apply_and_follow_the_space() -> None:
    model = onnxmorph.normalize(digits.parent_cnn(0))
    space = [parse_choice("widen:factor=2,method=lemon"), parse_choice("kernel:size=5")]
    for seed in range(6):
        (step,) = propose(model, np.random.default_rng(seed), space)
        step.requires(model)
        if step.name == "widen":
            assert step.layer in ("conv1", "conv2") and step.method == "lemon"  # fc is the classifier
            assert step.width == {"conv1": 8, "conv2": 16}[step.layer]
        else:
            assert step.name == "kernel" and tuple(step.size) == (5,)
    with pytest.raises(NotApplicable, match="no morph of the search space"):
        propose(onnxmorph.load(MODELS / "mlp_relu.onnx"), np.random.default_rng(0), [parse_choice("kernel")])
    for bad in ("fold", "widen:layer=fc1", "widen:factor=0.5", "deepen:activation=bogus", "deepen:kernel"):
        with pytest.raises(UsageError, match="--morphs"):
            parse_choice(bad)


# --------------------------------------------------------------------------- bad input


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _digits_like(n: int = 8, features: int = 64) -> dict[str, np.ndarray]:
    x = np.zeros((n, features), np.float32)
    y = np.zeros(n, np.int64)
    return {"x_train": x, "y_train": y, "x_val": x, "y_val": y}


def _bad_npz_files(tmp_path: Path) -> dict[str, Path]:
    good = _digits_like()
    files = {
        "missing x_val": _npz(tmp_path / "a.npz", **{k: v for k, v in good.items() if k != "x_val"}),
        "unknown array(s) x_extra": _npz(tmp_path / "b.npz", **good, x_extra=good["x_train"]),
        "must be a non-empty numeric": _npz(tmp_path / "c.npz", **{**good, "x_train": np.array([["a"] * 64] * 8)}),
        "one entry per sample": _npz(tmp_path / "d.npz", **{**good, "y_train": np.zeros(7, np.int64)}),
        "do not fit the model's input": _npz(tmp_path / "e.npz", **_digits_like(features=63)),
        "label 10 does not exist": _npz(tmp_path / "f.npz", **{**good, "y_val": np.full(8, 10)}),
        "NaN or infinite": _npz(tmp_path / "g.npz", **{**good, "x_val": np.full((8, 64), np.nan, np.float32)}),
    }
    (tmp_path / "h.npz").write_bytes(b"not a zip")
    files["not an .npz archive"] = tmp_path / "h.npz"
    files["no such file"] = tmp_path / "missing.npz"
    return files


def _refused(argv: list[str], capsys: pytest.CaptureFixture, expected: str) -> None:
    assert main(argv) == 2, expected
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onnxmorph: error: ") and "Traceback" not in err
    assert expected in err, err


def test_bad_input_is_one_line_exit_2_and_writes_nothing(parent_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    for expected, path in _bad_npz_files(tmp_path).items():
        _refused(["search", str(parent_file), "--data", str(path), "-o", str(out)], capsys, expected)
    base = ["search", str(parent_file), "--data", "digits", "-o", str(out)]
    _refused(["search", str(parent_file), "--data", "cifar", "-o", str(out)], capsys, "give a data set name")
    _refused(base + ["--morphs", "fold"], capsys, "unknown morph 'fold'")
    _refused(base + ["--children", "0"], capsys, "--children must be at least 1")
    _refused(["search", str(tmp_path / "nope.onnx"), "--data", "digits", "-o", str(out)], capsys, "nope.onnx")
    assert not out.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    _refused(["search", str(parent_file), "--data", "digits", "-o", str(tmp_path / "full")], capsys,
             "holds no search")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]


def test_rerun_with_other_settings_is_refused(local_run, parent_file, capsys) -> None:
    outdir, _ = local_run
    before = _fingerprint(outdir)
    argv = ["search", str(parent_file), "--data", "digits", "-o", str(outdir), *SMALL, "--steps", "31"]
    _refused(argv, capsys, "holds a search with other settings (steps: 30 there, 31 now)")
    assert _fingerprint(outdir) == before


def test_ray_missing_says_how_to_install_it(parent_file, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    argv = ["search", str(parent_file), "--data", "digits", "-o", str(tmp_path / "out"), "--ray"]
    _refused(argv, capsys, "pip install 'onnxmorph[search]'")
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_is_refused_at_once(parent_file, tmp_path, capsys) -> None:
    _extra("ray")
    import socket

    with socket.socket() as probe:  # a port that nothing listens on once this socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["search", str(parent_file), "--data", "digits", "-o", str(tmp_path / "out"),
            "--ray-address", f"127.0.0.1:{port}"]
    _refused(argv, capsys, "nothing answers there")
    assert not (tmp_path / "out").exists()
