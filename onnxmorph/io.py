"""Model I/O: safe loading with external data, normalisation for morphing, atomic saving."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import (
    load_external_data_for_model,
    set_external_data,
    write_external_data_tensors,
)

from onnxmorph.errors import InvalidModelError, UnsafeModelError, UsageError

log = logging.getLogger("onnxmorph")

PathLike = Union[str, os.PathLike]

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it with a margin.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)

# Metadata keys written by onnxmorph into a model it loaded.
_SOURCE_DIGEST_KEY = "onnxmorph.source_sha256"
_SOURCE_EXTERNAL_KEY = "onnxmorph.source_external_data"
_TRANSIENT_KEYS = (_SOURCE_DIGEST_KEY, _SOURCE_EXTERNAL_KEY)


def memory_limit() -> int:
    """Bytes a single model may declare before it is refused: half of the physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


# --------------------------------------------------------------------------- loading


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


def load_header(path: PathLike) -> onnx.ModelProto:
    """Read `path` without its external data, after checking that every location is safe."""
    return _read_header(Path(path), digest=False)[0]


def _read_header(path: Path, *, digest: bool) -> tuple[onnx.ModelProto, _Digest | None]:
    """`load_header`, reading the file once; with `digest`, its SHA-256 is computed in parallel.

    The checks run on the header that `read_framing` cuts out of the same bytes: asking the
    parsed model for each weight's length would copy every weight (0.5-0.9 s for VGG16).
    """
    check_model_path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    hasher = _Digest(data) if digest else None
    if hasher is not None:
        hasher.start()
    try:
        model = onnx.load_model_from_string(data)
        header, skipped = read_framing(memoryview(data))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError and friends
        raise InvalidModelError(f"{path}: not an ONNX model ({_one_line(exc)})") from exc
    finally:
        del data
    check_header(header, skipped, path)
    return model, hasher


def check_model_path(path: Path) -> int:
    """Refuse, before reading it, a path that is missing, a folder, empty or too large; its size."""
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a folder, not an ONNX file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot read: {exc.strerror}") from exc
    if size == 0:
        raise InvalidModelError(f"{path}: empty file, not an ONNX model")
    if size > memory_limit():
        raise UnsafeModelError(f"{path}: {size} bytes is more than this machine can hold")
    return size


def check_header(header: onnx.ModelProto, skipped: dict[int, int], path: Path) -> None:
    """The checks of a model file on its header (see `read_framing`) before any weight is used.

    A graph must be there; each weight left out must hold the bytes its dims declare; external
    data must stay inside the model's folder and be long enough; declared sizes must fit memory.
    """
    if not header.HasField("graph") or (not header.graph.node and not header.graph.output):
        raise InvalidModelError(f"{path}: not an ONNX model (no graph)")
    for index, length in skipped.items():
        tensor = header.graph.initializer[index]
        declared = _declared_bytes(tensor)
        # The rule of check_declared_sizes, on the length of the data that was left out.
        if declared is not None and tensor.data_type in _WHOLE_BYTE_TYPES and length != declared:
            raise InvalidModelError(
                f"{path}: tensor '{tensor.name}' declares {declared} bytes (dims {list(tensor.dims)}) "
                f"but holds {length}"
            )
    external = list(_external_tensors(header))
    if external:
        _check_external_data(external, path.resolve().parent, path)
    check_declared_sizes(header, str(path))


# Weights with raw data of at least this many bytes are left out of `read_framing`'s header.
_SKIPPED_BYTES = 1024
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(data: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, field start) of each field in data[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        value = pos
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, value = _varint(data, pos, end)
            pos = value + length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end or number == 0:
            raise ValueError("truncated or malformed protobuf field")
        yield number, wire, value, pos, first


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def read_framing(data: Any) -> tuple[onnx.ModelProto, dict[int, int]]:
    """The ModelProto in `data` with the raw data of large main-graph initializers skipped.

    Returns the header and {index in graph.initializer: skipped byte count}. A field that occurs
    twice is merged by protobuf (repeated fields concatenated), so indices count across graphs.
    """
    parts: list[bytes] = []
    skipped: dict[int, int] = {}
    index = 0
    for number, wire, start, end, first in _fields(data, 0, len(data)):
        if number != _MODEL_GRAPH or wire != 2:
            parts.append(data[first:end])
            continue
        graph: list[bytes] = []
        for g_number, g_wire, g_start, g_end, g_first in _fields(data, start, end):
            if g_number == _GRAPH_INITIALIZER and g_wire == 2:
                index += 1
                tensor: list[bytes] = []
                raw = None
                for t_number, t_wire, t_start, t_end, t_first in _fields(data, g_start, g_end):
                    if t_number == _TENSOR_RAW_DATA and t_wire == 2:
                        raw = t_end - t_start  # a bytes field given twice: protobuf keeps the last
                    else:
                        tensor.append(data[t_first:t_end])
                if raw is not None and raw >= _SKIPPED_BYTES:
                    skipped[index - 1] = raw
                    graph.append(_length_delimited(_GRAPH_INITIALIZER, b"".join(tensor)))
                    continue
            graph.append(data[g_first:g_end])
        parts.append(_length_delimited(_MODEL_GRAPH, b"".join(graph)))
    return onnx.ModelProto.FromString(b"".join(parts)), skipped


def external_data_files(path: PathLike) -> list[Path]:
    """The existing files inside the model's folder that hold its external data (none when unreadable)."""
    path = Path(path)
    try:
        # the framing header is enough (the locations are in it) and costs a few pages, not the file
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            model, _ = read_framing(data)
    except Exception:
        return []  # loading it later says what is wrong
    base = path.resolve().parent
    files = []
    for tensor in _external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if location and (base in target.parents) and target.is_file() and target not in files:
            files.append(target)
    return files


def load(path: PathLike, *, normalize_model: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from `path`, resolving external data against the model's folder.

    External-data locations that escape the folder (absolute paths, `..`, symlinks out of it)
    are refused before any of them is read. The result is normalised for morphing
    (see `normalize`) unless `normalize_model` is false.
    """
    path = Path(path)
    model, hasher = _read_header(path, digest=True)
    if any(True for _ in _external_tensors(model)):
        try:
            load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as exc:
            raise InvalidModelError(f"{path}: cannot load external data ({_one_line(exc)})") from exc
        _set_metadata(model, _SOURCE_EXTERNAL_KEY, "1")
    check_structure(model, name=str(path))
    _set_metadata(model, _SOURCE_DIGEST_KEY, hasher.result())
    if normalize_model:
        _normalize_in_place(model)
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
        raise InvalidModelError(f"{name}: not an ONNX model ({_one_line(exc)})") from exc
    if any(True for _ in _external_tensors(header)):
        raise InvalidModelError(f"{name}: refers to external data; a model passed as bytes must hold its weights")
    check_header(header, skipped, Path(name))
    check_structure(model, name=name)
    _set_metadata(model, _SOURCE_DIGEST_KEY, hashlib.sha256(data).hexdigest())
    _normalize_in_place(model)
    return model


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` durably and atomically: a temporary file beside it, fsynced, then renamed."""
    with _atomic_target(Path(path)) as tmp:
        _write_bytes(tmp, data)


def check_file(path: PathLike) -> None:
    """Run onnx.checker on the model at `path` (external data stays on disk)."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise InvalidModelError(f"{path}: invalid ONNX model: {_one_line(exc)}") from exc


def check(model: onnx.ModelProto | bytes, name: str = "model") -> None:
    """Run onnx.checker on `model` (or its serialised bytes), raising InvalidModelError with one line."""
    try:
        if isinstance(model, bytes) or approx_size(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxmorph-check-") as tmp:
                target = Path(tmp) / "model.onnx"
                _write_with_external_data(model, target)
                onnx.checker.check_model(str(target))
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{name}: invalid ONNX model: {_one_line(exc)}") from exc
    except Exception as exc:
        raise InvalidModelError(f"{name}: invalid ONNX model: {_one_line(exc)}") from exc


def check_structure(model: onnx.ModelProto, name: str = "model") -> None:
    """`check` on the model's skeleton (large weights stand in as empty tensors): seconds faster.

    Serialising a 500 MB model for onnx.checker takes seconds with protobuf's upb backend and
    doubles the memory; the checker needs the weights only to compare their byte counts with
    their dims, which `load_header` (check_declared_sizes) does for a loaded model and which
    numpy_helper guarantees for the weights a pass makes.
    """
    check(skeleton(model, keep_dims=False), name=name)


# Weights at least this large are left out of a skeleton.
_SKELETON_MIN_BYTES = 1024


def _left_out(tensor: onnx.TensorProto) -> bool:
    # Only types whose byte count check_declared_sizes verifies.
    return (tensor.data_type in _WHOLE_BYTE_TYPES and tensor.HasField("raw_data")
            and (_declared_bytes(tensor) or 0) >= _SKELETON_MIN_BYTES)


def skeleton(model: onnx.ModelProto, *, keep_dims: bool = True) -> onnx.ModelProto:
    """A copy of `model` whose large main-graph weights have no data (the weights are not copied).

    With `keep_dims` the stand-ins keep their dims (for shape inference); without, they are
    empty (dims [0]), which onnx.checker accepts.
    """
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    graph = out.graph
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(graph, fd, value)
    for tensor in model.graph.initializer:
        if _left_out(tensor):
            stub = graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
            stub.dims.extend(tensor.dims if keep_dims else [0])
        else:
            graph.initializer.append(tensor)
    return out


def _copy_field(target: Any, fd: Any, value: Any) -> None:
    if fd.is_repeated:
        getattr(target, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


def approx_size(model: onnx.ModelProto) -> int:
    """The serialised size of `model` to within a few bytes per weight, without serialising it.

    `ModelProto.ByteSize()` serialises the whole model under protobuf's upb backend (seconds
    and a transient copy for a 500 MB model); this sizes the skeleton and adds the weights' bytes.
    """
    weights = sum(_declared_bytes(t) or 0 for t in model.graph.initializer if _left_out(t))
    return skeleton(model).ByteSize() + weights


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(exc).__name__)
    return first if len(first) <= 300 else first[:297] + "..."


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    # Iterative: subgraph nesting can be deep and recursion is not safe on generated models.
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for g in _iter_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _check_external_data(tensors: list[onnx.TensorProto], base: Path, path: Path) -> None:
    total = 0
    for tensor in tensors:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise InvalidModelError(f"{path}: tensor '{tensor.name}' has external data without a location")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:3]:
            raise UnsafeModelError(
                f"{path}: tensor '{tensor.name}' refers to external data at an absolute path "
                f"'{location}'; only files inside the model's folder are read"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise UnsafeModelError(
                f"{path}: tensor '{tensor.name}' refers to external data '{location}' outside "
                "the model's folder; refused"
            )
        if not target.is_file():
            raise InvalidModelError(f"{path}: external data file '{location}' is missing")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else target.stat().st_size - offset
        except ValueError as exc:
            raise InvalidModelError(
                f"{path}: tensor '{tensor.name}' has a malformed external-data offset or length"
            ) from exc
        if offset < 0 or length < 0 or offset + length > target.stat().st_size:
            raise InvalidModelError(
                f"{path}: tensor '{tensor.name}' reads past the end of '{location}'"
            )
        expected = _declared_bytes(tensor)
        if expected is not None and expected != length:
            raise InvalidModelError(
                f"{path}: tensor '{tensor.name}' declares {expected} bytes but its external data "
                f"holds {length}"
            )
        total += length
    if total > memory_limit():
        raise UnsafeModelError(f"{path}: external data of {total} bytes is more than this machine can hold")


# Element types whose raw_data holds exactly itemsize bytes per element (sub-byte types pack).
_WHOLE_BYTE_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def check_allocation(nbytes: int | float, what: str) -> None:
    """Refuse, with one line, to allocate `nbytes` for `what` when it would exhaust the memory."""
    if nbytes > memory_limit():
        raise UnsafeModelError(
            f"{what} would need {int(nbytes)} bytes, more than this machine can hold; refused"
        )


def check_declared_sizes(model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse a model whose declared tensor sizes do not match its data or would exhaust the memory.

    Runs on the header alone (no external data read, nothing allocated): embedded tensors must
    hold the bytes their dims declare, and embedded weights plus the fills of ConstantOfShape
    nodes with constant shapes must fit in `memory_limit()`.
    """
    total = 0
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against the file by _check_external_data
        if any(d < 0 for d in tensor.dims):
            raise InvalidModelError(f"{name}: tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
        declared = _declared_bytes(tensor)
        if declared is None:
            continue
        if tensor.HasField("raw_data") and tensor.data_type in _WHOLE_BYTE_TYPES and len(tensor.raw_data) != declared:
            raise InvalidModelError(
                f"{name}: tensor '{tensor.name}' declares {declared} bytes (dims {list(tensor.dims)}) "
                f"but holds {len(tensor.raw_data)}"
            )
        total += declared
    shapes = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = node.attribute[0].t
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in shapes:
            continue
        shape_tensor = shapes[node.input[0]]
        if shape_tensor.data_location == onnx.TensorProto.EXTERNAL or _declared_bytes(shape_tensor) is None:
            continue
        if _declared_bytes(shape_tensor) > 8 * 64:
            continue  # not a shape
        try:
            dims = numpy_helper.to_array(shape_tensor).astype(np.float64).reshape(-1)
        except Exception:
            continue  # malformed: onnx.checker reports it
        itemsize = 4
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type:
                itemsize = _declared_bytes(attr.t) or 4
        total += float(np.prod(dims)) * itemsize
    check_allocation(total, f"{name}: its declared tensors")


def _declared_bytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,):
        return None
    return math.prod(int(d) for d in tensor.dims) * itemsize  # exact: int64 products of dims can wrap


# --------------------------------------------------------------------------- digests


def digest(model: onnx.ModelProto) -> str:
    """A SHA-256 of the model's content: the file's own digest when it was loaded from a path."""
    for prop in model.metadata_props:
        if prop.key == _SOURCE_DIGEST_KEY:
            return prop.value
    return content_digest(model)


def content_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialised model (tensor by tensor when it is too large to serialise)."""
    h = hashlib.sha256()
    if approx_size(model) < EXTERNAL_DATA_THRESHOLD:
        h.update(model.SerializeToString(deterministic=True))
        return h.hexdigest()
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for tensor in _all_tensors(stripped):
        tensor.ClearField("raw_data")
    h.update(stripped.SerializeToString(deterministic=True))
    for tensor in _all_tensors(model):
        h.update(tensor.raw_data)
    return h.hexdigest()


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def had_external_data(model: onnx.ModelProto) -> bool:
    """Whether `model` was loaded from a file that kept its weights in external data."""
    return any(p.key == _SOURCE_EXTERNAL_KEY and p.value == "1" for p in model.metadata_props)


def strip_transient_metadata(model: onnx.ModelProto) -> None:
    """Drop the load-time bookkeeping that must not be written into a saved model."""
    keep = [p for p in model.metadata_props if p.key not in _TRANSIENT_KEYS]
    if len(keep) != len(model.metadata_props):
        del model.metadata_props[:]
        model.metadata_props.extend(keep)


# --------------------------------------------------------------------------- normalising


def is_normalized(model: onnx.ModelProto) -> bool:
    """True when `model` needs no normalisation (see `normalize`)."""
    constants = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if not node.name:
            return False
        if _foldable(node, constants, outputs):
            return False
    return True


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return `model` ready for morphing (a copy when anything changes; `model` is untouched).

    * weights made by Constant, ConstantOfShape or Identity-of-a-weight nodes become initializers;
    * unnamed nodes get a stable name derived from their first output;
    * in IR version < 4, where every initializer must also be a graph input, new initializers
      are listed as inputs too (true inputs are the graph inputs that are not initializers).
    """
    if is_normalized(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _normalize_in_place(copy)
    return copy


def _foldable(node: onnx.NodeProto, constants: set[str], outputs: set[str]) -> bool:
    if len(node.output) != 1 or node.output[0] in outputs or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Constant":
        return bool(node.attribute) and node.attribute[0].name in _CONSTANT_ATTRS
    if node.op_type in ("ConstantOfShape", "Identity"):
        return len(node.input) >= 1 and node.input[0] in constants
    if node.op_type in _SHAPE_OPS:
        # A weight reshaped or transposed from a constant (converters emit these) is a weight too.
        return bool(node.input) and all(name in constants for name in node.input if name)
    return False


_SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast")


_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def _normalize_in_place(model: onnx.ModelProto) -> None:
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded_inputs: set[str] = set()
    kept: list[onnx.NodeProto] = []
    new_tensors: list[onnx.TensorProto] = []
    budget = memory_limit()
    for node in graph.node:
        if not _foldable(node, set(initializers), outputs):
            kept.append(node)
            continue
        tensor = _fold(node, initializers, budget)
        # The budget is for all folds together: many fills just under it would exhaust the memory too.
        budget -= _declared_bytes(tensor) or 0
        tensor.name = node.output[0]
        initializers[tensor.name] = tensor
        new_tensors.append(tensor)
        folded_inputs.update(node.input)
    if new_tensors:
        used = {name for node in kept for name in node.input} | outputs
        # Subgraphs may read outer-scope weights by name.
        for sub in _iter_graphs(graph):
            if sub is not graph:
                used.update(name for node in sub.node for name in node.input)
        del graph.node[:]
        graph.node.extend(kept)
        dead = {name for name in folded_inputs if name not in used}
        survivors = [t for t in graph.initializer if t.name not in dead]
        survivors.extend(t for t in new_tensors if t.name in used)
        del graph.initializer[:]
        graph.initializer.extend(survivors)
        inputs = [i for i in graph.input if i.name not in dead]
        del graph.input[:]
        graph.input.extend(inputs)
        if model.ir_version < 4:
            list_initializers_as_inputs(model)
    _name_nodes(graph)


def _fold(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], budget: int) -> onnx.TensorProto:
    if node.op_type == "Constant":
        attr = node.attribute[0]
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            return tensor
        value = onnx.helper.get_attribute_value(attr)
        dtype = np.float32 if attr.name.startswith("value_float") else np.int64
        return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    if node.op_type == "Identity":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(initializers[node.input[0]])
        return tensor
    if node.op_type in _SHAPE_OPS:
        return numpy_helper.from_array(_fold_shape_op(node, initializers))
    # ConstantOfShape
    shape = numpy_helper.to_array(initializers[node.input[0]]).astype(np.int64).reshape(-1)
    if (shape < 0).any():
        raise InvalidModelError(f"node '{node.name or node.output[0]}': negative shape {shape.tolist()}")
    fill = np.zeros(1, dtype=np.float32)
    for attr in node.attribute:
        if attr.name == "value":
            fill = numpy_helper.to_array(attr.t).reshape(-1)
    count = int(np.prod(shape, dtype=np.float64))
    if count * fill.dtype.itemsize > budget:
        raise UnsafeModelError(
            f"node '{node.name or node.output[0]}': ConstantOfShape of shape {shape.tolist()} would "
            f"allocate {count * fill.dtype.itemsize} bytes; refused"
        )
    return numpy_helper.from_array(np.full(tuple(shape), fill[0], dtype=fill.dtype))


def _fold_shape_op(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    """Evaluate a pure data-movement op on constant inputs (nothing else is ever evaluated)."""
    args = [numpy_helper.to_array(initializers[name]) if name else None for name in node.input]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    x = args[0]
    where = f"node '{node.name or node.output[0]}'"
    try:
        if node.op_type == "Reshape":
            shape = [int(d) for d in args[1].reshape(-1)]
            if not attrs.get("allowzero", 0):
                shape = [x.shape[k] if d == 0 else d for k, d in enumerate(shape)]
            return x.reshape(shape)
        if node.op_type == "Transpose":
            return np.transpose(x, attrs.get("perm"))
        if node.op_type in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes")
            if axes is None and len(args) > 1 and args[1] is not None:
                axes = [int(a) for a in args[1].reshape(-1)]
            if node.op_type == "Squeeze":
                return np.squeeze(x, axis=tuple(axes) if axes is not None else None)
            out = x
            rank = x.ndim + len(axes)
            for axis in sorted(a % rank for a in axes):
                out = np.expand_dims(out, axis)
            return out
        if node.op_type == "Flatten":
            axis = attrs.get("axis", 1) % max(x.ndim, 1) if x.ndim else 0
            return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
        # Cast
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise InvalidModelError(f"{where}: cannot apply {node.op_type} to its constant input ({exc})") from exc


def _name_nodes(graph: onnx.GraphProto) -> None:
    taken = {node.name for node in graph.node if node.name}
    for node in graph.node:
        if node.name:
            continue
        base = node.output[0] if node.output and node.output[0] else node.op_type
        name = base if base not in taken else f"{base}/{node.op_type}"
        k = 1
        while name in taken:
            k += 1
            name = f"{base}/{node.op_type}_{k}"
        node.name = name
        taken.add(name)


def list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to be a graph input: add the missing ones."""
    listed = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor.name not in listed:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )


def true_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that a caller must feed (initializers listed as inputs are weights)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


# --------------------------------------------------------------------------- saving


def save(model: onnx.ModelProto, path: PathLike, *, external_data: bool | None = None,
         consume: bool = False) -> Path:
    """Write `model` to `path` atomically: a temporary file in the target folder, then a rename.

    External data (a `<name>.data` file beside the model) is used when asked, or automatically
    when the model would pass protobuf's 2 GiB limit. On any failure, including an interrupt,
    the previous file at `path` (if any) is left as it was and no temporary file remains.
    With `consume`, a model written with external data gives its weights up as they are written
    instead of being copied first (the caller must not use it afterwards): it saves the model's
    size in memory.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give a file name for the output")
    if not folder.is_dir():
        raise UsageError(f"{path}: folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{path}: folder '{folder}' is not writable")
    # The load-time bookkeeping is taken out of `model` and put back afterwards, instead of
    # saving a stripped copy: a copy of a 500 MB model costs its size in memory and a second.
    saved = list(model.metadata_props)
    strip_transient_metadata(model)
    try:
        if external_data is None:
            external_data = approx_size(model) >= EXTERNAL_DATA_THRESHOLD
        data_name = path.name + ".data"
        # The weights are renamed into place before the model file: until the model's rename has
        # happened too, the old weights must come back on failure (old model + new weights is corrupt).
        with _restored_on_failure(folder / data_name) if external_data else contextlib.nullcontext():
            with _atomic_target(path) as tmp_model:
                if external_data:
                    with _atomic_target(folder / data_name) as tmp_data:
                        _write_with_external_data(model, tmp_model, data_file=tmp_data.name,
                                                  final_data_name=data_name, consume=consume)
                else:
                    _write_bytes(tmp_model, model.SerializeToString())
    finally:
        if len(saved) != len(model.metadata_props):
            del model.metadata_props[:]
            model.metadata_props.extend(saved)
    return path


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _restored_on_failure(path: Path) -> Iterator[None]:
    """Put the file at `path` back as it was (or remove it, if there was none) when the block fails."""
    backup: Path | None = None
    if path.is_file():
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
        try:
            os.link(path, name)  # a second name for the old bytes: no copy, even at 2 GiB
            backup = Path(name)
        except OSError:
            backup = None
    existed = path.exists()
    try:
        yield
    except BaseException:
        # rename(2) between two names of one file does nothing: only put back what was replaced.
        if backup is not None and not (path.exists() and os.path.samefile(backup, path)):
            os.replace(backup, path)
            backup = None
        elif not existed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    finally:
        if backup is not None:
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_with_external_data(
    model: onnx.ModelProto, target: Path, data_file: str | None = None, final_data_name: str | None = None,
    consume: bool = False,
) -> None:
    """Write `model` to `target` with its weights in an external file beside it.

    The tensors are written to `data_file` (a name in target's folder) but recorded under
    `final_data_name`, so that a temporary data file can be renamed into place afterwards.
    With `consume`, `model` itself loses its weights to the file instead of a copy of it.
    """
    data_file = data_file or target.name + ".data"
    final_data_name = final_data_name or data_file
    if consume:
        work = model
    else:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    # Not convert_model_to_external_data: it refuses a location that exists relative to the
    # *current directory* (any `NAME.data` there, or the temporary file when saving into it).
    for graph in _iter_graphs(work.graph):
        for tensor in graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                set_external_data(tensor, data_file)
    # The tensors are written relative to the model's folder under their recorded location.
    data_path = target.parent / data_file
    if data_path.exists():
        data_path.unlink()
    write_external_data_tensors(work, str(target.parent))
    for tensor in _external_tensors(work):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = final_data_name
    _write_bytes(target, work.SerializeToString())
    with open(data_path, "rb+") as f:
        os.fsync(f.fileno())
