"""Helpers of the robustness tests: run the CLI, build broken models, find where each pass applies."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import MODELS, REFERENCE_MODELS
from onnx import TensorProto, helper, numpy_helper

import onnxmorph
from onnxmorph import cli
from onnxmorph.contract.passinfra import MorphPass, layer_name
from onnxmorph.contract.registry import REGISTRY
from onnxmorph.graph import core as mgraph

ROOT = Path(__file__).resolve().parent.parent

# Passes registered when the tests were collected: tests parametrize over these, so a pass that
# lands later is covered without editing the tests.
PASSES = sorted(REGISTRY)


@dataclass
class Outcome:
    """Exit code and output of one CLI run."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 120, **kwargs: Any) -> Outcome:
    """`python -m onnxmorph ARGS` in a real subprocess with `cwd` as current directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxmorph", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


_BATCH_DRIVER = r"""
import json, os, sys
from onnxmorph import cli
runs, report = json.loads(sys.argv[1]), sys.argv[2]
results = []
for k, argv in enumerate(runs):
    paths = [f"{report}.{k}.out", f"{report}.{k}.err"]
    saved = [os.dup(1), os.dup(2)]
    for fd, path in zip((1, 2), paths):
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    sys.stdout.flush(); sys.stderr.flush()
    for fd, old in zip((1, 2), saved):
        os.dup2(old, fd)
    texts = [open(p).read() for p in paths]
    for p in paths:
        os.unlink(p)
    results.append([code, *texts])
with open(report, "w") as f:
    json.dump(results, f)
"""


def run_cli_batch(runs: Sequence[Sequence[Any]], cwd: Path, report: Path, timeout: float = 120) -> list[Outcome]:
    """Several CLI runs in ONE real subprocess (one interpreter start-up), each with its own stdout/stderr.

    `report` is a scratch path outside the folders under test.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    argv = json.dumps([[str(a) for a in run] for run in runs])
    proc = subprocess.run([sys.executable, "-c", _BATCH_DRIVER, argv, str(report)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(report.read_text())
    report.unlink()
    return [Outcome(code, out, err) for code, out, err in results]


def run_main(args: Sequence[str], capfd: pytest.CaptureFixture[str]) -> Outcome:
    """cli.main(ARGS) in this process (fast), with the file descriptors captured.

    Any exception escaping main() fails the test, which is what a traceback would be.
    """
    capfd.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return Outcome(code, out, err)


def assert_refused(result: Outcome, code: int = 2, *needles: str) -> str:
    """One clear line on stderr, no traceback, the given exit code; returns the line."""
    assert "Traceback" not in result.err, result.err
    assert result.code == code, (result.code, result.err, result.out[-500:])
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("onnxmorph"), line
    assert "internal error" not in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    return line


def listing(folder: Path) -> dict[str, Any]:
    """Every file under `folder` with its content (to show that nothing was written or changed).

    Files over 64 MiB (sparse test files) are represented by their size and modification time.
    """
    found: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_fifo():
            stat = path.stat()
            key = str(path.relative_to(folder))
            found[key] = path.read_bytes() if stat.st_size <= 2**26 else (stat.st_size, stat.st_mtime_ns)
    return found


def leftovers(folder: Path) -> list[str]:
    """Temporary files of an atomic save (`.NAME.*.tmp`) still present under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


# --------------------------------------------------------------------------- where passes apply


@functools.cache
def _loaded(stem: str) -> onnx.ModelProto:
    return onnxmorph.load(MODELS / f"{stem}.onnx", normalize_model=True)


def reference(stem: str) -> onnx.ModelProto:
    return _loaded(stem)


def applicable(name: str, model: onnx.ModelProto, limit: int | None = None) -> list[MorphPass]:
    """Instances of pass `name` that pass `requires` on `model`.

    Proposed by the pass's probe, layer by layer; a pass without a probe that names two layers
    (a skip from A to B) gets pairs of layer outputs, earlier to later, with its other parameters
    at their defaults (or their first choice).
    """
    cls = REGISTRY[name]
    layers = mgraph.layers(mgraph.read_view(model))
    candidates: list[Any] = [(cls.probe, info) for info in layers]
    targets = layer_params(cls)
    if len(targets) == 2:
        others = {p.name: p.choices[0] for p in cls.params if p.required and p.choices}
        outputs = [info.output for info in layers][:8]
        pairs = [(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1:]]
        candidates += [(None, {targets[0]: a, targets[1]: b, **others}) for a, b in pairs]
    found = []
    for probe, arg in candidates:
        try:
            step = probe(model, arg) if probe is not None else cls(**arg)
            if step is None:
                continue
            step.requires(model)
        except onnxmorph.OnnxMorphError:
            continue
        found.append(step)
        if limit is not None and len(found) >= limit:
            break
    return found


@functools.cache
def first_use(name: str) -> tuple[str, MorphPass]:
    """The first reference model (smallest first) and a probed instance of `name` that applies to it."""
    stems = sorted(REFERENCE_MODELS, key=lambda s: (MODELS / f"{s}.onnx").stat().st_size)
    for stem in stems:
        steps = applicable(name, reference(stem), limit=1)
        if steps:
            return stem, steps[0]
    raise AssertionError(f"pass '{name}' applies to no layer of any reference model")


def cli_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def cli_flags(step: MorphPass, **override: Any) -> list[str]:
    """The command-line flags that reproduce `step` (values in `override` replace its own)."""
    config = {**step.config, **override}
    flags: list[str] = []
    for p in step.params:
        value = config.get(p.name)
        if value is None:
            continue
        flags += [p.cli_flag, cli_value(value)]
    return flags


def layer_params(cls: type[MorphPass]) -> list[str]:
    """Names of the parameters of `cls` that name a layer."""
    return [p.name for p in cls.params if p.parse is layer_name]


# --------------------------------------------------------------------------- broken models


def _value(name: str, shape: Sequence[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def small_mlp(width: int = 8) -> onnx.ModelProto:
    """x[N,8] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> y[N,4]: three MatMul+Add layers, own weights."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    previous, dims = "x", [8, width, width, 4]
    for k in range(3):
        w = numpy_helper.from_array(rng.normal(0, 0.5, (dims[k], dims[k + 1])).astype(np.float32), f"W{k + 1}")
        b = numpy_helper.from_array(rng.normal(0, 0.1, dims[k + 1]).astype(np.float32), f"B{k + 1}")
        inits += [w, b]
        nodes.append(helper.make_node("Gemm", [previous, w.name, b.name], [f"h{k + 1}"], name=f"fc{k + 1}"))
        previous = f"h{k + 1}"
        if k < 2:
            nodes.append(helper.make_node("Relu", [previous], [f"r{k + 1}"], name=f"relu{k + 1}"))
            previous = f"r{k + 1}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [_value("x", ["N", 8])], [_value("y", ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def small_cnn(shared: bool = False, computed: bool = False) -> onnx.ModelProto:
    """x[N,4,8,8] -> conv1 -> Relu -> conv2 -> Relu -> conv3 -> y; 4 channels, 3x3 kernels, pads 1.

    `shared`: conv2 and conv3 use the same weight tensor. `computed`: conv2's weight is the
    sum of two constants (an Add node), so it is not a constant.
    """
    rng = np.random.default_rng(1)
    inits, nodes = [], []
    weights = {}
    for k in (1, 2, 3):
        weights[k] = numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"W{k}")
        inits.append(weights[k])
    names = {1: "W1", 2: "W2", 3: "W3"}
    if shared:
        names[3] = "W2"
        inits = [t for t in inits if t.name != "W3"]
    if computed:
        inits.append(numpy_helper.from_array(np.zeros((4, 4, 3, 3), np.float32), "W2_delta"))
        nodes.append(helper.make_node("Add", ["W2", "W2_delta"], ["W2_sum"], name="w2_sum"))
        names[2] = "W2_sum"
    previous = "x"
    for k in (1, 2, 3):
        out = "y" if k == 3 else f"h{k}"
        nodes.append(helper.make_node("Conv", [previous, names[k]], [out], name=f"conv{k}", pads=[1, 1, 1, 1]))
        previous = out
        if k < 3:
            nodes.append(helper.make_node("Relu", [out], [f"r{k}"], name=f"relu{k}"))
            previous = f"r{k}"
    graph = helper.make_graph(nodes, "cnn", [_value("x", ["N", 4, 8, 8])], [_value("y", ["N", 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def small_mlp_matmul(shared: bool = False, computed: bool = False) -> onnx.ModelProto:
    """The MatMul twin of small_cnn: x[N,8] -> fc1 -> Relu -> fc2 -> Relu -> fc3 -> y[N,8]."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), f"W{k}") for k in (1, 2, 3)]
    names = {1: "W1", 2: "W2", 3: "W3"}
    nodes = []
    if shared:
        names[3] = "W2"
        inits = inits[:2]
    if computed:
        inits.append(numpy_helper.from_array(np.zeros((8, 8), np.float32), "W2_delta"))
        nodes.append(helper.make_node("Add", ["W2", "W2_delta"], ["W2_sum"], name="w2_sum"))
        names[2] = "W2_sum"
    previous = "x"
    for k in (1, 2, 3):
        out = "y" if k == 3 else f"h{k}"
        nodes.append(helper.make_node("MatMul", [previous, names[k]], [out], name=f"fc{k}"))
        previous = out
        if k < 3:
            nodes.append(helper.make_node("Relu", [out], [f"r{k}"], name=f"relu{k}"))
            previous = f"r{k}"
    graph = helper.make_graph(nodes, "mlp", [_value("x", ["N", 8])], [_value("y", ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def no_layer_model() -> onnx.ModelProto:
    """A valid model without any Conv/Gemm/MatMul: nothing to morph."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Tanh", ["r"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "plain", [_value("x", ["N", 8])], [_value("y", ["N", 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def checker_failing_model() -> onnx.ModelProto:
    """Parses as ONNX but fails onnx.checker: a node reads a tensor nothing produces."""
    model = small_mlp()
    model.graph.node[0].input[0] = "nowhere"
    return model


def write_broken_files(folder: Path) -> dict[str, Path]:
    """Every kind of unreadable model file, by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    good = (MODELS / "mlp_relu.onnx").read_bytes()
    files = {
        "missing": folder / "missing.onnx",
        "empty": folder / "empty.onnx",
        "random": folder / "random.onnx",
        "truncated": folder / "truncated.onnx",
        "checker": folder / "checker.onnx",
        "folder": folder / "a_folder.onnx",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["checker"].write_bytes(checker_failing_model().SerializeToString())
    files["folder"].mkdir(exist_ok=True)
    return files


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[Path]:
    """`folder` made unwritable for this process (even as root, via the immutable attribute)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):  # root ignores modes
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
            immutable = done.returncode == 0
        if os.access(folder, os.W_OK):
            # No way to take write access away here: sysfs refuses new files even to root.
            yield Path("/sys")
        else:
            yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)
