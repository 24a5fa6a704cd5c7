"""Hugging Face checkpoint folders: reading config.json and the safetensors weights, writing a new folder atomically.

transformers loads `model.safetensors` (or shards listed in `model.safetensors.index.json`) without
PyTorch on the writing side; the other format it reads, `pytorch_model.bin`, is serialised by torch, and
only torch can write or safely read it. Tensors are numpy arrays (bfloat16 ones through ml_dtypes, which onnx already
depends on).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxmorph import limits
from onnxmorph.errors import UsageError, one_line
from onnxmorph.limits import quote

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# What transformers checks in a safetensors file's metadata before loading it.
METADATA = {"format": "pt"}
# config.json and the index are a few KiB to a few MiB; a larger one is refused before it is read.
MAX_JSON_BYTES = 16 * 2**20
# Files of the parent's folder that are its weights or config (rewritten), or not the checkpoint's (exports).
# Any safetensors file is weights (a sharded parent's shards may have any names its index gives them).
_NOT_COPIED = re.compile(r".*\.safetensors|.*\.safetensors\.index\.json|config\.json"
                         r"|pytorch_model.*\.bin(\.index\.json)?|.*\.onnx(\.data)?|.*\.onnx_data")


@dataclass
class Checkpoint:
    """A checkpoint folder: its config (as a dict), its tensors by parameter name, the files that hold them."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    weight_files: list[Path]


def _safetensors() -> Any:
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise UsageError("export-hf needs the safetensors package: pip install 'onnxmorph[hf]'") from exc
    return safetensors


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """The checkpoint saved in `folder` by `save_pretrained`; UsageError in one line when it is not one.

    Every file read is a regular file in `folder` (or a symlink to one there, or into the Hugging Face
    cache's `blobs`); config.json is bounded and checked before it is parsed, and the weights' total size
    against ONNXMORPH_MAX_MODEL_BYTES before any of them is read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{quote(folder)}: no such folder (--like takes the folder the parent was saved to with "
                         "save_pretrained)")
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UsageError(f"{quote(folder)}: not a Hugging Face checkpoint (no {CONFIG})")
    config = read_json(config_path, folder, "a readable JSON config")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UsageError(f"{quote(config_path)}: not a transformers config (no model_type)")
    files = _weight_files(folder)
    limits.check_model_bytes(sum(source_file(path, folder).stat().st_size for path in files + copied_files(folder)),
                             f"{quote(folder)}: its weights and the files copied from it")
    tensors: dict[str, np.ndarray] = {}
    safetensors = _safetensors()
    for path in files:
        try:
            with safetensors.safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    if key in tensors:
                        raise UsageError(f"{quote(path)}: parameter {quote(key)} is also in another weights file")
                    tensors[key] = f.get_tensor(key)
        except UsageError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise UsageError(f"{quote(path)}: not a readable safetensors file ({one_line(exc)})") from exc
    if not tensors:
        raise UsageError(f"{quote(folder)}: the checkpoint holds no tensors")
    return Checkpoint(folder, config, tensors, files)


def source_file(path: Path, folder: Path) -> Path:
    """`path`, a file of the checkpoint `folder`, when it is a regular file there; UsageError otherwise.

    A symlink may point inside the folder, or into the `blobs` folder of the Hugging Face cache that
    the folder is a snapshot of (`snapshots/REV/config.json -> ../../blobs/HASH`); one that leads
    anywhere else is refused: the checkpoint's files are copied into the child's folder, and a shared
    folder's `tokenizer.json -> ~/.ssh/id_rsa` would be copied too. Devices, FIFOs and /proc files
    (which read without end or fail) are refused as not regular.
    """
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(folder))
    # The cache's blobs folder by name, not resolved: a `blobs` that is itself a symlink leads elsewhere.
    if not (real.is_relative_to(root) or real.parent == root.parent.parent / "blobs"):
        raise UsageError(f"{quote(path)}: is a symlink to {quote(real)}, outside the checkpoint's folder; refused "
                         "(copy the file into the folder)")
    try:
        regular = stat.S_ISREG(real.stat().st_mode)
    except OSError as exc:
        raise UsageError(f"{quote(path)}: cannot read: {exc.strerror or exc}") from exc
    if not regular:
        raise UsageError(f"{quote(path)}: is not a regular file (a device, FIFO or socket); refused")
    return real


def read_json(path: Path, folder: Path, what: str) -> Any:
    """The JSON document in `path` (a file of the checkpoint `folder`), or UsageError saying it is not `what`.

    Refused before parsing: a file over MAX_JSON_BYTES; while parsing: nesting deeper than Python
    recurses, and integers of more digits than Python converts (each a one-line error, never a
    RecursionError or ValueError).
    """
    real = source_file(path, folder)
    where = f"{quote(path)}: not {what}"
    try:
        size = real.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UsageError(f"{where} (larger than {MAX_JSON_BYTES // 2**20} MiB)")
        with open(real, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:  # (grown since it was measured)
            raise UsageError(f"{where} (larger than {MAX_JSON_BYTES // 2**20} MiB)")
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise UsageError(f"{where} (nested too deeply)") from None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON, an integer of 5000 digits
        raise UsageError(f"{where} ({quote(one_line(exc), 120)})") from None


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / WEIGHTS, folder / INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        document = read_json(index, folder, "a readable safetensors index")
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UsageError(f"{quote(index)}: not a readable safetensors index (its weight_map is not an object of "
                             "parameter -> file name)")
        names = sorted(set(weight_map.values()))
        # The index names files beside it, never elsewhere.
        bad = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
        if bad:
            raise UsageError(f"{quote(index)}: names a weights file outside the folder ({quote(repr(bad[0]), 80)})")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UsageError(f"{quote(index)}: lists {quote(missing[0], 80)}, which is not in {quote(folder)}")
        return [folder / n for n in names]
    if any((folder / name).is_file() for name in TORCH_WEIGHTS):
        raise UsageError(f"{quote(folder)}: holds pytorch_model.bin, not safetensors weights; save the parent again "
                         "with save_pretrained(folder) (safetensors is transformers' default)")
    raise UsageError(f"{quote(folder)}: not a Hugging Face checkpoint (no {WEIGHTS} or {INDEX})")


def check_output(out: str | os.PathLike, like: Path, force: bool, inputs: Sequence[Path] = ()) -> Path:
    """The folder to write, refused (UsageError) unless writing it leaves every input as it was.

    A symlink is followed (the folder it names is written, the link kept), as `-o` of a model is.
    Refused: the root, a file, the parent's checkpoint or a folder inside it (which would change the
    parent's folder), a folder that holds the checkpoint or any of `inputs` (replacing it would delete
    them, even under `force`), a folder with files without `force`, a name longer than the file system
    allows, a parent folder that is missing or not writable.
    """
    if not str(out):
        raise UsageError("-o: an empty folder name")
    given = Path(out)
    target = Path(os.path.realpath(given))
    shown = quote(given)
    if target == Path(target.anchor):
        raise UsageError(f"{shown}: is the root folder; write the child to a folder of its own")
    try:
        longest = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if len(os.fsencode(target.name)) > longest:
        raise UsageError(f"{shown}: the folder name is longer than the {longest} bytes this file system allows")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{shown}: exists and is not a folder")
    parent = Path(os.path.realpath(like))
    if target == parent:
        raise UsageError(f"{shown}: is the parent's checkpoint (--like); write the child to another folder")
    if target.is_relative_to(parent):
        raise UsageError(f"{shown}: is inside the parent's checkpoint (--like {quote(like)}); writing it would change "
                         "the parent's folder: write the child to another folder")
    for path in (like, *inputs):
        real = Path(os.path.realpath(path))
        if real.is_relative_to(target):
            raise UsageError(f"{shown}: holds {quote(path)}, which export-hf reads; replacing the folder would "
                             "delete it: write the child to another folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"{shown}: exists and is not empty (--force replaces it)")
    if not target.parent.is_dir():
        raise UsageError(f"{shown}: its parent folder {quote(target.parent)} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise UsageError(f"{shown}: its parent folder {quote(target.parent)} is not writable")
    return target


def copied_files(folder: Path) -> list[Path]:
    """The parent folder's files that the child keeps as they are (tokenizer, generation config, ...).

    Each is checked by `source_file` (a symlink out of the folder is refused, not followed).
    """
    return sorted(p for p in folder.iterdir() if p.is_file() and not _NOT_COPIED.fullmatch(p.name)
                  and source_file(p, folder))


def _temporary_name(out: Path, kind: str) -> str:
    """A hidden name beside `out` that fits the folder's name limit (mkdtemp adds 8 characters)."""
    stem = out.name.encode()[:100].decode(errors="ignore")
    return f".{stem}.{kind}"


@contextlib.contextmanager
def _scratch_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` (same file system, so that a rename puts it in place), removed on failure.

    It gets the mode a new folder gets (mkdtemp makes it private) or, replacing `out`, that folder's mode.
    """
    try:
        scratch = Path(tempfile.mkdtemp(prefix=_temporary_name(out, ""), suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise UsageError(f"{quote(out)}: cannot write: {exc.strerror or exc}") from exc
    try:
        try:
            mode = stat.S_IMODE(out.stat().st_mode)
        except OSError:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o777 & ~mask
        os.chmod(scratch, mode | stat.S_IRWXU)
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _write_files(scratch: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], like: Path) -> None:
    """config.json, model.safetensors and the copied files in `scratch`; UsageError on a full disk or a failed write."""
    safetensors = _safetensors()
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    try:
        safetensors.numpy.save_file(arrays, str(scratch / WEIGHTS), metadata=dict(METADATA))
    except OSError as exc:
        raise UsageError(f"{quote(scratch.parent)}: cannot write the weights: {exc.strerror or exc}") from exc
    except Exception as exc:  # safetensors' own SafetensorError wraps the I/O error ("No space left on device")
        if "I/O error" not in str(exc):
            raise
        raise UsageError(f"{quote(scratch.parent)}: cannot write the weights: {quote(one_line(exc), 160)}") from exc
    try:
        (scratch / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in copied_files(like):
            shutil.copyfile(source_file(path, like), scratch / path.name)
            shutil.copymode(source_file(path, like), scratch / path.name)
    except OSError as exc:
        raise UsageError(f"{quote(scratch.parent)}: cannot write: {exc.strerror or exc}") from exc


def write_checkpoint(out: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], like: Path,
                     before_commit: Callable[[Path], None] | None = None) -> None:
    """Write config.json, model.safetensors and the parent's other files to a scratch folder, then rename it to `out`.

    `out` is the folder `check_output` returned (symlinks resolved). `before_commit(scratch)` runs on the
    written folder before it replaces `out` (a check that raises leaves `out` as it was). An existing `out`
    (empty, or replaced under --force) goes only once the new one is whole; on any failure or interrupt
    nothing of the new folder stays.
    """
    with _scratch_folder(out) as scratch:
        _write_files(scratch, config, tensors, like)
        if before_commit is not None:
            before_commit(scratch)
        old = None
        try:
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=_temporary_name(out, "old."), suffix=".tmp", dir=out.parent))
                os.replace(out, old)  # (an empty folder `old` is replaced by a rename)
            os.replace(scratch, out)
        except BaseException as exc:
            if old is not None and not out.exists():
                os.replace(old, out)
            elif old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if isinstance(exc, OSError):
                raise UsageError(f"{quote(out)}: cannot write: {exc.strerror or exc}") from exc
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
