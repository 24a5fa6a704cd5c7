"""Safety checks of a model before any weight is read: paths, external data, declared sizes, memory."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import numpy_helper

from onnxmorph import limits
from onnxmorph.errors import InvalidModelError, UnsafeModelError
from onnxmorph.io.framing import read_framing
from onnxmorph.io.proto import WHOLE_BYTE_TYPES, all_tensors, declared_bytes, external_tensors

PathLike = Union[str, os.PathLike]


def memory_limit() -> int:
    """Bytes a single model may declare before it is refused (ONNXMORPH_MAX_MODEL_BYTES; half the memory)."""
    return limits.MODEL_BYTES.value()


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
        raise UnsafeModelError(
            f"{path}: {size} bytes is more than this machine can hold (limit {memory_limit()} bytes); "
            f"refused (set {limits.MODEL_BYTES.variable} to raise it)"
        )
    return size


def check_header(header: onnx.ModelProto, skipped: dict[int, int], path: Path, *, in_memory: bool = True) -> None:
    """The checks of a model file on its header (see `read_framing`) before any weight is used.

    A graph must be there; each weight left out must hold the bytes its dims declare; external
    data must stay inside the model's folder and be long enough; declared sizes must fit memory.
    Without `in_memory` (the weights stay in their files: a model read lazily, or handed to
    onnxruntime by path, which maps them), the external data may be larger than memory.
    """
    if not header.HasField("graph") or (not header.graph.node and not header.graph.output):
        raise InvalidModelError(f"{path}: not an ONNX model (no graph)")
    for index, length in skipped.items():
        tensor = header.graph.initializer[index]
        declared = declared_bytes(tensor)
        # The rule of check_declared_sizes, on the length of the data that was left out.
        if declared is not None and tensor.data_type in WHOLE_BYTE_TYPES and length != declared:
            raise InvalidModelError(
                f"{path}: tensor '{tensor.name}' declares {declared} bytes (dims {list(tensor.dims)}) "
                f"but holds {length}"
            )
    check_text(header, path)
    external = list(external_tensors(header))
    if external:
        _check_external_data(external, path.resolve().parent, path, in_memory)
    check_declared_sizes(header, str(path))


def check_text(header: onnx.ModelProto, path: Path) -> None:
    """Refuse a string field that is not UTF-8 (ONNX's strings are): protobuf returns it as bytes, not text.

    Names, op types, metadata and the like are read as text everywhere after loading; a node
    named b'\\xff' would fail far from here. Weights' bytes fields are not strings and are skipped.
    """
    stack: list[Message] = [header]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            if field.type == field.TYPE_MESSAGE:
                stack.extend(value if _repeated(field) else [value])
            elif field.type == field.TYPE_STRING:
                if any(isinstance(v, bytes) for v in (value if _repeated(field) else [value])):
                    raise InvalidModelError(f"{path}: {message.DESCRIPTOR.name}.{field.name} holds text that is "
                                            "not UTF-8 (ONNX strings are UTF-8)")


def _repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 5; `label` before
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


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
    for tensor in external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if "\x00" in location:
            continue  # loading it says what is wrong
        target = (base / location).resolve()
        if location and (base in target.parents) and target.is_file() and target not in files:
            files.append(target)
    return files


def _check_external_data(tensors: list[onnx.TensorProto], base: Path, path: Path, in_memory: bool = True) -> None:
    total = 0
    for tensor in tensors:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise InvalidModelError(f"{path}: tensor '{tensor.name}' has external data without a location")
        if "\x00" in location:
            raise InvalidModelError(
                f"{path}: tensor '{limits.quote(tensor.name)}' has a NUL byte in its external-data location "
                f"'{limits.quote(location)}'"
            )
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
        expected = declared_bytes(tensor)
        if expected is not None and expected != length:
            raise InvalidModelError(
                f"{path}: tensor '{tensor.name}' declares {expected} bytes but its external data "
                f"holds {length}"
            )
        total += length
    if in_memory:
        check_allocation(total, f"{path}: its external data")


def check_allocation(nbytes: int | float, what: str) -> None:
    """Refuse, with one line, to allocate `nbytes` for `what` when it would exhaust the memory."""
    if nbytes > memory_limit():
        raise UnsafeModelError(
            f"{what} would need {int(nbytes)} bytes, more than this machine can hold (limit "
            f"{memory_limit()} bytes); refused (set {limits.MODEL_BYTES.variable} to raise it)"
        )


def check_declared_sizes(model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse a model whose declared tensor sizes do not match its data or would exhaust the memory.

    Runs on the header alone (no external data read, nothing allocated): embedded tensors must
    hold the bytes their dims declare, and embedded weights plus the fills of ConstantOfShape
    nodes with constant shapes must fit in `memory_limit()`.
    """
    total = 0
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against the file by _check_external_data
        if any(d < 0 for d in tensor.dims):
            raise InvalidModelError(f"{name}: tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
        declared = declared_bytes(tensor)
        if declared is None:
            continue
        if tensor.HasField("raw_data") and tensor.data_type in WHOLE_BYTE_TYPES and len(tensor.raw_data) != declared:
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
        if shape_tensor.data_location == onnx.TensorProto.EXTERNAL or declared_bytes(shape_tensor) is None:
            continue
        if declared_bytes(shape_tensor) > 8 * 64:
            continue  # not a shape
        try:
            dims = numpy_helper.to_array(shape_tensor).astype(np.float64).reshape(-1)
        except Exception:
            continue  # malformed: onnx.checker reports it
        itemsize = 4
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type:
                itemsize = declared_bytes(attr.t) or 4
        total += float(np.prod(dims)) * itemsize
    check_allocation(total, f"{name}: its declared tensors")
