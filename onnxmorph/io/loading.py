"""Model I/O: safe loading with external data, checks, digests; normalising and saving live beside it.

The layers of the I/O: `framing` (the protobuf header of a file), `safety` (checks before any
weight is read), `proto` (walkers and sizes that copy no weight), `folding` (normalisation for
morphing) and `saving` (atomic save). Their public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import Union

import onnx
from onnx.external_data_helper import load_external_data_for_model

from onnxmorph.errors import InvalidModelError, one_line
from onnxmorph.io import saving, streaming
from onnxmorph.io.folding import (  # noqa: F401  (re-exported)
    foldable,
    is_normalized,
    list_initializers_as_inputs,
    normalize,
    normalize_in_place,
    true_inputs,
)
from onnxmorph.io.framing import read_framing
from onnxmorph.io.proto import (  # noqa: F401  (re-exported)
    SOURCE_DIGEST_KEY,
    SOURCE_EXTERNAL_KEY,
    all_tensors,
    approx_size,
    external_tensors,
    had_external_data,
    set_metadata,
    skeleton,
    strip_transient_metadata,
)
from onnxmorph.io.safety import (  # noqa: F401  (re-exported)
    check_allocation,
    check_declared_sizes,
    check_header,
    check_model_path,
    external_data_files,
    memory_limit,
)
from onnxmorph.io.saving import (  # noqa: F401  (re-exported)
    check_output_path,
    restored_on_failure,
    save,
    write_with_external_data,
)

log = logging.getLogger("onnxmorph")

PathLike = Union[str, os.PathLike]


class _Digest(threading.Thread):
    """SHA-256 of a file's bytes, computed beside the parse (hashlib releases the GIL on big buffers)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(name="onnxmorph-sha256", daemon=True)
        self._data: bytes | None = data
        self._value = ""

    def run(self) -> None:
        self._value = hashlib.sha256(self._data).hexdigest()
        self._data = None  # the file's bytes are freed as soon as both the parse and the hash are done

    def result(self) -> str:
        self.join()
        return self._value


class _FileDigest(threading.Thread):
    """SHA-256 of a file read in chunks beside the morph (the file is never held whole)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="onnxmorph-sha256", daemon=True)
        self._path = path
        self._value = ""
        self._error: OSError | None = None
        self._launch = threading.Lock()
        self.launched = False

    def begin(self) -> None:
        """Start reading, once (a digest may be asked for before or after the morph started it)."""
        with self._launch:
            if not self.launched:
                self.launched = True
                self.start()

    def run(self) -> None:
        try:
            self._value = file_sha256(self._path)
        except OSError as exc:
            self._error = exc

    def result(self) -> str:
        self.begin()
        self.join()
        if self._error is not None:
            raise InvalidModelError(f"{self._path}: cannot read: {self._error.strerror or self._error}")
        return self._value


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (the file is never held whole); OSError as open() raises it."""
    h = hashlib.sha256()
    buffer = bytearray(2**20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


# Digests of lazily loaded files still being computed, by the token their model's metadata holds.
_PENDING: dict[str, _FileDigest] = {}
_PENDING_PREFIX = "pending:"


def load_header(path: PathLike) -> onnx.ModelProto:
    """Read `path` without its external data, after checking that every location is safe."""
    return _read_header(Path(path), digest=False)[0]


def _read_header(path: Path, *, digest: bool) -> tuple[onnx.ModelProto, _Digest | None]:
    """`load_header`, reading the file once; with `digest`, its SHA-256 is computed in parallel.

    The checks run on the header that `read_framing` cuts out of the same bytes: asking the
    parsed model for each weight's length would copy every weight (0.5-0.9 s for VGG16).
    """
    check_model_path(path)
    # The framing first, on a memory map: a junk file of gigabytes is refused after a few pages,
    # before it is read whole, and so is a model whose declared sizes are unsafe.
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            header, skipped = read_framing(mapped)
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # malformed framing, or protobuf's DecodeError on the header
        raise InvalidModelError(f"{path}: not an ONNX model ({one_line(exc)})") from exc
    check_header(header, skipped, path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    hasher = _Digest(data) if digest else None
    if hasher is not None:
        hasher.start()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError and friends
        raise InvalidModelError(f"{path}: not an ONNX model ({one_line(exc)})") from exc
    finally:
        del data
    return model, hasher


def load(path: PathLike, *, normalize_model: bool = False, lazy: bool = False) -> onnx.ModelProto:
    """Load an ONNX model from `path`, resolving external data against the model's folder.

    External-data locations that escape the folder (absolute paths, `..`, symlinks out of it)
    are refused before any of them is read. The model is returned as the file has it, so that
    a child is verified against the parent the user gave; with `normalize_model` it is
    normalised for morphing in place (see `normalize`), which saves a copy. With `lazy`, external
    weights are not read: they stay references to their files (see onnxmorph.io.streaming).
    """
    path = Path(path)
    if lazy:
        return _load_lazily(path, normalize_model)
    model, hasher = _read_header(path, digest=True)
    if any(True for _ in external_tensors(model)):
        try:
            load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as exc:
            raise InvalidModelError(f"{path}: cannot load external data ({one_line(exc)})") from exc
        set_metadata(model, SOURCE_EXTERNAL_KEY, "1")
    check_structure(model, name=str(path))
    set_metadata(model, SOURCE_DIGEST_KEY, hasher.result())
    if normalize_model:
        normalize_in_place(model)
    return model


def load_bytes(data: bytes, name: str = "model") -> onnx.ModelProto:
    """`load` for a model held in memory (no external data): checked, normalised, its digest that of `data`.

    A search passes candidates between processes as bytes; the digest in a child's receipt must
    then be the SHA-256 of the very bytes written to the candidate's file.
    """
    try:
        model = onnx.load_model_from_string(data)
        header, skipped = read_framing(memoryview(data))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError and friends
        raise InvalidModelError(f"{name}: not an ONNX model ({one_line(exc)})") from exc
    if any(True for _ in external_tensors(header)):
        raise InvalidModelError(f"{name}: refers to external data; a model passed as bytes must hold its weights")
    check_header(header, skipped, Path(name))
    check_structure(model, name=name)
    set_metadata(model, SOURCE_DIGEST_KEY, hashlib.sha256(data).hexdigest())
    normalize_in_place(model)
    return model


def references(path: PathLike) -> onnx.ModelProto:
    """The model at `path` as its framing header, every large weight a reference into its file (see streaming).

    Weights inside the model file itself become references to their bytes there, external ones
    to their data files (after the safety checks of `check_header`); nothing else is done: no
    digest, no onnx.checker, no normalisation.
    """
    path = Path(path)
    check_model_path(path)
    offsets: dict[int, int] = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            model, skipped = read_framing(mapped, offsets)
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # malformed framing, or protobuf's DecodeError on the header
        raise InvalidModelError(f"{path}: not an ONNX model ({one_line(exc)})") from exc
    check_header(model, skipped, path, in_memory=False)  # weights are mapped when touched, never all held
    external = any(True for _ in external_tensors(model))
    streaming.resolve_locations(model, path.resolve().parent)
    source = str(path.resolve())
    for index, length in skipped.items():
        streaming.make_reference(model.graph.initializer[index], source, offsets[index], length)
    if external:
        set_metadata(model, SOURCE_EXTERNAL_KEY, "1")
    return model


def _load_lazily(path: Path, normalize_model: bool) -> onnx.ModelProto:
    """`load(lazy=True)`: `references`, checked, with its digest to come (see `start_digest`).

    The file's digest is computed in chunks, beside the morph, once `start_digest` or `digest`
    asks for it (`inspect` never does: it would read the whole file for nothing).
    """
    model = references(path)
    check_structure(model, name=str(path))
    hasher = _FileDigest(path)
    token = f"{_PENDING_PREFIX}{id(hasher)}"
    _PENDING[token] = hasher
    set_metadata(model, SOURCE_DIGEST_KEY, token)
    if normalize_model:
        streaming.inline_fold_inputs(model, foldable)
        normalize_in_place(model)
    return model


def start_digest(model: onnx.ModelProto) -> None:
    """Start computing the digest of the file a lazily loaded `model` came from (beside what follows)."""
    for prop in model.metadata_props:
        if prop.key == SOURCE_DIGEST_KEY and prop.value.startswith(_PENDING_PREFIX):
            hasher = _PENDING.get(prop.value)
            if hasher is not None:
                hasher.begin()


def check(model: onnx.ModelProto | bytes, name: str = "model") -> None:
    """Run onnx.checker on `model` (or its serialised bytes), raising InvalidModelError with one line."""
    if isinstance(model, onnx.ModelProto) and streaming.streams(model):
        model = skeleton(model, keep_dims=False)  # references were checked against their files
    try:
        if isinstance(model, bytes) or approx_size(model) < saving.EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxmorph-check-") as tmp:
                target = Path(tmp) / "model.onnx"
                write_with_external_data(model, target)
                onnx.checker.check_model(str(target))
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{name}: invalid ONNX model: {one_line(exc)}") from exc
    except Exception as exc:
        raise InvalidModelError(f"{name}: invalid ONNX model: {one_line(exc)}") from exc


def check_structure(model: onnx.ModelProto, name: str = "model") -> None:
    """`check` on the model's skeleton (large weights stand in as empty tensors): seconds faster.

    Serialising a 500 MB model for onnx.checker takes seconds with protobuf's upb backend and
    doubles the memory; the checker needs the weights only to compare their byte counts with
    their dims, which `load_header` (check_declared_sizes) does for a loaded model and which
    numpy_helper guarantees for the weights a pass makes.
    """
    check(skeleton(model, keep_dims=False), name=name)


def digest(model: onnx.ModelProto) -> str:
    """A SHA-256 of the model's content: the file's own digest when it was loaded from a path."""
    for prop in model.metadata_props:
        if prop.key == SOURCE_DIGEST_KEY:
            if prop.value.startswith(_PENDING_PREFIX):
                hasher = _PENDING.get(prop.value)  # kept: copies of the model carry the same token
                prop.value = hasher.result() if hasher is not None else content_digest(model)
            return prop.value
    return content_digest(model)


def content_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialised model (tensor by tensor when it is too large to serialise)."""
    h = hashlib.sha256()
    if approx_size(model) < saving.EXTERNAL_DATA_THRESHOLD and not streaming.streams(model):
        h.update(model.SerializeToString(deterministic=True))
        return h.hexdigest()
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for tensor in all_tensors(stripped):
        tensor.ClearField("raw_data")
    h.update(stripped.SerializeToString(deterministic=True))
    for tensor in all_tensors(model):
        h.update(streaming.read_bytes(tensor) if streaming.is_reference(tensor) else tensor.raw_data)
    return h.hexdigest()
