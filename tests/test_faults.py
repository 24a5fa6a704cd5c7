"""Faults during a save: interrupts, failing writes, a full disk; the old output or none, never a partial one."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MODELS
from robust_support import PASSES, ROOT, assert_refused, cli_flags, first_use, leftovers, reference, run_cli

import onnxmorph
from onnxmorph.io import loading as mio
from onnxmorph.io import saving, streaming

# --------------------------------------------------------------------------- in-process faults


def _previous(path: Path) -> bytes:
    """Put an earlier output at `path` and return its bytes."""
    onnxmorph.save(reference("mlp_tanh"), path)
    return path.read_bytes()


def _state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("fault", ["disk-full", "interrupt", "exception"])
@pytest.mark.parametrize("previous", [False, True])
def test_a_failing_save_leaves_the_old_file_or_none(
    fault: str, external: bool, previous: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "child.onnx"
    if previous:
        onnxmorph.save(reference("mlp_tanh"), target, external_data=external)
    before = _state(tmp_path)

    def failing_write(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])  # a partial file exists when the fault strikes
        if fault == "disk-full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("a bug while saving")

    monkeypatch.setattr(saving, "_write_bytes", failing_write)
    expected = {"disk-full": onnxmorph.UsageError, "interrupt": KeyboardInterrupt, "exception": RuntimeError}[fault]
    with pytest.raises(expected) as caught:
        onnxmorph.save(reference("mlp_relu"), target, external_data=external)
    if fault == "disk-full":
        assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)
    assert _state(tmp_path) == before
    assert leftovers(tmp_path) == []


def test_a_failing_external_data_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "child.onnx"

    def full_disk(fd: int, data: memoryview, offset: int) -> None:
        os.pwrite(fd, bytes(data[:1000]), offset)  # part of a weight reaches the data file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(streaming, "_pwrite_all", full_disk)
    with pytest.raises(onnxmorph.UsageError, match="No space left"):
        onnxmorph.save(reference("mlp_relu"), target, external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_rename_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "child.onnx"
    old = _previous(target)

    def refuse(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(mio.os, "replace", refuse)
    with pytest.raises(onnxmorph.UsageError, match="cannot write"):
        onnxmorph.save(reference("mlp_relu"), target)
    monkeypatch.undo()
    assert target.read_bytes() == old and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- real processes


# Runs the CLI with the write of the output slowed down: half the bytes, a marker file, a long
# sleep, then the rest. The test kills the process while it sleeps, in the middle of the save.
_SLOW_SAVE_DRIVER = r"""
import os, sys, time
from pathlib import Path
from onnxmorph import cli
from onnxmorph.io import saving
from onnxmorph.io import streaming

marker = Path(os.environ["ONNXMORPH_TEST_MARKER"])
if os.environ.get("ONNXMORPH_TEST_EXTERNAL") == "1":
    saving.EXTERNAL_DATA_THRESHOLD = 0

def slow_write(path, data):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        marker.write_text(str(path))
        time.sleep(120)
        f.write(data[len(data) // 2:])

def slow_pwrite(fd, data, offset):
    # the streaming writers (weights copied file to file) write through this
    os.pwrite(fd, bytes(data[: len(data) // 2]), offset)
    marker.write_text(os.readlink(f"/proc/self/fd/{fd}"))
    time.sleep(120)

saving._write_bytes = slow_write
streaming._pwrite_all = slow_pwrite
sys.exit(cli.main(sys.argv[1:]))
"""


def _start_slow_save(folder: Path, scratch: Path, external: bool) -> tuple[subprocess.Popen, Path]:
    name = PASSES[0]
    stem, step = first_use(name)
    shutil.copyfile(MODELS / f"{stem}.onnx", folder / "parent.onnx")
    marker = scratch / "marker"
    env = dict(os.environ, ONNXMORPH_TEST_MARKER=str(marker), ONNXMORPH_TEST_EXTERNAL="1" if external else "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    args = [name, "parent.onnx", "-o", "child.onnx", "--trials", "1", *cli_flags(step)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE_DRIVER, *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the save never started: {err}")
        time.sleep(0.05)
    return proc, marker


@pytest.mark.parametrize(("sig", "external", "previous"), [
    (signal.SIGINT, False, True),
    (signal.SIGTERM, False, False),
    (signal.SIGINT, True, False),
    (signal.SIGTERM, True, True),
    (signal.SIGHUP, False, True),
    (signal.SIGHUP, True, False),
])
def test_a_process_interrupted_mid_save_leaves_the_old_output_or_none(
    sig: int, external: bool, previous: bool, tmp_path: Path
) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    old = None
    if previous:
        onnxmorph.save(reference("mlp_tanh"), folder / "child.onnx", external_data=external)
        old = _state(folder)
    proc, marker = _start_slow_save(folder, tmp_path, external)
    assert Path(marker.read_text()).exists()  # the partial temporary file is there now
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["onnxmorph: interrupted, nothing written"], err
    after = _state(folder)
    parent = after.pop("parent.onnx")
    assert parent == (MODELS / f"{first_use(PASSES[0])[0]}.onnx").read_bytes()
    assert after == (old or {})
    assert leftovers(folder) == []


def test_a_killed_process_never_leaves_a_partial_output(tmp_path: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    onnxmorph.save(reference("mlp_tanh"), folder / "child.onnx")
    old = (folder / "child.onnx").read_bytes()
    proc, _ = _start_slow_save(folder, tmp_path, external=False)
    proc.kill()  # SIGKILL: no cleanup can run; the rename never happened, so the output is intact
    proc.communicate(timeout=60)
    assert (folder / "child.onnx").read_bytes() == old
    assert onnxmorph.load(folder / "child.onnx")


@pytest.mark.parametrize("previous", [False, True])
def test_a_real_full_disk_is_one_line_and_no_file(previous: bool, tmp_path: Path) -> None:
    name = PASSES[0]
    stem, step = first_use(name)
    shutil.copyfile(MODELS / f"{stem}.onnx", tmp_path / "parent.onnx")
    if previous:
        shutil.copyfile(MODELS / "mlp_tanh.onnx", tmp_path / "child.onnx")
    before = _state(tmp_path)
    limit = (tmp_path / "parent.onnx").stat().st_size // 2

    def limit_file_size() -> None:
        # Writes past `limit` bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ).
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_cli([name, "parent.onnx", "-o", "child.onnx", "--trials", "1", *cli_flags(step)],
                     cwd=tmp_path, preexec_fn=limit_file_size)
    assert_refused(result, 2, "child.onnx", "cannot write")
    assert _state(tmp_path) == before
    assert leftovers(tmp_path) == []


def test_an_external_data_save_that_fails_between_its_two_renames_keeps_the_old_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The weights file is renamed into place first, then the model file: a failure in between must
    # not leave the old model file reading the new weights.
    target = tmp_path / "child.onnx"
    onnxmorph.save(reference("mlp_tanh"), target, external_data=True)
    old = _state(tmp_path)
    real_replace = os.replace

    def fail_on_the_model(src: str, dst: str) -> None:
        if Path(dst).name == "child.onnx":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(mio.os, "replace", fail_on_the_model)
    with pytest.raises(onnxmorph.UsageError):
        onnxmorph.save(reference("mlp_relu"), target, external_data=True)
    monkeypatch.undo()
    assert _state(tmp_path) == old
    assert leftovers(tmp_path) == []
