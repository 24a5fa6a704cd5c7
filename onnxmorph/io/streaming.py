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
import mmap
import os
import tempfile
import weakref
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

# Element types whose bytes are a numpy array as they are (bfloat16 through ml_dtypes' type, which onnx
# depends on; sub-byte and float8 types go through onnx's converter).
MAPPABLE_TYPES = WHOLE_BYTE_TYPES

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
    little = dtype if dtype.byteorder in "<|=" and np.little_endian else dtype.newbyteorder("<")
    array = np.memmap(path, dtype=little, mode="r", offset=offset, shape=shape)
    _MAPPED.add(array._mmap)
    return array


def _data_reader(tensor: onnx.TensorProto) -> tuple[int, Callable[[int, int], bytes]]:
    """(byte count, read(start, count)) of a tensor's data, wherever it is (a file, raw data, typed fields)."""
    if is_reference(tensor):
        path, offset, length = _span(tensor)
        fd = os.open(path, os.O_RDONLY)

        def read_file(start: int, count: int) -> bytes:
            return os.pread(fd, count, offset + start)

        read_file.fd = fd  # type: ignore[attr-defined]
        return length, read_file
    data = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
    view = memoryview(data)
    return len(data), lambda start, count: bytes(view[start:start + count])


def same_data(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    """Whether two tensors hold the same type, dims and bytes (read a chunk at a time, never whole).

    Two references to the same bytes of the same file are the same without reading them.
    """
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    if is_reference(a) and is_reference(b) and _span(a) == _span(b):
        return True
    (length_a, read_a), (length_b, read_b) = _data_reader(a), _data_reader(b)
    try:
        if length_a != length_b:
            return False
        for start in range(0, length_a, _READ_CHUNK):
            count = min(_READ_CHUNK, length_a - start)
            if read_a(start, count) != read_b(start, count):
                return False
        return True
    finally:
        for read in (read_a, read_b):
            if hasattr(read, "fd"):
                os.close(read.fd)


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
    """One file of computed weights at aligned offsets, removed with the process (or `release`).

    Made in the output's folder when the output is known: saving the child with external data
    then renames this file into the data file and appends the parent's untouched weights after
    it (`write_tensors(consume=True)`), so each computed weight is written once. A weight a later
    step replaces leaves a hole that the next weights fill (first fit) or, at the end, a sparse
    hole (its blocks given back to the file system).
    """

    marker = "onnxmorph-spill-"

    def __init__(self, folder: str | None, stem: str = "") -> None:
        self.prefix = f".{stem[:80]}.{self.marker}" if stem else self.marker
        self.folder = Path(folder if folder else tempfile.gettempdir())
        self.fd = -1
        self.path = self.folder / f"{self.prefix}unused"  # made by the first write: a morph may spill nothing
        self.end = 0
        self.extents: dict[int, int] = {}  # offset -> length of every weight written
        self.free: list[tuple[int, int]] = []  # (offset, length) of holes left by superseded weights

    def _allocate(self, length: int) -> int:
        for k, (offset, size) in enumerate(self.free):
            start = aligned(offset, length)
            if start + length <= offset + size:
                del self.free[k]
                if start > offset:
                    self.free.append((offset, start - offset))
                if start + length < offset + size:
                    self.free.append((start + length, offset + size - start - length))
                return start
        start = aligned(self.end, length)
        self.end = start + length
        return start

    def write(self, array: np.ndarray, dtype: np.dtype) -> int:
        """Write `array` as `dtype` (cast a slab at a time, never copied whole); returns its offset."""
        if self.fd < 0:
            try:
                self.fd, name = tempfile.mkstemp(prefix=self.prefix, suffix=".bin", dir=self.folder)
            except OSError as exc:
                raise UsageError(f"cannot make a scratch file in {self.folder} (set ONNXMORPH_SCRATCH to another "
                                 f"folder): {exc.strerror or exc}") from exc
            self.path = Path(name)
        length = array.size * dtype.itemsize
        offset = self._allocate(length)
        try:
            position = offset
            for piece in _pieces(array, dtype):
                _pwrite_all(self.fd, memoryview(piece.view(np.uint8)), position)  # bytes: any dtype, bfloat16 too
                position += piece.nbytes
        except OSError as exc:
            raise UsageError(f"cannot write a computed weight to the scratch file {self.path} "
                             f"(set ONNXMORPH_SCRATCH to another folder): {exc.strerror or exc}") from exc
        self.extents[offset] = length
        return offset

    def forget(self, offsets: set[int]) -> None:
        """The weights at `offsets` are no longer used: their space is reused, its blocks given back."""
        for offset in offsets:
            length = self.extents.pop(offset)
            self.free.append((offset, length))
            _punch_hole(self.fd, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pieces(array: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """`array`'s entries in C order as contiguous arrays of `dtype`, none over `_READ_CHUNK` bytes."""
    if array.dtype == dtype and array.flags.c_contiguous:
        flat = array.reshape(-1)
        step = max(1, _COPY_CHUNK // max(dtype.itemsize, 1))
        for k in range(0, flat.size, step):
            yield flat[k:k + step]
        return
    rows = array.reshape(1, -1) if array.ndim < 2 else array
    per_row = max(1, int(np.prod(rows.shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _READ_CHUNK // per_row)
    for k in range(0, rows.shape[0], step):
        yield np.ascontiguousarray(rows[k:k + step], dtype=dtype).reshape(-1)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the blocks of a byte range back to the file system (the range reads as zeros); best effort."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None or length <= 0:
        return
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        keep_size, punch_hole = 0x01, 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        libc.fallocate(ctypes.c_int(fd), ctypes.c_int(keep_size | punch_hole), ctypes.c_longlong(offset),
                       ctypes.c_longlong(length))
    except (OSError, AttributeError):  # not Linux, or a file system without holes: the space stays used
        pass


_SPILL: contextvars.ContextVar[_Scratch | None] = contextvars.ContextVar("onnxmorph_spill", default=None)
_SCRATCHES: list[_Scratch] = []


@contextlib.contextmanager
def spilling(folder: str | os.PathLike | None = None, stem: str = "") -> Iterator[_Scratch]:
    """Within the block, weights made by `graph.constant` are written to a scratch file and referenced.

    The scratch file outlives the block (a child refers to it until it is saved); it is removed
    at exit, or by `release`, unless saving took it over as the child's data file. `folder` should
    be the output's (where saving can take the file over); $ONNXMORPH_SCRATCH, when set, is used
    instead, and the temporary folder when neither is given.
    """
    setting = os.environ.get("ONNXMORPH_SCRATCH")
    if setting:
        _check_scratch_setting(setting)
    chosen = setting or (str(folder) if folder else None)
    scratch = _Scratch(chosen, stem)
    _SCRATCHES.append(scratch)
    token = _SPILL.set(scratch)
    try:
        yield scratch
    finally:
        _SPILL.reset(token)


def _check_scratch_setting(folder: str) -> None:
    """A folder the user named for scratch files must take one, whether or not this morph spills anything.

    Checked by making (and removing) a file there: the modes do not tell root what it may write.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=_Scratch.marker, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:  # a file, a missing or read-only folder: a setting to fix, not a bug
        raise UsageError(f"ONNXMORPH_SCRATCH={quote(repr(folder))}: cannot write scratch files for computed "
                         f"weights there ({exc.strerror or exc}); set it to a writable folder") from None


def spill(name: str, array: np.ndarray, dtype: np.dtype | type | None = None) -> onnx.TensorProto | None:
    """A reference to `array` (as `dtype`) written to the scratch file, or None when not spilling or it is small.

    Nothing of `array`'s size is copied: it is written (cast a slab at a time where `dtype`
    differs), and the parent's mapped weights read so far are released (see `unmap_all`).
    """
    scratch = _SPILL.get()
    dtype = np.dtype(dtype if dtype is not None else array.dtype)
    if scratch is None or array.size * dtype.itemsize < SPILL_MIN_BYTES or dtype.byteorder == ">":
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    except Exception:
        return None
    if data_type not in MAPPABLE_TYPES:
        return None
    offset = scratch.write(array, dtype)
    unmap_all()
    return reference(name, data_type, array.shape, str(scratch.path), offset, array.size * dtype.itemsize)


def drop_unreferenced(scratch: _Scratch, models: Iterable[onnx.ModelProto]) -> None:
    """Free the space of the weights in `scratch` that none of `models` refers to (superseded weights)."""
    source = str(scratch.path)
    used = {int(_entries(t).get("offset", 0) or 0) for model in models for t in external_tensors(model)
            if is_reference(t) and _entries(t).get("location") == source}
    stale = set(scratch.extents) - used
    if stale:
        scratch.forget(stale)


def _adopt(model: onnx.ModelProto, data_path: Path) -> tuple[str, int] | None:
    """(old path, end) of the one scratch file `model` refers to, renamed to `data_path`; None when there is none.

    Only a scratch file in `data_path`'s folder is taken over (a rename within one file system).
    """
    sources = {_span(t)[0] for t in model.graph.initializer if is_reference(t)}
    spilled = [s for s in _SCRATCHES if str(s.path) in sources]
    if len(spilled) != 1 or spilled[0].folder.resolve() != data_path.parent.resolve():
        return None
    scratch = spilled[0]
    scratch.close()
    os.replace(scratch.path, data_path)
    _SCRATCHES.remove(scratch)
    return str(scratch.path), scratch.end


def release(scratch: _Scratch | None = None) -> None:
    """Remove `scratch`'s file, or every scratch file (models that still refer to them can no longer be saved)."""
    for item in [scratch] if scratch is not None else list(_SCRATCHES):
        if item not in _SCRATCHES:
            continue  # taken over by a save, or removed already
        _SCRATCHES.remove(item)
        opened = item.fd >= 0
        item.close()
        if opened:
            with contextlib.suppress(FileNotFoundError):
                item.path.unlink()



def is_spilling() -> bool:
    """Whether computed weights are being spilled now (inside `spilling()`)."""
    return _SPILL.get() is not None


def drop_superseded(models: Iterable[onnx.ModelProto]) -> None:
    """While spilling, free the weights none of `models` refers to (a pass that runs several morphs in
    turn drops the weights a later one replaced again, as run_passes does between passes)."""
    scratch = _SPILL.get()
    if scratch is not None:
        drop_unreferenced(scratch, models)

import atexit  # noqa: E402  (registered once the function exists)

atexit.register(release)


# --------------------------------------------------------------------------- mapped weights

_MAPPED: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def unmap_all() -> None:
    """Drop the resident pages of every mapped weight (they stay in the page cache, and are read again if used).

    A weight read through its mapping counts in this process's memory until it is unmapped; the
    arrays may live on (a graph holds them), so their pages are released instead: a morph that
    reads every weight of a model holds the pages of the one it is computing with.
    """
    for mapping in list(_MAPPED):
        with contextlib.suppress(ValueError, OSError):  # closed meanwhile
            mapping.madvise(mmap.MADV_DONTNEED)


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
    `consume`, `model` gives its weights up as they are written (inline ones are dropped, the
    scratch file of its computed weights becomes the data file when it is in the same folder,
    other spilled files are removed): it can no longer be saved. `model` keeps its references; the
    header records `location` (relative to the header's folder). Tensors of subgraphs and
    attributes stay inline (referenced ones are read into the header).
    """
    header = shell(model)
    sources = _Sources()
    # The computed weights are in a scratch file beside the output: it becomes the data file (a
    # rename), the parent's weights are appended after them, and nothing computed is written twice.
    adopted = _adopt(model, data_path) if consume else None
    offset = adopted[1] if adopted is not None else 0
    out = os.open(data_path, os.O_WRONLY | os.O_CREAT | (0 if adopted is not None else os.O_TRUNC), 0o666)
    try:
        for tensor in model.graph.initializer:
            if is_reference(tensor):
                path, src_offset, length = _span(tensor)
                if adopted is not None and path == adopted[0]:  # already in place
                    header.graph.initializer.append(
                        reference(tensor.name, tensor.data_type, tensor.dims, location, src_offset, length))
                    header.graph.initializer[-1].doc_string = tensor.doc_string
                    continue
                offset = aligned(offset, length)
                copy_range(sources.fd(path), out, length, src_offset, offset)
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
    if consume:  # moved, not copied: the disk holds the computed weights once
        discard(model)
    return header


def discard(model: onnx.ModelProto) -> None:
    """Remove the scratch files `model` refers to (it gave its computed weights up: it cannot be saved again)."""
    sources = {_span(t)[0] for t in model.graph.initializer if is_reference(t)}
    for scratch in [s for s in _SCRATCHES if str(s.path) in sources]:
        release(scratch)


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

