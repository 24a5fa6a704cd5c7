"""Data for a search: a shipped experiment's data set by name or arrays in an .npz, checked and shaped for the model."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxmorph.errors import UsageError
from onnxmorph.io import loading as mio

REQUIRED_KEYS = ("x_train", "y_train", "x_val", "y_val")
OPTIONAL_KEYS = ("x_test", "y_test")
NAMED = ("digits",)
# Validation images held out of the digits training split (stratified, fixed seed); the
# experiment's 500 test images stay a test set that the search never selects on.
DIGITS_VAL = 300
SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """Training, validation and (optional) test arrays; `task` is classification (integer labels) or regression."""

    name: str
    fingerprint: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        sizes = {"train": len(self.x_train), "val": len(self.x_val)}
        if self.x_test is not None:
            sizes["test"] = len(self.x_test)
        return {"name": self.name, "fingerprint": self.fingerprint, "task": self.task, "samples": sizes,
                "sample_shape": list(self.x_train.shape[1:])}


def load_dataset(spec: str | Path | Dataset) -> Dataset:
    """`digits` (scikit-learn's bundled set, as the digits experiment splits it) or the path of an .npz."""
    if isinstance(spec, Dataset):
        return spec
    if str(spec) in NAMED:
        return _digits()
    path = Path(spec)
    if path.suffix != ".npz":
        raise UsageError(f"--data {spec}: give a data set name ({', '.join(NAMED)}) or an .npz file")
    return _from_npz(path)


def _digits() -> Dataset:
    try:
        from sklearn.model_selection import train_test_split

        from onnxmorph.experiments.digits import load_data
    except ImportError as exc:
        raise UsageError(f"--data digits needs scikit-learn ({exc.name} is missing): "
                         "pip install 'onnxmorph[train]'") from None
    x_rest, x_test, y_rest, y_test = load_data()
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=DIGITS_VAL,
                                                      random_state=SPLIT_SEED, stratify=y_rest)
    fingerprint = (f"digits: scikit-learn load_digits, experiment split (test {len(x_test)}), "
                   f"validation {DIGITS_VAL} held out of its training images, seed {SPLIT_SEED}")
    return Dataset("digits", fingerprint, "classification", x_train, y_train, x_val, y_val, x_test, y_test)


def _from_npz(path: Path) -> Dataset:
    where = f"--data {path}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info.file_size for info in archive.infolist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{where}: not an .npz archive ({exc})") from None
    names = {m[:-4] if m.endswith(".npy") else m for m in members}
    missing = [k for k in REQUIRED_KEYS if k not in names]
    unknown = sorted(names - set(REQUIRED_KEYS + OPTIONAL_KEYS))
    if missing or unknown:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown array(s) {', '.join(unknown)}"
        raise UsageError(f"{where}: {problem}; an .npz for search holds x_train, y_train, x_val, y_val "
                         "(and optionally x_test, y_test)")
    if ("x_test" in names) != ("y_test" in names):
        raise UsageError(f"{where}: x_test and y_test go together")
    # Sizes come from the archive's directory, before anything is decompressed.
    if sum(members.values()) > mio.memory_limit() // 2:
        raise UsageError(f"{where}: its arrays ({sum(members.values()) / 2**30:.1f} GiB) exceed a quarter "
                         "of this machine's memory")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in sorted(names)}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{where}: cannot read its arrays ({str(exc).splitlines()[0]})") from None
    task = _check_arrays(arrays, where)
    fingerprint = f"{path.name} sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return Dataset(path.name, fingerprint, task, **arrays)


def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> str:
    """The task the labels imply; refuses wrong types, shapes, lengths and non-finite values."""
    for split in ("train", "val", "test"):
        x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if x is None:
            continue
        if x.dtype.kind not in "fiu" or x.ndim < 2 or len(x) == 0:
            raise UsageError(f"{where}: x_{split} must be a non-empty numeric array of shape [samples, ...], "
                             f"got {x.dtype} {list(x.shape)}")
        if x.shape[1:] != arrays["x_train"].shape[1:]:
            raise UsageError(f"{where}: x_{split} has samples of shape {list(x.shape[1:])}, x_train "
                             f"{list(arrays['x_train'].shape[1:])}")
        if y.dtype.kind not in "fiu" or y.ndim < 1 or len(y) != len(x):
            raise UsageError(f"{where}: y_{split} must be numeric with one entry per sample of x_{split} "
                             f"({len(x)}), got {y.dtype} {list(y.shape)}")
        if y.dtype.kind != arrays["y_train"].dtype.kind:
            raise UsageError(f"{where}: y_{split} is {y.dtype} but y_train {arrays['y_train'].dtype}; "
                             "integer labels (classification) or floats (regression) throughout")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise UsageError(f"{where}: x_{split} or y_{split} holds NaN or infinite values")
    if arrays["y_train"].dtype.kind in "iu":
        for key in ("y_train", "y_val", "y_test"):
            y = arrays.get(key)
            if y is not None and (y.ndim != 1 or y.min() < 0):
                raise UsageError(f"{where}: {key}: integer labels must be one class index >= 0 per sample")
        return "classification"
    return "regression"


def fit_to_model(data: Dataset, model: onnx.ModelProto) -> Dataset:
    """`data` with x shaped and typed as the model's input and the labels checked against its output."""
    inputs = mio.true_inputs(model)
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise UsageError(f"a search trains models with one input; this one has {len(inputs)}")
    sample = _static_dims(inputs[0], "input")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
    if dtype.kind != "f":
        raise UsageError(f"the model's input '{inputs[0].name}' is {dtype}; a search feeds it float data")
    have = data.x_train.shape[1:]
    if sample is not None and tuple(have) != tuple(sample):
        if int(np.prod(have)) != int(np.prod(sample)):
            raise UsageError(f"--data {data.name}: samples of shape {list(have)} do not fit the model's input "
                             f"'{inputs[0].name}' of shape [N, {', '.join(map(str, sample))}]")
    shaped = {}
    for split in ("train", "val", "test"):
        x = getattr(data, f"x_{split}")
        if x is not None:
            shaped[f"x_{split}"] = np.ascontiguousarray(x.reshape(len(x), *(sample or have)).astype(dtype))
    out = _static_dims(model.graph.output[0], "output")
    y_shaped = _fit_labels(data, out, model.graph.output[0].name)
    return replace(data, **shaped, **y_shaped)


def _static_dims(info: onnx.ValueInfoProto, what: str) -> tuple[int, ...] | None:
    """The dims after the batch axis when all are known, else None."""
    dims = info.type.tensor_type.shape.dim
    if len(dims) < 1:
        raise UsageError(f"the model's {what} '{info.name}' has no batch axis")
    rest = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims[1:])
    return None if None in rest else rest


def _fit_labels(data: Dataset, out: tuple[int, ...] | None, name: str) -> dict[str, np.ndarray]:
    labels = {k: getattr(data, k) for k in ("y_train", "y_val", "y_test") if getattr(data, k) is not None}
    if data.task == "classification":
        classes = out[-1] if out else None
        top = max(int(y.max()) for y in labels.values())
        if classes is not None and top >= classes:
            raise UsageError(f"--data {data.name}: label {top} does not exist for the model's output '{name}' "
                             f"of {classes} classes")
        return {k: y.astype(np.int64) for k, y in labels.items()}
    fitted = {}
    for key, y in labels.items():
        if out is not None and int(np.prod(y.shape[1:])) != int(np.prod(out)):
            raise UsageError(f"--data {data.name}: {key} has targets of shape {list(y.shape[1:])}, the model's "
                             f"output '{name}' [N, {', '.join(map(str, out))}]")
        fitted[key] = np.ascontiguousarray(y.reshape(len(y), *(out or y.shape[1:])).astype(np.float32))
    return fitted
