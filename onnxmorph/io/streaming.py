"""Models larger than memory: weights stay in files, are mapped when touched and copied file to file when saved.

A model loaded lazily (`io.load(path, lazy=True)`) keeps every large weight as a *reference*: an
external tensor whose `location` is absolute (made so after the safety checks), pointing into
its external-data file or, for a weight inside the model file, at its raw bytes there. The
reference resolves wherever the model travels in memory (a pass's copy, an exported child).
Such a model *streams*:

* a pass reads a weight through onnx-graphsurgeon (`tensor.values`), which maps just that
  tensor's bytes read-only (`graph.MappedValues`), so nothing else is read;
* a weight a pass computes (`graph.constant`, `graph.set_input_constant`) is written to a
  scratch file as soon as it is made, while `spilling()` is on (run_passes turns it on for a
  parent kept with external data), and becomes a reference too: a pass that recomputes every
  weight of the model holds a few of them at a time, whatever the model's size;
* saving copies each referenced weight from its file to the child's (`write_tensors` for a
  data file, `write_inline` for a model in one file) with `os.copy_file_range` (in the kernel,
  never through Python objects), at offsets aligned for memory mapping, and writes in-memory
  weights from their buffers.

A streaming model depends on the files it refers to: they must stay as they are until it is
saved (the CLI saves the child at once; `release()` removes the scratch files).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxmorph.errors import UsageError
from onnxmorph.io.framing import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, encode_varint, length_delimited
from onnxmorph.io.proto import WHOLE_BYTE_TYPES, all_tensors, declared_bytes, external_tensors, iter_graphs, shell
from onnxmorph.limits import quote

# Tensors of at least this many bytes start at a multiple of BIG_ALIGNMENT (the allocation
# granularity of every OS, so onnxruntime can map them anywhere); smaller ones at a page.
BIG_TENSOR = 2**20
BIG_ALIGNMENT = 2**16
PAGE = 4096

# Inline weights of at least this many bytes go to the data file (onnx's own threshold).
EXTERNAL_MIN_BYTES = 1024

# Computed weights of at least this many bytes are spilled to the scratch folder while spilling.
SPILL_MIN_BYTES = 2**16

# Element types that map to a plain numpy dtype (bfloat16 and float8 go through onnx's converter).
MAPPABLE_TYPES = WHOLE_BYTE_TYPES - {onnx.TensorProto.BFLOAT16}

_COPY_CHUNK = 2**30
_READ_CHUNK = 2**24


# --------------------------------------------------------------------------- references


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def is_reference(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` refers to bytes in a file by absolute path (a streaming model's tensor)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return os.path.isabs(_entries(tensor).get("location", ""))


def streams(model: onnx.ModelProto) -> bool:
    """Whether `model` holds references to weights in files (see the module's docstring)."""
    return any(is_reference(t) for t in external_tensors(model))


def resolve_locations(model: onnx.ModelProto, folder: Path) -> None:
    """Make every external location of `model` absolute against `folder` (checked safe beforehand)."""
    for tensor in external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(folder / entry.value)


def _span(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    info = _entries(tensor)
    offset = int(info.get("offset", 0) or 0)
    length = info.get("length")
    if length is None:
        length = os.path.getsize(info["location"]) - offset
    return info["location"], offset, int(length)


def make_reference(tensor: onnx.TensorProto, path: str, offset: int, length: int) -> None:
    """Turn `tensor` (its raw data left out) into a reference to `length` bytes of `path` at `offset`."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", path), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def reference(name: str, data_type: int, dims: Iterable[int], path: str, offset: int, length: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
    make_reference(tensor, path, offset, length)
    return tensor


def read_bytes(tensor: onnx.TensorProto) -> bytes:
    path, offset, length = _span(tensor)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: {length} bytes expected at offset {offset}, {len(data)} there")
    return data


def map_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The array of a referenced tensor, memory-mapped read-only (only the pages read are loaded)."""
    if tensor.data_type not in MAPPABLE_TYPES:  # read as onnx-graphsurgeon reads them
        inline = onnx.TensorProto()
        inline.CopyFrom(tensor)
        materialize(inline)
        return np.array(onnx.numpy_helper.to_array(inline))
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    path, offset, length = _span(tensor)
    if length != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise OSError(f"tensor '{tensor.name}': {length} bytes in {path} for shape {shape}")
    if length == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=shape)


def materialize(tensor: onnx.TensorProto) -> None:
    """Read a referenced tensor's bytes into the tensor itself."""
    data = read_bytes(tensor)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def inline_fold_inputs(model: onnx.ModelProto, foldable: Callable[[onnx.NodeProto, set, set], bool]) -> None:
    """Materialise the referenced initializers that normalisation will fold (it reads them as arrays)."""
    constants = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    wanted = {name for node in model.graph.node if foldable(node, constants, outputs) for name in node.input}
    for tensor in model.graph.initializer:
        if tensor.name in wanted and is_reference(tensor):
            materialize(tensor)


# --------------------------------------------------------------------------- spilling computed weights


class _Scratch:
    """A folder of spilled weights, one file each, removed with the process (or `release`)."""

    marker = "onnxmorph-spill-"

    def __init__(self, parent: str | None) -> None:
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=self.marker, dir=parent))
        except OSError as exc:  # a file, a missing or read-only folder: a setting to fix, not a bug
            where = f"ONNXMORPH_SCRATCH={quote(repr(parent))}" if parent else \
                f"the temporary folder {quote(tempfile.gettempdir())}"
            raise UsageError(f"{where}: cannot make a scratch folder there for computed weights "
                             f"({exc.strerror or exc}); set ONNXMORPH_SCRATCH to a writable folder") from None
        self.counter = itertools.count()
        self.files: list[Path] = []

    def write(self, array: np.ndarray) -> Path:
        path = self.folder / f"{next(self.counter)}.bin"
        self.files.append(path)
        try:
            with open(path, "wb") as f:
                f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        except OSError as exc:
            raise UsageError(f"cannot write a computed weight to the scratch folder {self.folder} "
                             f"(set ONNXMORPH_SCRATCH to another): {exc.strerror or exc}") from exc
        return path


_SPILL: contextvars.ContextVar[_Scratch | None] = contextvars.ContextVar("onnxmorph_spill", default=None)
_SCRATCHES: list[_Scratch] = []


@contextlib.contextmanager
def spilling(folder: str | os.PathLike | None = None) -> Iterator[_Scratch]:
    """Within the block, weights made by `graph.constant` are written to a scratch file and referenced.

    The scratch files outlive the block (a child refers to them until it is saved); they are
    removed at exit, or by `release`. `folder` (default: the temporary folder, or
    $ONNXMORPH_SCRATCH) should be on the output's file system, where copies are cheapest.
    """
    scratch = _Scratch(str(folder) if folder else os.environ.get("ONNXMORPH_SCRATCH"))
    _SCRATCHES.append(scratch)
    token = _SPILL.set(scratch)
    try:
        yield scratch
    finally:
        _SPILL.reset(token)


def spill(name: str, array: np.ndarray) -> onnx.TensorProto | None:
    """A reference to `array` written to a scratch file, or None when not spilling (or it is small)."""
    scratch = _SPILL.get()
    if scratch is None or array.nbytes < SPILL_MIN_BYTES or array.dtype.byteorder == ">":
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except Exception:
        return None
    if data_type not in MAPPABLE_TYPES:
        return None
    path = scratch.write(array)
    return reference(name, data_type, array.shape, str(path), 0, array.nbytes)


def _is_spilled(path: str) -> bool:
    return any(Path(path).parent == scratch.folder for scratch in _SCRATCHES)


def drop_unreferenced(scratch: _Scratch, models: Iterable[onnx.ModelProto]) -> None:
    """Remove the spilled files of `scratch` that none of `models` refers to (superseded weights)."""
    used = {_span(t)[0] for model in models for t in external_tensors(model) if is_reference(t)}
    kept = []
    for path in scratch.files:
        if str(path) in used:
            kept.append(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    scratch.files = kept


def is_spilling() -> bool:
    """Whether computed weights are being spilled now (inside `spilling()`)."""
    return _SPILL.get() is not None


def drop_superseded(models: Iterable[onnx.ModelProto]) -> None:
    """While spilling, remove the scratch files none of `models` refers to (a pass that runs several
    morphs in turn drops the weights a later one replaced again, as run_passes does between passes)."""
    scratch = _SPILL.get()
    if scratch is not None:
        drop_unreferenced(scratch, models)


def release() -> None:
    """Remove every scratch folder (models that still refer to them can no longer be saved)."""
    while _SCRATCHES:
        shutil.rmtree(_SCRATCHES.pop().folder, ignore_errors=True)


import atexit  # noqa: E402  (registered once the function exists)

atexit.register(release)


def peak_memory() -> int:
    """This process's peak resident memory in bytes (VmHWM; 0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


# --------------------------------------------------------------------------- writing


def aligned(offset: int, length: int) -> int:
    step = BIG_ALIGNMENT if length >= BIG_TENSOR else PAGE
    return -(-offset // step) * step


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def copy_range(src: int, dst: int, length: int, src_offset: int, dst_offset: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), or in chunks where it is refused."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < length:
        count = min(_COPY_CHUNK, length - done)
        if use_kernel:
            try:
                n = os.copy_file_range(src, dst, count, src_offset + done, dst_offset + done)
            except OSError:  # EXDEV on old kernels, ENOSYS, EINVAL on some file systems
                use_kernel = False
                continue
        else:
            chunk = os.pread(src, min(count, _READ_CHUNK), src_offset + done)
            _pwrite_all(dst, memoryview(chunk), dst_offset + done)
            n = len(chunk)
        if n == 0:
            raise OSError(f"unexpected end of file after {done} of {length} bytes")
        done += n


class _Sources:
    """Open descriptors of the files tensors are copied from, each opened once."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def write_tensors(model: onnx.ModelProto, data_path: Path, location: str, *, consume: bool = False) -> onnx.ModelProto:
    """Write `model`'s large main-graph weights to `data_path` and return the header that refers to them.

    Referenced tensors are copied file to file; inline ones are written from their buffers. With
    `consume`, `model` gives its weights up as they are written (inline ones are dropped, spilled
    files removed): it can no longer be saved. `model` keeps its references; the
    header records `location` (relative to the header's folder). Tensors of subgraphs and
    attributes stay inline (referenced ones are read into the header).
    """
    header = shell(model)
    sources = _Sources()
    offset = 0
    out = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for tensor in model.graph.initializer:
            if is_reference(tensor):
                path, src_offset, length = _span(tensor)
                offset = aligned(offset, length)
                copy_range(sources.fd(path), out, length, src_offset, offset)
                if consume and _is_spilled(path):  # moved, not copied: the disk holds it once
                    os.unlink(path)
            elif (tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL
                  and (declared_bytes(tensor) or EXTERNAL_MIN_BYTES) >= EXTERNAL_MIN_BYTES):
                data = tensor.raw_data  # one copy under protobuf's upb backend: read it once
                length = len(data)
                offset = aligned(offset, length)
                _pwrite_all(out, memoryview(data), offset)
                del data
                if consume:
                    tensor.ClearField("raw_data")
            else:
                header.graph.initializer.append(tensor)
                continue
            header.graph.initializer.append(
                reference(tensor.name, tensor.data_type, tensor.dims, location, offset, length))
            stub = header.graph.initializer[-1]
            stub.doc_string = tensor.doc_string
            offset += length
        os.ftruncate(out, offset)
        os.fsync(out)
    finally:
        os.close(out)
        sources.close()
    _materialize_nested(header)
    return header


def _materialize_nested(header: onnx.ModelProto) -> None:
    """Read the referenced tensors of subgraphs and attributes into the header (they are written inline)."""
    for graph in itertools.islice(iter_graphs(header.graph), 1, None):
        for tensor in graph.initializer:
            if is_reference(tensor):
                materialize(tensor)
    for tensor in _attribute_tensors(header):
        if is_reference(tensor):
            materialize(tensor)


def write_inline(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` as one protobuf file, each referenced weight's bytes copied into it file to file.

    The file is framed by hand: the model's other fields, then the graph's (its initializers,
    in order, after its other fields; protobuf reads fields in any order), each referenced
    initializer as its small description followed by its raw_data field, whose bytes are copied.
    """
    outer = shell(model)
    _materialize_nested(outer)
    graph = outer.graph.SerializeToString()
    outer.ClearField("graph")
    pieces: list[bytes | tuple[str, int, int]] = []  # bytes to write, or (file, offset, length) to copy
    for tensor in model.graph.initializer:
        if not is_reference(tensor):
            pieces.append(length_delimited(GRAPH_INITIALIZER, tensor.SerializeToString()))
            continue
        stub = onnx.TensorProto()
        stub.CopyFrom(tensor)
        del stub.external_data[:]
        stub.ClearField("data_location")
        source, offset, length = _span(tensor)
        described = stub.SerializeToString() + encode_varint(TENSOR_RAW_DATA << 3 | 2) + encode_varint(length)
        pieces.append(encode_varint(GRAPH_INITIALIZER << 3 | 2) + encode_varint(len(described) + length) + described)
        pieces.append((source, offset, length))
    body = len(graph) + sum(len(p) if isinstance(p, bytes) else p[2] for p in pieces)
    head = outer.SerializeToString() + encode_varint(MODEL_GRAPH << 3 | 2) + encode_varint(body) + graph
    sources = _Sources()
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        position = len(head)
        _pwrite_all(out, memoryview(head), 0)
        for piece in pieces:
            if isinstance(piece, bytes):
                _pwrite_all(out, memoryview(piece), position)
                position += len(piece)
            else:
                copy_range(sources.fd(piece[0]), out, piece[2], piece[1], position)
                position += piece[2]
        os.ftruncate(out, position)
        os.fsync(out)
    finally:
        os.close(out)
        sources.close()


def _attribute_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    initializers = {id(t) for g in iter_graphs(model.graph) for t in g.initializer}
    return (t for t in all_tensors(model) if id(t) not in initializers)


def set_location(header: onnx.ModelProto, old: str, new: str) -> None:
    """Point the header's references to `old` at `new` instead (the data file's final name)."""
    for tensor in header.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new

