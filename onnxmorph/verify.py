"""Verification: onnxruntime runs parent and child on the same inputs and compares every output.

Comparison follows Polygraphy's rule: an element fails only when its absolute error exceeds
`atol` *and* its relative error exceeds `rtol`. Default tolerances depend on the output type:

* float32: atol 1e-5, rtol 1e-4. A morph changes the order of float32 sums; each dot product
  of fan-in n then differs by about sqrt(n) * 2**-24 relative to its terms (~1e-6 for n in the
  thousands), and a few such layers stay below 1e-4 relative. A change of one weight tensor by
  0.1% moves outputs by ~1e-3 relative, ten times the tolerance.
* float16 / bfloat16: 1e-2 both (11 and 8 bits of mantissa).
* float64: 1e-9 absolute, 1e-8 relative.
* integer and bool outputs: exact.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from onnxmorph import io as mio
from onnxmorph import limits, saving, streaming
from onnxmorph.errors import InvalidModelError, UnsafeModelError, UsageError, one_line

log = logging.getLogger("onnxmorph")

ModelLike = Union[onnx.ModelProto, str, os.PathLike, "ModelFile"]

DEFAULT_TRIALS = 3
DEFAULT_BATCH = 2
INPUT_RANGE = (-1.0, 1.0)

_TOLERANCES = {
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float16): (1e-2, 1e-2),
    np.dtype(np.float64): (1e-9, 1e-8),
}


def default_tolerances(dtype: np.dtype) -> tuple[float, float]:
    """(atol, rtol) used for an output of `dtype` when the caller gives none."""
    dtype = np.dtype(dtype)
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return (1e-2, 1e-2)
    return (0.0, 0.0)


# --------------------------------------------------------------------------- report


@dataclass
class OutputCheck:
    """Comparison figures of one output over all trials."""

    name: str
    shape: list[int]
    dtype: str
    atol: float
    rtol: float
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    needed_atol: float = 0.0
    needed_rtol: float = 0.0
    mismatched: int = 0
    elements: int = 0
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.mismatched == 0


@dataclass
class Report:
    """The result of a verification: truthy when the child computes the parent's function."""

    outputs: list[OutputCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trials: int = 0
    seed: int = 0
    inputs: dict[str, list[int]] = field(default_factory=dict)
    input_source: str = "random"

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.outputs) and all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def summary(self) -> str:
        """One line: PASS/FAIL with the worst errors or the first problem."""
        if self.passed:
            return (
                f"PASS: {len(self.outputs)} output(s) equal over {self.trials} trial(s) "
                f"(max abs error {_fmt(self.max_abs_error)}, max rel error {_fmt(self.max_rel_error)})"
            )
        if self.problems:
            return f"FAIL: {self.problems[0]}"
        bad = next(o for o in self.outputs if not o.passed)
        if bad.problem:
            return f"FAIL: output '{bad.name}': {bad.problem}"
        return (
            f"FAIL: output '{bad.name}': {bad.mismatched} of {bad.elements} elements differ "
            f"(max abs error {_fmt(bad.max_abs_error)} > atol {_fmt(bad.atol)}, "
            f"max rel error {_fmt(bad.max_rel_error)} > rtol {_fmt(bad.rtol)})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        for out, raw in zip(self.outputs, data["outputs"]):
            raw["passed"] = out.passed
            for key in ("max_abs_error", "max_rel_error", "needed_atol", "needed_rtol"):
                raw[key] = _json_float(raw[key])
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        header = ["output", "shape", "max abs err", "max rel err", "needed atol", "needed rtol",
                  "atol", "rtol", "result"]
        rows = [header]
        for o in self.outputs:
            rows.append([
                o.name, "x".join(map(str, o.shape)) or "scalar", _fmt(o.max_abs_error),
                _fmt(o.max_rel_error), _fmt(o.needed_atol), _fmt(o.needed_rtol), _fmt(o.atol),
                _fmt(o.rtol), "PASS" if o.passed else "FAIL",
            ])
        widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
        lines = [
            f"verification: {'PASS' if self.passed else 'FAIL'} ({self.trials} trial(s), "
            f"seed {self.seed}, inputs: {self.input_source}; an element fails when it exceeds "
            "both atol and rtol)"
        ]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        for o in self.outputs:
            if o.problem:
                lines.append(f"  output '{o.name}': {o.problem}")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.2e}"


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


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
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception as exc:
        raise UsageError(f"input type {onnx.TensorProto.DataType.Name(elem_type)} is not supported") from exc


def _declared_dims(info: onnx.ValueInfoProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def resolve_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Concrete input shapes: declared static dims, then `shapes`, then batch DEFAULT_BATCH."""
    shapes = dict(shapes or {})
    inputs = mio.true_inputs(model)
    names = {i.name for i in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise UsageError(
            f"--shape names input '{unknown[0]}', which the model does not have "
            f"(inputs: {', '.join(sorted(names))})"
        )
    resolved: dict[str, list[int]] = {}
    for info in inputs:
        if not info.type.HasField("tensor_type"):
            raise UsageError(f"input '{info.name}' is not a tensor; verification needs --inputs")
        declared = _declared_dims(info)
        if info.name in shapes:
            given = list(shapes[info.name])
            if len(given) != len(declared) and info.type.tensor_type.HasField("shape"):
                raise UsageError(
                    f"--shape {info.name}: {len(given)} dimensions given, the input has {len(declared)}"
                )
            for axis, (want, have) in enumerate(zip(declared, given)):
                if isinstance(want, int) and want != have:
                    raise UsageError(
                        f"--shape {info.name}: dimension {axis} is fixed at {want}, not {have}"
                    )
            resolved[info.name] = given
            continue
        dims = []
        for axis, d in enumerate(declared):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(DEFAULT_BATCH)
            else:
                raise UsageError(
                    f"input '{info.name}' has a dynamic dimension {d or '?'} at axis {axis}; "
                    f"give its shape with --shape {info.name}:" + "x".join(
                        str(x) if isinstance(x, int) else "N" for x in declared)
                )
        resolved[info.name] = dims
    return resolved


def _integer_bounds(model: onnx.ModelProto, name: str) -> tuple[int, int]:
    """A valid range for an integer input: the table size when it indexes a Gather."""
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
            table = weights.get(node.input[0])
            if table is not None:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                return 0, max(1, int(table.dims[axis]))
    return 0, 10


def random_inputs(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One feed of seeded inputs: floats symmetric around 0, integers in a valid range."""
    feed = {}
    for info in mio.true_inputs(model):
        dtype = _np_dtype(info.type.tensor_type.elem_type)
        shape = tuple(shapes[info.name])
        # A declared or --shape size can be absurd; refuse it rather than let numpy try.
        limits.INPUT_BYTES.check(math.prod(shape) * max(dtype.itemsize, 8),
                                 f"input '{info.name}' of shape {list(shape)}", UnsafeModelError)
        # np.asarray: a 0-d draw is a numpy scalar, which onnxruntime does not take as a tensor.
        if dtype.kind == "f":
            feed[info.name] = np.asarray(rng.uniform(*INPUT_RANGE, size=shape), dtype=dtype)
        elif dtype.kind in "iu":
            low, high = _integer_bounds(model, info.name)
            feed[info.name] = np.asarray(rng.integers(low, high, size=shape), dtype=dtype)
        elif dtype.kind == "b":
            feed[info.name] = np.asarray(rng.random(size=shape) < 0.5)
        else:
            raise UsageError(f"input '{info.name}' of type {dtype} needs --inputs")
    return feed


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
    """Check the model at `path` the way `onnxmorph.io.load_header` does, without reading its weights.

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
    mio.check_header(header, skipped, path)
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


class _Session:
    """An onnxruntime CPU session with graph optimisations off (they could hide a difference)."""

    def __init__(self, model: ModelLike | bytes, role: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4  # its errors come back as exceptions, reported in one line
        self._tmp: tempfile.TemporaryDirectory | None = None
        try:
            if isinstance(model, bytes):
                source: Any = model
            elif isinstance(model, ModelFile):
                # By path: onnxruntime parses the file once and resolves external data beside it.
                source = str(model.path)
            elif isinstance(model, onnx.ModelProto):
                # A model whose weights stay in files is written beside its copies, file to file.
                if mio.approx_size(model) < saving.EXTERNAL_DATA_THRESHOLD and not streaming.streams(model):
                    source = model.SerializeToString()
                else:
                    self._tmp = tempfile.TemporaryDirectory(prefix="onnxmorph-verify-")
                    target = Path(self._tmp.name) / f"{role}.onnx"
                    mio.write_with_external_data(model, target)
                    source = str(target)
            else:
                source = str(model)
            header = model.header if isinstance(model, ModelFile) else None
            if self._tmp is not None or (header is not None and any(True for _ in mio.external_tensors(header))):
                # onnxruntime maps external weights from their files (page-aligned, as onnxmorph writes
                # them) but copies those it prepacks for its kernels: off, they stay mapped (file pages
                # the kernel can drop and share, not a private copy of the model).
                options.add_session_config_entry("session.disable_prepacking", "1")
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            self.close()
            raise _RuntimeProblem(f"onnxruntime cannot load the {role}: {one_line(exc)}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray], role: str) -> list[np.ndarray]:
        try:
            return self.session.run(None, dict(feed))
        except Exception as exc:
            raise _RuntimeProblem(f"onnxruntime cannot run the {role}: {one_line(exc)}") from exc

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class _RuntimeProblem(Exception):
    pass


# --------------------------------------------------------------------------- comparison


def _compare(check: OutputCheck, expected: np.ndarray, actual: np.ndarray) -> None:
    if expected.shape != actual.shape:
        check.problem = f"shape {list(actual.shape)} differs from the parent's {list(expected.shape)}"
        return
    if expected.dtype != actual.dtype:
        check.problem = f"type {actual.dtype} differs from the parent's {expected.dtype}"
        return
    check.elements += expected.size
    if expected.size == 0:
        return
    # flattened: the comparison is per element, and a 0-d array's arithmetic yields numpy scalars
    expected, actual = expected.reshape(-1), actual.reshape(-1)
    if expected.dtype.kind in "fc":
        e = expected.astype(np.float64)
        a = actual.astype(np.float64)
        both_nan = np.isnan(e) & np.isnan(a)
        same_inf = np.isinf(e) & (e == a)
        diff = np.abs(a - e)
        diff[both_nan | same_inf] = 0.0
        diff[np.isnan(diff)] = np.inf
        magnitude = np.abs(e)
        magnitude[np.isnan(magnitude)] = 0.0
    else:
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        magnitude = np.abs(expected.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / magnitude)
    # An infinite difference (NaN or infinity on one side only) fails whatever the tolerance.
    rel[np.isinf(diff) | np.isnan(rel)] = np.inf
    over_abs = diff > check.atol
    over_rel = rel > check.rtol
    check.mismatched += int(np.count_nonzero(over_abs & over_rel))
    check.max_abs_error = max(check.max_abs_error, float(diff.max()))
    check.max_rel_error = max(check.max_rel_error, float(rel.max()))
    if over_rel.any():
        check.needed_atol = max(check.needed_atol, float(diff[over_rel].max()))
    if over_abs.any():
        check.needed_rtol = max(check.needed_rtol, float(rel[over_abs].max()))


def _io_signature(info: onnx.ValueInfoProto) -> tuple[str, int, tuple | None]:
    tt = info.type.tensor_type
    shape = tuple(_declared_dims(info)) if tt.HasField("shape") else None
    return info.name, tt.elem_type, shape


def interface_problems(parent: onnx.ModelProto, child: onnx.ModelProto) -> list[str]:
    """Differences between the parent's and the child's inputs and outputs."""
    problems = []
    for kind, p_list, c_list in (
        ("input", mio.true_inputs(parent), mio.true_inputs(child)),
        ("output", list(parent.graph.output), list(child.graph.output)),
    ):
        p_sig = [_io_signature(i) for i in p_list]
        c_sig = [_io_signature(i) for i in c_list]
        if [s[0] for s in p_sig] != [s[0] for s in c_sig]:
            problems.append(
                f"the child's {kind}s {[s[0] for s in c_sig]} differ from the parent's {[s[0] for s in p_sig]}"
            )
            continue
        for p, c in zip(p_sig, c_sig):
            if p[1] != c[1]:
                problems.append(
                    f"{kind} '{p[0]}': type {onnx.TensorProto.DataType.Name(c[1])} differs from the "
                    f"parent's {onnx.TensorProto.DataType.Name(p[1])}"
                )
            elif p[2] != c[2]:
                problems.append(
                    f"{kind} '{p[0]}': shape {list(c[2] or [])} differs from the parent's {list(p[2] or [])}"
                )
    return problems


def _open(model: ModelLike) -> onnx.ModelProto | ModelFile:
    """A ModelProto as it is; a path read (and its safety checked) without its weights."""
    if isinstance(model, (onnx.ModelProto, ModelFile)):
        return model
    return read_model_file(model, check=False)


def _header(model: onnx.ModelProto | ModelFile) -> onnx.ModelProto:
    return model.header if isinstance(model, ModelFile) else model


class Verifier:
    """Runs a parent once per trial and compares any number of children against it."""

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
    ) -> None:
        if trials < 1:
            raise UsageError(f"trials must be at least 1, not {trials}")
        for label, tol in (("atol", atol), ("rtol", rtol)):
            if tol is not None and not (tol >= 0 and math.isfinite(tol)):
                raise UsageError(f"{label} must be a non-negative number, not {tol}")
        self.atol, self.rtol, self.seed = atol, rtol, seed
        parent = _open(parent)
        self.parent_header = _header(parent)
        if inputs is not None:
            self.feeds = [load_inputs(self.parent_header, inputs)]
            self.input_source = "user's"
        else:
            resolved = resolve_shapes(self.parent_header, shapes)
            self.feeds = [
                random_inputs(self.parent_header, resolved, np.random.default_rng([seed, t]))
                for t in range(trials)
            ]
            self.input_source = f"uniform {list(INPUT_RANGE)}"
        log.info("running the parent (%d trial(s))", len(self.feeds))
        try:
            session = _Session(parent, "parent")
            try:
                self.expected = [session.run(feed, "parent") for feed in self.feeds]
            finally:
                session.close()
        except _RuntimeProblem as exc:
            raise InvalidModelError(str(exc)) from exc
        self.output_names = [o.name for o in self.parent_header.graph.output]
        self.blind_spots = blind_spots(self.feeds, self.expected, self.output_names)
        self.scales = [_output_scale(trial[k] for trial in self.expected) for k in range(len(self.output_names))]

    def check(self, child: ModelLike) -> Report:
        """Compare `child` with the parent on every trial's inputs."""
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
        for name, expected, scale in zip(self.output_names, self.expected[0], self.scales):
            atol, rtol = default_tolerances(expected.dtype)
            report.outputs.append(OutputCheck(
                name=name, shape=list(expected.shape), dtype=str(expected.dtype),
                # The default atol is for outputs of magnitude ~1; rounding grows with the magnitude.
                atol=atol * max(1.0, scale) if self.atol is None else self.atol,
                rtol=rtol if self.rtol is None else self.rtol,
            ))
        log.info("running the child (%d trial(s))", len(self.feeds))
        try:
            session = _Session(source, "child")
        except _RuntimeProblem as exc:
            report.problems.append(str(exc))
            return report
        try:
            for feed, expected in zip(self.feeds, self.expected):
                outputs = dict(zip(session.output_names, session.run(feed, "child")))
                for check, exp in zip(report.outputs, expected):
                    if check.name not in outputs:
                        check.problem = "missing from the child"
                        continue
                    _compare(check, exp, outputs[check.name])
        except _RuntimeProblem as exc:
            report.problems.append(str(exc))
        finally:
            session.close()
        log.info("verified; peak memory of this process so far: %.0f MB", streaming.peak_memory() / 2**20)
        return report


def _output_scale(arrays: Any) -> float:
    """The largest finite magnitude of a float output over the trials (0 for other types)."""
    scale = 0.0
    for array in arrays:
        if array.dtype.kind != "f" or array.size == 0:
            continue
        finite = np.abs(array[np.isfinite(array)])
        if finite.size:
            scale = max(scale, float(finite.max()))
    return scale


def blind_spots(feeds: Sequence[Mapping[str, np.ndarray]], expected: Sequence[Sequence[np.ndarray]],
                output_names: Sequence[str]) -> list[str]:
    """Why these inputs cannot show a difference between two models (empty when they can).

    A verification on such inputs would pass whatever the child computes: an empty input (an
    empty batch), a float input that is all NaN, or a parent output that is empty or all NaN
    on every trial.
    """
    problems = []
    for name, array in feeds[0].items():
        if array.size == 0:
            problems.append(f"input '{name}' is empty (shape {list(array.shape)}): a difference cannot show")
        elif array.dtype.kind == "f" and all(np.isnan(feed[name]).all() for feed in feeds):
            problems.append(f"input '{name}' is all NaN: a difference cannot show")
    for k, name in enumerate(output_names):
        arrays = [trial[k] for trial in expected]
        if all(a.size == 0 for a in arrays):
            problems.append(f"the parent's output '{name}' is empty: a difference cannot show")
        elif all(a.dtype.kind in "fc" and np.isnan(a).all() for a in arrays):
            problems.append(f"the parent's output '{name}' is all NaN on these inputs: a difference cannot show")
    return problems


def verify(
    parent: ModelLike,
    child: ModelLike,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
) -> Report:
    """Run `parent` and `child` in onnxruntime on the same inputs and compare their outputs.

    Models are ModelProtos, paths or `ModelFile`s (see `read_model_file`). A path is checked for
    safety from its header, its weights never read into Python, and handed to onnxruntime as it
    is. Returns a Report, truthy when every output of the child equals the parent's within
    tolerance and the child keeps the parent's interface.
    """
    verifier = Verifier(parent, atol=atol, rtol=rtol, trials=trials, seed=seed, shapes=shapes, inputs=inputs)
    return verifier.check(child)
