"""Verification: onnxruntime runs parent and child on the same inputs and compares every output.

The report and the comparison rule (Polygraphy's, with the default tolerances) are in
`onnxmorph.verification.report`; the inputs are drawn as `onnxmorph.verification.feeds` says.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from onnxmorph import limits
from onnxmorph.errors import InvalidModelError, UsageError, one_line
from onnxmorph.io import casting, saving, streaming
from onnxmorph.io import loading as mio
from onnxmorph.verification import DEFAULT_TRIALS as DEFAULT_TRIALS
from onnxmorph.verification import feeds, regions
from onnxmorph.verification.interface import interface_problems  # noqa: F401  (re-exported)
from onnxmorph.verification.report import (  # noqa: F401  (re-exported)
    OutputCheck,
    Report,
    blind_spots,
    compare,
    default_tolerances,
    output_scale,
)
from onnxmorph.verification.runtime import RuntimeProblem, Session, missing_kernel

log = logging.getLogger("onnxmorph")

ModelLike = Union[onnx.ModelProto, str, os.PathLike, "ModelFile"]

DEFAULT_BATCH = feeds.DEFAULT_BATCH
INPUT_RANGE = feeds.INPUT_RANGE


# --------------------------------------------------------------------------- inputs


def parse_shape(text: str) -> tuple[str, list[int]]:
    """`name:1x3x32x32` -> ("name", [1, 3, 32, 32]). The name may itself contain colons."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise UsageError(f"--shape {text!r}: expected NAME:DIMS, e.g. input:1x3x32x32")
    try:
        values = [int(d) for d in dims.lower().split("x")] if dims else []
    except ValueError:
        raise UsageError(f"--shape {text!r}: dimensions must be whole numbers like 1x3x32x32") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"--shape {text!r}: dimensions must be positive")
    return name, values


def _np_dtype(elem_type: int) -> np.dtype:
    return feeds.np_dtype(elem_type)


def _declared_dims(info: onnx.ValueInfoProto) -> list[int | str | None]:
    return feeds.declared_dims(info)


def resolve_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Concrete input shapes: declared static dims, then `shapes`, then the defaults `feeds` states."""
    return feeds.resolve_shapes(model, shapes)


def _integer_bounds(model: onnx.ModelProto, name: str) -> tuple[int, int]:
    """A valid range for an integer input: the table size when it indexes a Gather (also through Reshape/Cast)."""
    return feeds.integer_bounds(model, name)


def random_inputs(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One feed of seeded inputs: floats symmetric around 0, token ids in their vocabulary, masks of ones."""
    return feeds.random_inputs(model, shapes, rng)


def load_inputs(model: onnx.ModelProto, source: str | os.PathLike | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The user's inputs (an .npz path or a dict), checked against the model's inputs."""
    label = str(source) if not isinstance(source, Mapping) else "inputs"
    if isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
    else:
        arrays = _read_npz(Path(source), [i.name for i in mio.true_inputs(model)])
    inputs = mio.true_inputs(model)
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "nothing"
        raise UsageError(f"{label}: no array for input '{missing[0]}' (it has: {have})")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise UsageError(f"{label}: array '{extra[0]}' matches no input (inputs: {', '.join(names)})")
    feed = {}
    for info in inputs:
        array = arrays[info.name]
        declared = _declared_dims(info)
        if info.type.tensor_type.HasField("shape") and len(declared) != array.ndim:
            raise UsageError(
                f"{label}: '{info.name}' has {array.ndim} dimensions, the input has {len(declared)}"
            )
        for axis, (want, have) in enumerate(zip(declared, array.shape)):
            if isinstance(want, int) and want != have:
                raise UsageError(
                    f"{label}: '{info.name}' has size {have} at axis {axis}, the input needs {want}"
                )
        dtype = _np_dtype(info.type.tensor_type.elem_type)
        if array.dtype != dtype:
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise UsageError(f"{label}: '{info.name}' is {array.dtype}, the input needs {dtype}")
            array = array.astype(dtype)
        feed[info.name] = array
    return feed


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} from the .npy headers inside an .npz, nothing decompressed but them."""
    members = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member '{limits.quote(info.filename, 80)}' is not an .npy array")
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError(f"array '{limits.quote(info.filename[:-4], 80)}' holds Python objects")
            members[info.filename[:-4]] = (tuple(shape), dtype)
    return members


def _read_npz(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of an .npz, after checking their names and declared sizes (an .npz can be a bomb)."""
    label = f"--inputs {limits.quote(path)}"
    if not path.is_file():
        raise UsageError(f"{label}: no such file")
    try:
        members = _npz_members(path)
    except Exception as exc:
        raise UsageError(f"{label}: not a readable .npz file ({one_line(exc)})") from exc
    missing = [n for n in names if n not in members]
    if missing:
        have = ", ".join(limits.quote(k, 60) for k in sorted(members)[:10]) or "nothing"
        raise UsageError(f"{label}: no array for input '{missing[0]}' (it has: {have})")
    extra = sorted(set(members) - set(names))
    if extra:
        raise UsageError(f"{label}: array '{limits.quote(extra[0], 60)}' matches no input (inputs: {', '.join(names)})")
    declared = sum(math.prod(shape) * dtype.itemsize for shape, dtype in members.values())
    limits.INPUT_BYTES.check(declared, label)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise UsageError(f"{label}: not a readable .npz file ({one_line(exc)})") from exc


# --------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class ModelFile:
    """A model file checked from its header; onnxruntime loads it by path, Python never holds its weights.

    `header` is the model with every main-graph weight of at least `framing.SKIPPED_BYTES` bytes left
    without data (its dims kept): enough for the interface, the inputs and the safety checks.
    """

    path: Path
    header: onnx.ModelProto
    checked: bool = False  # onnx.checker passed
    # {index in header.graph.initializer: bytes of raw data left out}
    skipped: Mapping[int, int] = field(default_factory=dict, compare=False, hash=False)

    def check(self) -> None:
        """onnx.checker on the header, left-out and external weights standing in as empty tensors.

        Their sizes and locations were checked by `read_model_file`; the checker needs the
        weights only to compare their byte counts with their dims.
        """
        mio.check(_checkable(self.header, self.skipped), name=str(self.path))


def read_model_file(path: str | os.PathLike, *, check: bool = True) -> ModelFile:
    """Check the model at `path` the way `onnxmorph.io.loading.load_header` does, without reading its weights.

    Refused with one line (InvalidModelError / UnsafeModelError), before anything large is read
    or allocated: a missing, empty or non-ONNX file, one larger than `io.memory_limit()`,
    external data outside the model's folder, missing or shorter than declared, tensors whose
    data does not match their dims, declared sizes beyond the memory limit; with `check`, a
    model that fails onnx.checker. Parsing the whole file in Python (and again in onnx.checker)
    cost more than onnxruntime's own load; this reads the protobuf framing and skips the bytes
    of large weights, so it touches a few pages of the file.
    """
    path = Path(path)
    mio.check_model_path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            header, skipped = mio.read_framing(data)
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # malformed framing, or protobuf's DecodeError on the header
        raise InvalidModelError(f"{path}: not an ONNX model ({one_line(exc)})") from exc
    mio.check_header(header, skipped, path, in_memory=False)  # onnxruntime maps the weights from their files
    model_file = ModelFile(path=path, header=header, skipped=skipped)
    if check:
        model_file.check()
        model_file = ModelFile(path=path, header=header, checked=True, skipped=skipped)
    return model_file


def _checkable(header: onnx.ModelProto, skipped: Mapping[int, int]) -> onnx.ModelProto:
    """A copy of `header` that onnx.checker accepts: skipped and external weights become empty tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(header)
    stubs = [t for k, t in enumerate(out.graph.initializer) if k in skipped]
    stubs += [t for t in mio.all_tensors(out) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in stubs:
        del tensor.dims[:]
        tensor.dims.append(0)
        del tensor.external_data[:]
        tensor.ClearField("data_location")
    return out


# --------------------------------------------------------------------------- sessions

# The runtime's sessions (re-exported under their former names).
_Session = Session
_RuntimeProblem = RuntimeProblem

METHODS = ("auto", "outputs", "regions")


def model_bytes(model: onnx.ModelProto | ModelFile) -> int:
    """The bytes of a model's weights, from its header (skipped and external weights included)."""
    if isinstance(model, ModelFile):
        header = model.header
        total = sum(model.skipped.values())
        total += sum(int({e.key: e.value for e in t.external_data}.get("length") or 0)
                     for t in mio.external_tensors(header))
        return total + header.ByteSize()
    return mio.approx_size(model)


def verification_budget() -> int:
    """Bytes a model may have for onnxruntime to run it whole (ONNXMORPH_MAX_MODEL_BYTES: half the memory)."""
    return mio.memory_limit()


def fits(model: onnx.ModelProto | ModelFile) -> bool:
    """Whether running `model` whole fits the verification budget (a float32 copy counts twice for 16-bit floats)."""
    factor = 2 if casting.half_float_types(_header(model)) else 1
    return model_bytes(model) * factor <= verification_budget()


# --------------------------------------------------------------------------- comparison


def _open(model: ModelLike) -> onnx.ModelProto | ModelFile:
    """A ModelProto as it is; a path read (and its safety checked) without its weights."""
    if isinstance(model, (onnx.ModelProto, ModelFile)):
        return model
    return read_model_file(model, check=False)


def _header(model: onnx.ModelProto | ModelFile) -> onnx.ModelProto:
    return model.header if isinstance(model, ModelFile) else model


class Verifier:
    """Runs a parent once per trial and compares any number of children against it.

    `method` says how: `outputs` runs both models whole and compares their outputs; `regions`
    compares the two graphs and checks each changed region (onnxmorph.verification.regions),
    never running a model whole; `auto` (the default) runs them whole when each fits the
    verification budget (`verification_budget`) and checks by regions otherwise. A model of
    16-bit floats that onnxruntime has no CPU kernels for is run as a float32 copy (the report
    says so in `computed_in`).
    """

    def __init__(
        self,
        parent: ModelLike,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        trials: int = DEFAULT_TRIALS,
        seed: int = 0,
        shapes: Mapping[str, Sequence[int]] | None = None,
        inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
        method: str = "auto",
    ) -> None:
        if trials < 1:
            raise UsageError(f"trials must be at least 1, not {trials}")
        for label, tol in (("atol", atol), ("rtol", rtol)):
            if tol is not None and not (tol >= 0 and math.isfinite(tol)):
                raise UsageError(f"{label} must be a non-negative number, not {tol}")
        if method not in METHODS:
            raise UsageError(f"verification method must be one of {', '.join(METHODS)}, not {method!r}")
        self.atol, self.rtol, self.seed, self.method = atol, rtol, seed, method
        parent = _open(parent)
        self.parent = parent
        self.parent_header = _header(parent)
        if inputs is not None:
            self.feeds = [load_inputs(self.parent_header, inputs)]
            self.input_source = "user's"
        else:
            resolved = resolve_shapes(self.parent_header, shapes)
            draws = feeds.input_draws(self.parent_header)
            self.feeds = [
                feeds.random_inputs(self.parent_header, resolved, np.random.default_rng([seed, t]), draws)
                for t in range(trials)
            ]
            self.input_source = feeds.describe_inputs(self.parent_header, resolved, draws)
        self.output_names = [o.name for o in self.parent_header.graph.output]
        # what onnxruntime runs instead of the models, when it has no kernels for their 16-bit floats
        self.float32 = ""
        self.expected: list[list[np.ndarray]] | None = None
        self.blind_spots = blind_spots(self.feeds, [[] for _ in self.feeds], [])
        self.scales: list[float] = []
        if method == "outputs" or (method == "auto" and fits(parent)):
            self._run_parent()

    def _half(self) -> str:
        names = sorted(onnx.TensorProto.DataType.Name(t).lower() for t in casting.half_float_types(self.parent_header))
        return f"the model computes in {' and '.join(names) or '16-bit floats'}"

    def _run_parent(self) -> None:
        log.info("running the parent (%d trial(s))", len(self.feeds))
        while True:
            try:
                session = Session(_runnable(self.parent), "parent", float32=bool(self.float32))
                try:
                    self.expected = [session.run(feed, "parent") for feed in self.feeds]
                finally:
                    session.close()
                break
            except RuntimeProblem as exc:
                if self.float32 or not missing_kernel(exc):
                    raise InvalidModelError(str(exc)) from exc
                self.float32 = f"float32 copies of both models ({self._half()}: {_missing(exc)})"
        self.blind_spots = blind_spots(self.feeds, self.expected, self.output_names)
        self.scales = [output_scale(trial[k] for trial in self.expected) for k in range(len(self.output_names))]

    def check(self, child: ModelLike) -> Report:
        """Compare `child` with the parent on every trial's inputs (by regions where the method says so)."""
        report = Report(
            trials=len(self.feeds),
            seed=self.seed,
            inputs={k: list(v.shape) for k, v in self.feeds[0].items()},
            input_source=self.input_source,
        )
        child = _open(child)
        report.problems.extend(interface_problems(self.parent_header, _header(child)))
        # One serialisation serves both onnx.checker and onnxruntime (each costs seconds at 500 MB).
        source: ModelLike | bytes = child
        try:
            if isinstance(child, onnx.ModelProto):
                if mio.approx_size(child) < saving.EXTERNAL_DATA_THRESHOLD and not streaming.streams(child):
                    source = child.SerializeToString()
                mio.check(source if isinstance(source, bytes) else child, name="child")
            elif not child.checked:
                child.check()
        except InvalidModelError as exc:
            report.problems.append(str(exc))
        report.problems.extend(self.blind_spots)
        whole = self.method == "outputs" or (self.method == "auto" and self.expected is not None and fits(child))
        if not whole:
            return self._check_regions(child, report)
        if self.expected is None:
            self._run_parent()
        assert self.expected is not None
        self._expect_outputs(report)
        log.info("running the child (%d trial(s))", len(self.feeds))
        try:
            outputs = self._run_child(source)
        except RuntimeProblem as exc:
            report.problems.append(str(exc))
            return report
        for feed_outputs, expected in zip(outputs, self.expected):
            for check, exp in zip(report.outputs, expected):
                if check.name not in feed_outputs:
                    check.problem = "missing from the child"
                    continue
                compare(check, exp, feed_outputs[check.name])
        report.computed_in = self.float32
        log.info("verified; peak memory of this process so far: %.0f MB", streaming.peak_memory() / 2**20)
        return report

    def _expect_outputs(self, report: Report) -> None:
        assert self.expected is not None
        declared = {o.name: o.type.tensor_type.elem_type for o in self.parent_header.graph.output}
        for name, expected, scale in zip(self.output_names, self.expected[0], self.scales):
            dtype = expected.dtype
            if self.float32 and declared.get(name) in casting.HALF_FLOATS:  # compared as the model's own type
                dtype = feeds.np_dtype(declared[name], name)
            atol, rtol = default_tolerances(dtype)
            report.outputs.append(OutputCheck(
                name=name, shape=list(expected.shape), dtype=str(dtype),
                # The default atol is for outputs of magnitude ~1; rounding grows with the magnitude.
                atol=atol * max(1.0, scale) if self.atol is None else self.atol,
                rtol=rtol if self.rtol is None else self.rtol,
            ))

    def _run_child(self, source: ModelLike | bytes) -> list[dict[str, np.ndarray]]:
        """The child's outputs per trial; a child that needs float32 where the parent did not re-runs the parent so."""
        try:
            session = Session(_runnable(source), "child", float32=bool(self.float32))
        except RuntimeProblem as exc:
            if self.float32 or not missing_kernel(exc):
                raise
            self.float32 = f"float32 copies of both models ({self._half()}: for the child, {_missing(exc)})"
            self._run_parent()
            session = Session(_runnable(source), "child", float32=True)
        try:
            return [dict(zip(session.output_names, session.run(feed, "child"))) for feed in self.feeds]
        finally:
            session.close()

    def _check_regions(self, child: onnx.ModelProto | ModelFile, report: Report) -> Report:
        report.method = "regions"
        parent_model = _references(self.parent)
        child_model = _references(child)
        log.info("verifying by regions (the models are not run whole)")
        float32 = regions.verify_regions(parent_model, child_model, self.feeds, report, atol=self.atol,
                                         rtol=self.rtol, seed=self.seed, float32=bool(self.float32))
        if float32:
            report.computed_in = self.float32 or (f"float32 copies of the regions ({self._half()}: onnxruntime "
                                                  "lacks CPU kernels for it)")
        log.info("verified by regions; peak memory of this process so far: %.0f MB",
                 streaming.peak_memory() / 2**20)
        return report


def _missing(exc: BaseException) -> str:
    """The kernel onnxruntime said it lacks, in a few words."""
    text = one_line(exc)
    found = text.find("Could not find an implementation for ")
    if found >= 0:
        return "onnxruntime has no CPU kernel for " + text[found + 37:].split(" node with name")[0]
    return "onnxruntime lacks a kernel: " + text[:160]


def _runnable(model: ModelLike | bytes) -> onnx.ModelProto | bytes | Path:
    """What a Session takes: a checked file by its path, anything else as it is."""
    return model.path if isinstance(model, ModelFile) else model


def _references(model: onnx.ModelProto | ModelFile) -> onnx.ModelProto:
    """The model with its weights as references into their files (read for regions, never loaded whole)."""
    return mio.references(model.path) if isinstance(model, ModelFile) else model


def verify(parent: ModelLike, child: ModelLike, **options: Any) -> Report:
    """Run `parent` and `child` in onnxruntime on the same inputs and compare their outputs.

    `options` are those of `Verifier` (atol, rtol, trials, seed, shapes, inputs, method). Models are
    ModelProtos, paths or `ModelFile`s (see `read_model_file`). A path is checked for safety
    from its header, its weights never read into Python, and handed to onnxruntime as it is.
    Returns a Report, truthy when every output of the child equals the parent's within
    tolerance and the child keeps the parent's interface.
    """
    return Verifier(parent, **options).check(child)
