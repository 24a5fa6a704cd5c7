"""Atomic saving: a temporary file beside the target, renamed over it only when complete."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

import onnx

from onnxmorph import limits
from onnxmorph.errors import UsageError
from onnxmorph.io import streaming
from onnxmorph.io.framing import length_delimited
from onnxmorph.io.proto import approx_size, strip_transient_metadata

PathLike = Union[str, os.PathLike]


EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


def save(model: onnx.ModelProto, path: PathLike, *, external_data: bool | None = None,
         consume: bool = False, before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write `model` to `path` atomically: a temporary file in the target folder, then a rename.

    External data (a `<name>.data` file beside the model) is used when asked, or automatically
    when the model would pass protobuf's 2 GiB limit. On any failure, including an interrupt,
    the previous file at `path` (if any) is left as it was and no temporary file remains.
    With `consume`, a model written with external data gives its weights up as they are written
    instead of being copied first (the caller must not use it afterwards): it saves the model's
    size in memory. A model that streams (see onnxmorph.io.streaming) has its referenced weights
    copied file to file, into the data file or the model file. `before_commit(temporary model path)` runs on the
    complete files before they are renamed into place (verification by path): when it raises,
    nothing is replaced; metadata it adds to `model` is written with the model.
    """
    path = check_output_path(path)
    folder = path.parent
    # The load-time bookkeeping is taken out of `model` and put back afterwards, instead of
    # saving a stripped copy: a copy of a 500 MB model costs its size in memory and a second.
    saved = list(model.metadata_props)
    strip_transient_metadata(model)
    stripped = [p for p in saved if p not in model.metadata_props]
    try:
        if external_data is None:
            external_data = approx_size(model) >= EXTERNAL_DATA_THRESHOLD
        data_name = path.name + ".data"
        if external_data:
            check_output_path(folder / data_name)
        # The weights are renamed into place before the model file: until the model's rename has
        # happened too, the old weights must come back on failure (old model + new weights is corrupt).
        with restored_on_failure(folder / data_name) if external_data else contextlib.nullcontext():
            with _atomic_target(path) as tmp_model:
                if external_data:
                    with _atomic_target(folder / data_name) as tmp_data:
                        _write_external(model, tmp_model, tmp_data.name, data_name, consume, before_commit)
                else:
                    _write_inline(model, tmp_model, before_commit, consume)
    finally:
        if stripped:  # put the bookkeeping back, keeping what a before_commit added
            kept = [p for p in model.metadata_props if p not in stripped]
            del model.metadata_props[:]
            model.metadata_props.extend(stripped + kept)
    return path


def _write_external(model: onnx.ModelProto, target: Path, data_file: str, final_name: str, consume: bool,
                    before_commit: Callable[[Path], None] | None) -> None:
    if before_commit is None:
        write_with_external_data(model, target, data_file=data_file, final_data_name=final_name, consume=consume)
        return
    # The header first names the temporary data file, so that the files can be checked as they are.
    header = write_with_external_data(model, target, data_file=data_file, consume=consume)
    before_commit(target)
    streaming.set_location(header, data_file, final_name)
    del header.metadata_props[:]
    header.metadata_props.extend(_without_transient(model).metadata_props)
    _write_bytes(target, header.SerializeToString())


def _write_inline(model: onnx.ModelProto, target: Path, before_commit: Callable[[Path], None] | None,
                  consume: bool = False) -> None:
    """One file; referenced weights copied into it. With `before_commit`, the metadata goes last.

    The file is checked before its metadata (the receipt of that check) is appended: protobuf
    merges a repeated field however its entries are spread, so nothing is rewritten.
    """
    held = list(model.metadata_props) if before_commit is not None else []
    if held:
        del model.metadata_props[:]
    try:
        if streaming.streams(model):
            streaming.write_inline(model, target)
            if consume:  # its computed weights are in the file now: their scratch file goes
                streaming.discard(model)
        else:
            _write_bytes(target, model.SerializeToString())
    finally:
        if held:
            model.metadata_props.extend(held)
    if before_commit is None:
        return
    before_commit(target)
    tail = b"".join(length_delimited(_MODEL_METADATA, p.SerializeToString())
                    for p in _without_transient(model).metadata_props)
    with open(target, "ab") as f:
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())


_MODEL_METADATA = 14  # ModelProto.metadata_props


def _without_transient(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself, its load-time bookkeeping (added back by a `before_commit`) dropped."""
    strip_transient_metadata(model)
    return model


def write_atomically(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` as `save` writes a model: a temporary file renamed into place, the mode kept."""
    path = check_output_path(path)
    with _atomic_target(path) as tmp:
        _write_bytes(tmp, data)
    return path


def check_output_path(path: PathLike) -> Path:
    """The file an output will replace: refused unless it is a regular file or absent.

    A symlink is followed (the file it names is replaced and the link kept); a device, FIFO,
    socket or folder is refused (as root, `-o /dev/null` would otherwise replace /dev/null).
    """
    path = Path(path)
    _check_name_length(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise UsageError(f"{limits.quote(path)}: is a folder; give a file name for the output")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise UsageError(f"{limits.quote(path)}: is not a regular file (a device, FIFO or socket); "
                         "refused to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{limits.quote(path)}: folder '{limits.quote(folder)}' does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{limits.quote(path)}: folder '{limits.quote(folder)}' is not writable")
    _check_name_length(path)
    return path


def _check_name_length(path: Path) -> None:
    try:
        longest = os.pathconf(path.parent if str(path.parent) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if len(os.fsencode(path.name)) > longest:
        raise UsageError(f"{limits.quote(path)}: the file name is longer than the {longest} bytes "
                         "this folder allows")


def _new_file_mode(path: Path) -> int:
    """The mode a replaced file keeps; otherwise what open() would give a new file (0666 & ~umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _temporary_name(path: Path) -> tuple[str, str]:
    """A prefix and suffix for a temporary file beside `path` that fit the folder's name limit."""
    stem = path.name.encode()[:100].decode(errors="ignore")  # mkstemp adds 8 characters
    return f".{stem}.", ".tmp"


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    prefix, suffix = _temporary_name(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    except OSError as exc:
        raise UsageError(f"{limits.quote(path)}: cannot write: {exc.strerror}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def restored_on_failure(path: Path) -> Iterator[None]:
    """Put the file at `path` back as it was (or remove it, if there was none) when the block fails.

    Several files written as one output (a child and its diff page) each get one: whichever
    write fails, or an interrupt after the first, none of them is left changed.
    """
    backup: Path | None = None
    if path.is_file():
        prefix, suffix = _temporary_name(path)
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
            os.close(fd)
            os.unlink(name)
            os.link(path, name)  # a second name for the old bytes: no copy, even at 2 GiB
            backup = Path(name)
        except OSError:  # no hard links here: the old file cannot be kept (the write itself is still atomic)
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


def write_with_external_data(
    model: onnx.ModelProto, target: Path, data_file: str | None = None, final_data_name: str | None = None,
    consume: bool = False,
) -> onnx.ModelProto:
    """Write `model` to `target` with its weights in an external file beside it; returns the header written.

    The tensors are written to `data_file` (a name in target's folder) but recorded under
    `final_data_name`, so that a temporary data file can be renamed into place afterwards.
    Weights that `model` refers to in other files (a streaming model) are copied file to file;
    with `consume`, `model` itself loses its inline weights to the file instead of a copy of them.
    """
    data_file = data_file or target.name + ".data"
    header = streaming.write_tensors(model, target.parent / data_file, final_data_name or data_file, consume=consume)
    _write_bytes(target, header.SerializeToString())
    return header
