"""Hostile input, third round: a search that cannot hang or escape its folder, no file left behind on a
refusal, one parser for receipts, limits that cannot overflow, and external data through every pass.

Each case the issue names has a sibling beside it (a variant it does not name). Tests that could
hang run the CLI in a real process with a timeout well under a minute, so that a regression
fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS
from onnx import helper
from robust_support import _BATCH_DRIVER as BATCH_DRIVER
from robust_support import (
    PASSES,
    ROOT,
    Outcome,
    assert_refused,
    cli_flags,
    first_use,
    leftovers,
    listing,
    run_cli,
    run_cli_batch,
    run_main,
    small_mlp,
    unwritable,
)

import onnxmorph
import onnxmorph.search
from onnxmorph import limits
from onnxmorph.io import saving
from onnxmorph.pipeline import receipt


def _extra(module: str) -> ModuleType:
    """An optional extra's module; in CI (CI=true) the test extra installs it, so it must be there."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


# --------------------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state)} of every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        found[int(entry.name)] = (int(fields[1]), fields[0])
    return found


def _descendants(pid: int) -> set[int]:
    table = _processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (a zombie has ended: only its parent has not read its exit status)."""
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][1] not in "ZX"}


def _wait_until(condition: Any, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def _killed_at_exit(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Whatever the test finds, the process it started and all it started are gone afterwards."""
    try:
        yield proc
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def bounded_cli(args: list[Any], cwd: Path, timeout: float = 50, **env: str) -> Outcome:
    """`python -m onnxmorph ARGS` in a real process that, with all it started, is killed at `timeout`.

    For what the old code did without end (a billion rounds, a million worker processes): the
    test fails instead of hanging, and leaves nothing running.
    """
    return _bounded([sys.executable, "-m", "onnxmorph", *map(str, args)], cwd, timeout, env)


def bounded_python(code: str, cwd: Path, timeout: float = 50, **env: str) -> Outcome:
    """`python -c CODE`, bounded as `bounded_cli` is."""
    return _bounded([sys.executable, "-c", code], cwd, timeout, env)


def bounded_batch(runs: list[list[Any]], cwd: Path, timeout: float = 50, **env: str) -> list[Outcome]:
    """Several CLI runs in one process (robust_support's batch driver), bounded as `bounded_cli` is."""
    report = cwd.parent / f"{cwd.name}.batch.json"
    argv = json.dumps([[str(a) for a in run] for run in runs])
    done = _bounded([sys.executable, "-c", BATCH_DRIVER, argv, str(report)], cwd, timeout, env)
    assert done.code == 0, done.err
    results = json.loads(report.read_text())
    report.unlink()
    return [Outcome(code, out, err) for code, out, err in results]


def _bounded(command: list[str], cwd: Path, timeout: float, env: dict[str, str]) -> Outcome:
    proc = subprocess.Popen(command, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    with _killed_at_exit(proc):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{command[1:4]} did not end within {timeout:g} s") from None
    return Outcome(proc.returncode, out, err)


class FakeServer:
    """A TCP listener on 127.0.0.1 that is not Ray: it says nothing, closes at once, answers HTTP/1.1
    or speaks just enough HTTP/2 (a SETTINGS frame) to look like gRPC; `accepted` is set on a connection."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.accepted = threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.set()
            with contextlib.suppress(OSError):
                if self.kind == "close":
                    conn.close()
                elif self.kind == "http":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                elif self.kind == "http2":
                    conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.close()


@contextlib.contextmanager
def fake_server(kind: str) -> Iterator[FakeServer]:
    server = FakeServer(kind)
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------- search fixtures


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few samples for models/mlp_relu.onnx (784 features, 10 classes)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (24, 784)).astype(np.float32)
    y = rng.integers(0, 10, 24)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x_train=x[:16], y_train=y[:16], x_val=x[16:], y_val=y[16:])
    return path


def _search(npz: Path, out: Path, *more: Any) -> list[Any]:
    return ["search", MODELS / "mlp_relu.onnx", "--data", npz, "-o", out, "--rounds", "0", "--steps", "1", *more]


@pytest.fixture(scope="module")
def finished(npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished search of the root alone (scored in this process): the folder to tamper with, copied per test."""
    _extra("torch")
    out = tmp_path_factory.mktemp("finished") / "out"
    onnxmorph.search.search(MODELS / "mlp_relu.onnx", npz, out, rounds=0, steps=1, workers=0)
    return out


def _copy_search(finished: Path, folder: Path) -> Path:
    out = folder / "work" / "out"
    shutil.copytree(finished, out, symlinks=True)
    return out


def _state_path(out: Path) -> Path:
    return out / "search-state.json"


def _edit_state(out: Path, edit: Any) -> None:
    state = json.loads(_state_path(out).read_text())
    state = edit(state)
    _state_path(out).write_text(state if isinstance(state, str) else json.dumps(state))


# --------------------------------------------------------------------------- Ray: bounded, quiet, nothing made


def test_a_port_that_is_not_ray_is_refused_in_bounded_time(npz: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The issue: a listener that accepts and says nothing hung the search 90 s+, printed Ray's
    # log lines and left OUTDIR. Siblings: one that closes at once, one that answers HTTP/1.1,
    # and the same silent listener behind Ray Client's ray:// form.
    _extra("ray")
    monkeypatch.setenv(limits.RAY_TIMEOUT.variable, "2")
    with fake_server("silent") as silent, fake_server("close") as closing, fake_server("http") as http:
        cases = {
            "nothing answered within 2 s": f"127.0.0.1:{silent.port}",
            "closed without an answer": f"127.0.0.1:{closing.port}",
            "does not speak gRPC": f"127.0.0.1:{http.port}",
            "nothing answered": f"ray://127.0.0.1:{silent.port}",
        }
        runs = [_search(npz, tmp_path / f"out{k}", "--ray-address", address)
                for k, address in enumerate(cases.values())]
        start = time.monotonic()
        results = run_cli_batch(runs, cwd=tmp_path, report=tmp_path.parent / f"{tmp_path.name}.ray.json", timeout=50)
        elapsed = time.monotonic() - start
    for (needle, address), result in zip(cases.items(), results):
        assert_refused(result, 2, address, needle, "not a Ray cluster")
    assert elapsed < 40, f"four refusals took {elapsed:.0f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "an output folder was made"


def test_a_grpc_speaker_that_is_not_ray_is_refused_in_bounded_time(npz: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Sibling: past the gRPC handshake, Ray itself would retry for minutes; its attempt is bounded.
    _extra("ray")
    monkeypatch.setenv(limits.RAY_TIMEOUT.variable, "4")
    with fake_server("http2") as server:
        start = time.monotonic()
        result = run_cli(_search(npz, tmp_path / "out", "--ray-address", f"127.0.0.1:{server.port}"), cwd=tmp_path,
                         timeout=50)
        elapsed = time.monotonic() - start
    assert_refused(result, 2, "Ray", str(server.port))
    assert elapsed < 35, f"took {elapsed:.0f} s"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["silent", "http2"])
def test_sigterm_while_connecting_to_ray_ends_the_search_at_once(kind: str, npz: Path, tmp_path: Path) -> None:
    # The issue: SIGTERM was ignored for 20 s while Ray tried to connect. Sibling: SIGTERM while
    # Ray's own attempt runs (behind a gRPC handshake), which must not leave that attempt running.
    _extra("ray")
    with fake_server(kind) as server:
        command = [sys.executable, "-m", "onnxmorph", *map(str, _search(npz, tmp_path / "out", "--ray-address",
                                                                         f"127.0.0.1:{server.port}"))]
        proc = subprocess.Popen(command, cwd=tmp_path, env=_env(**{limits.RAY_TIMEOUT.variable: "40"}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with _killed_at_exit(proc):
            _wait_until(server.accepted.is_set, 45, "a connection to the fake cluster", proc)
            time.sleep(1)  # (inside the 5 s probe, or Ray's attempt)
            helpers = _descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                raise AssertionError("SIGTERM did not end the search within 10 s") from None
        result = Outcome(proc.returncode, out, err)
    assert_refused(result, 130, "interrupted, nothing written")
    assert not (tmp_path / "out").exists()
    _wait_until(lambda: not _running(helpers), 5, "the Ray attempt to end")


_ADDRESS_FORMS = ["localhost", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "http://head:6379", "ray://", "local",
                  "head:6379/x", " ", "[::1"]


def test_a_ray_address_form_is_refused_before_the_folder_exists(npz: Path, tmp_path: Path) -> None:
    # The issue: these were refused by Ray after OUTDIR was made (and left). Each is refused on
    # its form, before anything is read, made or connected to (the old code started a local Ray
    # for "local": one bounded process).
    _extra("ray")
    runs = [_search(npz, tmp_path / f"out{k}", "--ray-address", address) for k, address in enumerate(_ADDRESS_FORMS)]
    for address, result in zip(_ADDRESS_FORMS, bounded_batch(runs, tmp_path)):
        try:
            assert_refused(result, 2, "--ray-address", "HOST:PORT")
        except AssertionError as exc:
            raise AssertionError(f"{address!r}: {exc}") from None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- workers: bounded, gone with the parent


_SIZES = [
    (["--workers", "1000000"], limits.WORKERS.variable),
    (["--workers", "3"], limits.WORKERS.variable),  # sibling: just over a lowered limit
    (["--children", "1000000000"], limits.CANDIDATES.variable),
    (["--rounds", "1000000000"], limits.CANDIDATES.variable),  # sibling
    (["--morphs-per-child", "1000000"], limits.RECIPE_STEPS.variable),  # sibling
]


def test_search_sizes_are_refused_up_front(npz: Path, tmp_path: Path) -> None:
    # The issue: `--workers 1000000` spawned without limit, `--children 1000000000` was not refused
    # up front. All in one process, killed (with whatever it started) if it does not end.
    runs = [_search(npz, tmp_path / f"out{k}", *args) for k, (args, _) in enumerate(_SIZES)]
    start = time.monotonic()
    results = bounded_batch(runs, tmp_path, **{limits.WORKERS.variable: "2"})
    assert time.monotonic() - start < 45
    for (args, needle), result in zip(_SIZES, results):
        assert_refused(result, 2, needle, args[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_api_bounds_workers_too(npz: Path, tmp_path: Path) -> None:
    code = f"""
import onnxmorph.search
for workers in (10**6, -3):
    try:
        onnxmorph.search.search({str(MODELS / "mlp_relu.onnx")!r}, {str(npz)!r}, "out", workers=workers)
    except onnxmorph.UsageError as exc:
        print(exc)
"""
    done = bounded_python(code, tmp_path, **{limits.WORKERS.variable: "2"})
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert len(lines) == 2 and limits.WORKERS.variable in lines[0] and "--workers" in lines[1], done.out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-3", "abc", "2.5"])
def test_a_bad_workers_value_is_a_usage_line(value: str, npz: Path, tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    # The issue: `--workers -3` was a 48-line traceback raised inside argument parsing.
    assert_refused(run_main(_search(npz, tmp_path / "out", "--workers", value), capfd), 2, "--workers")
    assert not (tmp_path / "out").exists()


def _start_long_search(npz: Path, tmp_path: Path, workers: int) -> subprocess.Popen:
    # A million training steps per candidate: the workers are busy for as long as the test needs.
    argv = _search(npz, tmp_path / "out", "--workers", str(workers), "--steps", "1000000", "--rounds", "1",
                   "--children", "1", "--morphs", "deepen")
    return subprocess.Popen([sys.executable, "-m", "onnxmorph", *map(str, argv)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _uses_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _busy_workers(proc: subprocess.Popen, count: int) -> set[int]:
    """The search's worker processes, once `count` of them run and have loaded PyTorch (the root is sent then)."""
    _wait_until(lambda: len(_running(_descendants(proc.pid))) >= count, 45, f"{count} worker(s)", proc)
    workers = _running(_descendants(proc.pid))
    _wait_until(lambda: all(_uses_torch(pid) for pid in workers), 45, "the workers to load PyTorch", proc)
    time.sleep(1)  # the root is being trained
    return workers


def test_workers_die_with_a_killed_parent(npz: Path, tmp_path: Path) -> None:
    # The issue: workers outlived a SIGKILLed parent (finishing a candidate nobody would read).
    _extra("torch")
    with _killed_at_exit(_start_long_search(npz, tmp_path, workers=2)) as proc:
        workers = _busy_workers(proc, 2)
        proc.kill()
        proc.wait()
        _wait_until(lambda: not _running(workers), 10, "the workers to end after their parent was killed")


def test_sigterm_ends_the_search_and_its_workers(npz: Path, tmp_path: Path) -> None:
    # Sibling: SIGTERM (the CLI's interrupt) ends the workers before the search exits.
    _extra("torch")
    with _killed_at_exit(_start_long_search(npz, tmp_path, workers=2)) as proc:
        workers = _busy_workers(proc, 2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert_refused(Outcome(proc.returncode, out, err), 130, "interrupted")
    assert not _running(workers)
    # nothing finished: the new folder is taken back
    assert not (tmp_path / "out").exists()


def test_a_dead_worker_stops_the_search_in_one_line(npz: Path, tmp_path: Path) -> None:
    # Sibling of "hangs forever when a worker dies": a worker killed mid-candidate (the OOM killer)
    # stops the search with one line, naming the candidate, instead of a wait without end.
    _extra("torch")
    with _killed_at_exit(_start_long_search(npz, tmp_path, workers=1)) as proc:
        (worker,) = _busy_workers(proc, 1)
        os.kill(worker, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the search waited for a dead worker") from None
    assert_refused(Outcome(proc.returncode, out, err), 2, "worker process was killed by SIGKILL", "root")
    assert not (tmp_path / "out").exists()


_UNGUARDED = """
import onnxmorph.search
result = onnxmorph.search.search({model!r}, {data!r}, "out", rounds=0, steps=1, workers=1)
print("best", result.best["id"])
"""


@pytest.mark.parametrize("layout", ["script", "imported module"])
def test_a_search_called_without_a_main_guard_finishes(layout: str, npz: Path, tmp_path: Path) -> None:
    # The issue: a script calling search() without `if __name__ == "__main__":` hung forever
    # (multiprocessing's workers import the script again, which starts a search in each). Sibling:
    # the unguarded call sits in a module the script imports.
    _extra("torch")
    code = _UNGUARDED.format(model=str(MODELS / "mlp_relu.onnx"), data=str(npz))
    if layout == "script":
        (tmp_path / "grow.py").write_text(code)
    else:
        (tmp_path / "helper.py").write_text(code)
        (tmp_path / "grow.py").write_text("import helper  # noqa\n")
    done = _bounded([sys.executable, "grow.py"], tmp_path, 50, {})
    assert done.code == 0, done.err
    assert done.out.strip() == "best root" and (tmp_path / "out" / "best.onnx").is_file()


# --------------------------------------------------------------------------- resume: nothing outside OUTDIR


def _secret(work: Path) -> tuple[Path, str]:
    secret = work / "secret.onnx"
    shutil.copyfile(MODELS / "mlp_tanh.onnx", secret)
    return secret, hashlib.sha256(secret.read_bytes()).hexdigest()


def _root(state: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in state["candidates"] if c["id"] == "root")


def _resumed(npz: Path, outs: list[Path], tmp_path: Path) -> list[Outcome]:
    """Each search continued for one more round, in one real process (a state could make the old code loop)."""
    runs = [_search(npz, out, "--rounds", "1", "--workers", "0") for out in outs]
    return run_cli_batch(runs, cwd=tmp_path, report=tmp_path / "batch.json", timeout=50)


def _resume(npz: Path, out: Path, capfd: pytest.CaptureFixture[str], *needles: str) -> None:
    before = listing(out.parent)
    assert_refused(run_main(_search(npz, out, "--rounds", "1", "--workers", "0"), capfd), 2, *needles)
    assert listing(out.parent) == before


def test_a_state_naming_a_file_outside_its_folder_is_refused(npz: Path, finished: Path, tmp_path: Path) -> None:
    # The issue: a candidate "file": "../secret.onnx" with that file's digest was morphed and copied to best.onnx.
    out = _copy_search(finished, tmp_path)
    secret, digest = _secret(out.parent)

    def point_outside(state: dict[str, Any]) -> dict[str, Any]:
        _root(state).update(file="../secret.onnx", sha256=digest)
        return state

    _edit_state(out, point_outside)
    before = listing(out.parent)
    (result,) = _resumed(npz, [out], tmp_path)
    assert_refused(result, 2, "../secret.onnx", "candidates/root.onnx")
    assert listing(out.parent) == before


def test_links_and_paths_out_of_the_folder_are_refused(npz: Path, finished: Path, tmp_path: Path) -> None:
    # Siblings: the listed name is right but it is a link to the outside (the file, or the whole
    # candidates folder), or the state names the outside file by its absolute path.
    cases = {"file link": "a link", "folder link": "a link", "absolute path": "candidates/root.onnx"}
    outs = []
    for k, how in enumerate(cases):
        out = _copy_search(finished, tmp_path / f"case{k}")
        secret, digest = _secret(out.parent)
        if how == "file link":
            (out / "candidates" / "root.onnx").unlink()
            (out / "candidates" / "root.onnx").symlink_to(secret)
            _edit_state(out, lambda s, d=digest: (_root(s).update(sha256=d), s)[1])
        elif how == "folder link":
            elsewhere = out.parent / "elsewhere"
            (out / "candidates").rename(elsewhere)
            (out / "candidates").symlink_to(elsewhere, target_is_directory=True)
        else:
            _edit_state(out, lambda s, f=str(secret), d=digest: (_root(s).update(file=f, sha256=d), s)[1])
        outs.append(out)
    before = [listing(out.parent) for out in outs]
    results = _resumed(npz, outs, tmp_path)
    for (how, needle), result, out, was in zip(cases.items(), results, outs, before):
        assert_refused(result, 2, needle)
        assert listing(out.parent) == was, how


_TAMPERED = {
    # the issue's four
    "a list": lambda s: [s],
    "missing candidates": lambda s: {k: v for k, v in s.items() if k != "candidates"},
    "string rounds_done": lambda s: {**s, "rounds_done": "3"},
    "string settings.parent": lambda s: {**s, "settings": {**s["settings"], "parent": "parent.onnx"}},
    # siblings
    "a candidate its own ancestor": lambda s: {**s, "candidates": [{**_root(s), "parent": "root"}]},
    "string val_score": lambda s: {**s, "candidates": [{**_root(s), "val_score": "0.9"}]},
    "a 5000-digit number": lambda s: json.dumps(s).replace('"rounds_done": 0', '"rounds_done": ' + "9" * 5000),
    "nested 100000 deep": lambda s: "[" * 100_000 + "]" * 100_000,
    "not UTF-8": None,  # written as bytes below
}


def test_a_tampered_state_is_refused_in_one_line(npz: Path, finished: Path, tmp_path: Path) -> None:
    outs = []
    for k, edit in enumerate(_TAMPERED.values()):
        out = _copy_search(finished, tmp_path / f"case{k}")
        if edit is None:
            _state_path(out).write_bytes(b'{"settings": "\xff"}')
        else:
            _edit_state(out, edit)
        outs.append(out)
    before = [listing(out.parent) for out in outs]
    results = _resumed(npz, outs, tmp_path)
    for kind, result, out, was in zip(_TAMPERED, results, outs, before):
        try:
            assert_refused(result, 2, "search-state.json", "not a search state")
        except AssertionError as exc:
            raise AssertionError(f"{kind}: {exc}") from None
        assert listing(out.parent) == was, kind


def test_refusing_another_search_leaves_nothing_behind(npz: Path, finished: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    # The issue: `.search.lock` was left in the folder when the search there was refused.
    # Siblings: a state of another format, and a folder another search holds (its lock).
    out = _copy_search(finished, tmp_path)
    before = listing(out.parent)
    assert_refused(run_main(_search(npz, out, "--steps", "2"), capfd), 2, "other settings (steps: 1 there, 2 now)")
    assert listing(out.parent) == before
    _edit_state(out, lambda s: {**s, "settings": {**s["settings"], "format": "onnxmorph-search/0"}})
    _resume(npz, out, capfd, "onnxmorph-search/1")
    shutil.rmtree(out)
    out = _copy_search(finished, tmp_path)
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _resume(npz, out, capfd, "another search is running there")
    finally:
        os.close(held)


@pytest.mark.parametrize("space", [["widen:factor=nan|1e308"], ["widen:factor=inf"], [{"morph": "widen",
                                                                                        "factor": float("nan")}]])
def test_a_width_factor_that_is_no_number_is_refused_before_the_root_is_scored(
        space: list[Any], npz: Path, tmp_path: Path) -> None:
    # The issue: the factor was read when a child was drawn, after the root was trained (exit 3).
    # Siblings: inf, and NaN given through the API.
    start = time.monotonic()
    with pytest.raises(onnxmorph.UsageError, match="factor must be a number above 1"):
        onnxmorph.search.search(MODELS / "mlp_relu.onnx", npz, tmp_path / "out", morphs=space, workers=0)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_nan_factor_in_one_line(npz: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert_refused(run_main(_search(npz, tmp_path / "out", "--morphs", "widen:factor=nan|1e308"), capfd), 2,
                   "factor must be a number above 1")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- receipts: one validating parser


_GOOD_RECORD = {
    "tool": "onnxmorph 0", "parent_sha256": "a" * 64,
    "steps": [{"pass": "widen", "params": {"layer": "fc1", "width": 200}}],
    "verification": {"passed": True, "trials": 3, "seed": 0, "inputs": "random", "max_abs_error": 1e-7,
                     "max_rel_error": 1e-6, "outputs": [{"name": "output", "max_abs_error": 1e-7,
                                                         "max_rel_error": 1e-6, "atol": 1e-5, "rtol": 1e-4}]},
}
_VERIFICATION = _GOOD_RECORD["verification"]


def _record(**change: Any) -> str:
    return json.dumps([{**_GOOD_RECORD, **change}])


_RECEIPTS = {
    # the issue's cases
    "records not objects": '["widen", 3]',
    "integer parent_sha256": _record(parent_sha256=12345),
    "huge number": _record(verification={**_VERIFICATION, "max_abs_error": 10**400}),
    "params a list": _record(steps=[{"pass": "widen", "params": ["fc1", 200]}]),
    "verification a string": _record(verification="PASS"),
    "missing max_abs_error": _record(verification={k: v for k, v in _VERIFICATION.items() if k != "max_abs_error"}),
    # siblings
    "5000-digit integer": _record(verification={**_VERIFICATION, "trials": 7}).replace('"trials": 7',
                                                                                       '"trials": ' + "7" * 5000),
    "nested 100000 deep": "[" * 100_000 + "]" * 100_000,
    "not JSON": "{'tool': 'onnxmorph'}",
    "a training result as text": _record(kind="train", result={"val_score": "high"}),
    "an object, not a list": json.dumps(_GOOD_RECORD),
}


def _with_receipt(folder: Path, text: str, name: str = "child.onnx") -> Path:
    model = onnx.load(MODELS / "mlp_relu.onnx")
    helper.set_model_props(model, {receipt.HISTORY_KEY: text})
    path = folder / name
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("command", ["inspect", "diff", "diff --html", "widen"])
@pytest.mark.parametrize("kind", sorted(_RECEIPTS))
def test_a_malformed_receipt_is_one_line_from_every_reader(kind: str, command: str, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    child = _with_receipt(tmp_path, _RECEIPTS[kind])
    parent = MODELS / "mlp_relu.onnx"
    args: list[Any] = {
        "inspect": ["inspect", child],
        "diff": ["diff", parent, child, "--json"],
        "diff --html": ["diff", parent, child, "--html", tmp_path / "page.html"],
        "widen": ["widen", child, "--layer", "fc1", "--width", "200", "-o", tmp_path / "grown.onnx"],
    }[command]
    before = listing(tmp_path)
    assert_refused(run_main(args, capfd), 2, "child.onnx", "receipt")
    assert listing(tmp_path) == before


def test_the_api_reads_receipts_through_the_same_parser(tmp_path: Path) -> None:
    for text in _RECEIPTS.values():
        model = onnx.load(_with_receipt(tmp_path, text))
        with pytest.raises(onnxmorph.InvalidModelError, match="receipt"):
            onnxmorph.history(model)
        with pytest.raises(onnxmorph.InvalidModelError, match="receipt"):
            onnxmorph.inspect(model)
    good = onnx.load(_with_receipt(tmp_path, _record()))
    assert onnxmorph.history(good) == [_GOOD_RECORD]


def test_only_the_receipt_module_reads_the_receipt() -> None:
    # One parser: no other module of the package looks the receipt's metadata up itself.
    offenders = [str(path.relative_to(ROOT)) for folder in ("onnxmorph", "passes")
                 for path in (ROOT / folder).rglob("*.py")
                 if path.name != "receipt.py" and ("onnxmorph.history" in path.read_text()
                                                   or "HISTORY_KEY" in path.read_text())]
    assert offenders == []


def test_a_good_receipt_still_shows_everywhere(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    child = _with_receipt(tmp_path, _record())
    assert run_main(["inspect", child], capfd).code == 0
    result = run_main(["diff", MODELS / "mlp_relu.onnx", child, "--html", tmp_path / "page.html"], capfd)
    assert result.code == 0 and "widen(layer='fc1', width=200)" in result.out
    assert "1.00e-07" in (tmp_path / "page.html").read_text()


# --------------------------------------------------------------------------- text that is not UTF-8


def _not_utf8(folder: Path, where: str) -> Path:
    model = small_mlp()
    marker = "MARKER__"
    if where == "node name":
        model.graph.node[1].name = marker
    elif where == "tensor name":
        model.graph.node[1].output[0] = marker
        model.graph.node[2].input[0] = marker
    else:
        helper.set_model_props(model, {receipt.HISTORY_KEY: marker})
    data = model.SerializeToString().replace(marker.encode(), b"M\xff\xfeKER__")  # same length: the framing holds
    path = folder / "broken.onnx"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("command", ["diff --html", "diff", "inspect", "verify", "widen"])
@pytest.mark.parametrize("where", ["node name", "tensor name", "metadata"])
def test_text_that_is_not_utf8_is_refused_in_one_line(where: str, command: str, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    # The issue: invalid UTF-8 in a node name crashed `diff --html`. Siblings: a tensor name and
    # the receipt's metadata, through every command that reads a model.
    broken = _not_utf8(tmp_path, where)
    good = tmp_path / "good.onnx"
    onnx.save(small_mlp(), good)
    args: list[Any] = {
        "diff --html": ["diff", good, broken, "--html", tmp_path / "page.html"],
        "diff": ["diff", broken, good],
        "inspect": ["inspect", broken],
        "verify": ["verify", good, broken],
        "widen": ["widen", broken, "--layer", "fc1", "--width", "12", "-o", tmp_path / "child.onnx"],
    }[command]
    before = listing(tmp_path)
    assert_refused(run_main(args, capfd), 2, "broken.onnx", "UTF-8")
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- limit variables


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "Infinity", "nan", "9" * 5000, "1e99999"])
@pytest.mark.parametrize("limit", [limits.MODEL_BYTES, limits.NEW_BYTES, limits.WORKERS])
def test_a_limit_set_to_no_number_is_one_line(limit: limits.Limit, value: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    # The issue: inf, 1e400, -inf and Infinity raised OverflowError (exit 3). Siblings: NaN, a
    # 5000-digit number, another limit (the search's workers).
    monkeypatch.setenv(limit.variable, value)
    if limit is limits.WORKERS:
        args: list[Any] = ["search", MODELS / "mlp_relu.onnx", "--data", "digits", "-o", tmp_path / "out"]
    else:
        args = ["widen", MODELS / "mlp_relu.onnx", "--layer", "fc1", "--width", "200", "-o", tmp_path / "c.onnx"]
    before = listing(tmp_path)
    assert_refused(run_main(args, capfd), 2, limit.variable)
    assert listing(tmp_path) == before


def test_limit_values_that_are_numbers_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    for text, expected in (("1000", 1000), ("2e9", 2_000_000_000), ("  7 ", 7), ("1.9", 1)):
        monkeypatch.setenv(limits.NEW_LAYERS.variable, text)
        assert limits.NEW_LAYERS.value() == expected


# --------------------------------------------------------------------------- ONNXMORPH_SCRATCH


@pytest.fixture(scope="module")
def external_transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/transformer_prenorm.onnx with every weight in external data (the block morph spills there)."""
    folder = tmp_path_factory.mktemp("external")
    onnx.save(onnx.load(MODELS / "transformer_prenorm.onnx"), folder / "parent.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="parent.onnx.data", size_threshold=0)
    return folder / "parent.onnx"


@pytest.mark.parametrize("kind", ["a file", "a missing folder", "an unwritable folder"])
def test_a_scratch_folder_that_cannot_be_used_is_one_line(kind: str, external_transformer: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    # The issue: a file or a missing folder (exit 3). Sibling: a folder that cannot be written.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(external_transformer, work / "parent.onnx")
    shutil.copyfile(str(external_transformer) + ".data", work / "parent.onnx.data")
    with contextlib.ExitStack() as stack:
        if kind == "a file":
            scratch = tmp_path / "scratch"
            scratch.write_text("not a folder")
        elif kind == "a missing folder":
            scratch = tmp_path / "missing" / "scratch"
        else:
            scratch = stack.enter_context(unwritable(tmp_path / "locked"))
        monkeypatch.setenv("ONNXMORPH_SCRATCH", str(scratch))
        before = listing(work)
        assert_refused(run_main(["block", work / "parent.onnx", "--after", "0", "-o", work / "child.onnx"], capfd),
                       2, "ONNXMORPH_SCRATCH")
        assert listing(work) == before


# --------------------------------------------------------------------------- nothing left on a full disk


def _limit_file_size(limit: int) -> Any:
    def apply() -> None:
        # Writes past `limit` bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ).
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("previous", [False, True])
def test_a_page_that_cannot_be_written_takes_the_child_back(previous: bool, tmp_path: Path) -> None:
    # The issue: `widen ... --html` on a full disk left the child (saved before the page). Sibling:
    # a child from an earlier run at the same path comes back byte for byte.
    onnx.save(small_mlp(), tmp_path / "parent.onnx")
    if previous:
        shutil.copyfile(MODELS / "mlp_tanh.onnx", tmp_path / "child.onnx")
    before = listing(tmp_path)
    # the child (2 KB) fits, the page (12 KB) does not; the old child is a hard link, not a copy
    result = run_cli(["widen", "parent.onnx", "--layer", "fc1", "--width", "12", "-o", "child.onnx",
                      "--html", "page.html"], cwd=tmp_path, preexec_fn=_limit_file_size(8000))
    assert_refused(result, 2, "page.html", "cannot write")
    assert listing(tmp_path) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("previous", [False, True])
def test_a_diff_whose_second_file_fails_leaves_neither(previous: bool, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    # The issue: `diff --html ok.html --model-explorer FULL` left ok.html. Sibling: an ok.html of
    # an earlier run is put back.
    if previous:
        (tmp_path / "ok.html").write_text("an earlier page")
    real = saving._write_bytes

    def full_disk(path: Path, data: bytes) -> None:
        if Path(path).name.startswith(".mapping.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(saving, "_write_bytes", full_disk)
    before = listing(tmp_path)
    args = ["diff", MODELS / "mlp_relu.onnx", MODELS / "mlp_relu.onnx", "--html", tmp_path / "ok.html",
            "--model-explorer", tmp_path / "mapping.json"]
    assert_refused(run_main(args, capfd), 2, "mapping.json", "No space left")
    assert listing(tmp_path) == before
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- every pass on external data


def _external_copy(stem: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx.load(MODELS / f"{stem}.onnx"), folder / "parent.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="parent.onnx.data", size_threshold=0)
    return folder / "parent.onnx"


def _same_outputs(parent: Path, child: Path) -> None:
    """onnxruntime, run here, finds parent and child equal on random inputs (independent of onnxmorph.verify)."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (parent, child)]
    rng = np.random.default_rng(11)
    feed = {}
    for info in sessions[0].get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in info.shape]
        feed[info.name] = rng.uniform(-2, 2, shape).astype(np.float32)
    expected, got = (s.run(None, feed) for s in sessions)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PASSES)
def test_every_pass_morphs_a_model_with_external_data(name: str, tmp_path: Path) -> None:
    # The issue: `block` failed on its own temporary file ("external data without a location"):
    # a small weight read through its external-data reference went out as inline bytes still
    # marked EXTERNAL. Every pass, from the CLI and from the API, on a model whose weights are all
    # in external data.
    stem, step = first_use(name)
    parent = _external_copy(stem, tmp_path / "cli")
    result = run_cli([name, "parent.onnx", "-o", "child.onnx", *cli_flags(step)], cwd=parent.parent)
    assert result.code == 0, result.err
    assert (parent.parent / "child.onnx.data").is_file()  # the child keeps its parent's form
    _same_outputs(parent, parent.parent / "child.onnx")
    # the API: a child in memory whose weights still refer to the parent's file, then saved
    parent = _external_copy(stem, tmp_path / "api")
    child, report = onnxmorph.morph(parent, name, **step.config)
    assert report, str(report)
    onnxmorph.save(child, tmp_path / "api" / "child.onnx")
    assert onnxmorph.verify(parent, tmp_path / "api" / "child.onnx")
    _same_outputs(parent, tmp_path / "api" / "child.onnx")
