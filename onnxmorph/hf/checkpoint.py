"""Hugging Face checkpoint folders: reading config.json and the safetensors weights, writing a new folder atomically.

transformers loads `model.safetensors` (or shards listed in `model.safetensors.index.json`) without
PyTorch on the writing side; the other format it reads, `pytorch_model.bin`, is a torch pickle that
only torch can write. Tensors are numpy arrays (bfloat16 ones through ml_dtypes, which onnx already
depends on).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxmorph.errors import UsageError, one_line

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# What transformers checks in a safetensors file's metadata before loading it.
METADATA = {"format": "pt"}
# Files of the parent's folder that are its weights or config (rewritten), or not the checkpoint's (exports).
_NOT_COPIED = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json"
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
    """The checkpoint saved in `folder` by `save_pretrained`; UsageError in one line when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (--like takes the folder the parent was saved to with "
                         "save_pretrained)")
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UsageError(f"{folder}: not a Hugging Face checkpoint (no {CONFIG})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{config_path}: not a readable JSON config ({one_line(exc)})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UsageError(f"{config_path}: not a transformers config (no model_type)")
    files = _weight_files(folder)
    tensors: dict[str, np.ndarray] = {}
    safetensors = _safetensors()
    for path in files:
        try:
            with safetensors.safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    if key in tensors:
                        raise UsageError(f"{path}: parameter {key} is also in another weights file")
                    tensors[key] = f.get_tensor(key)
        except UsageError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise UsageError(f"{path}: not a readable safetensors file ({one_line(exc)})") from exc
    if not tensors:
        raise UsageError(f"{folder}: the checkpoint holds no tensors")
    return Checkpoint(folder, config, tensors, files)


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / WEIGHTS, folder / INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{index}: not a readable safetensors index ({one_line(exc)})") from exc
        # The index names files beside it, never elsewhere.
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if bad:
            raise UsageError(f"{index}: names a weights file outside the folder ({bad[0]!r})")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UsageError(f"{index}: lists {missing[0]}, which is not in {folder}")
        return [folder / n for n in names]
    if any((folder / name).is_file() for name in TORCH_WEIGHTS):
        raise UsageError(f"{folder}: holds pytorch_model.bin, not safetensors weights; save the parent again with "
                         "save_pretrained(folder) (safetensors is transformers' default)")
    raise UsageError(f"{folder}: not a Hugging Face checkpoint (no {WEIGHTS} or {INDEX})")


def check_output(out: str | os.PathLike, like: Path, force: bool) -> Path:
    """The output folder, refused (UsageError) when it is the parent's folder or holds files and `force` is off."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.exists() and out.resolve() == like.resolve():
        raise UsageError(f"{out}: is the parent's checkpoint (--like); write the child to another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out}: exists and is not empty (--force replaces it)")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"{out}: its parent folder {out.resolve().parent} does not exist")
    return out


def copied_files(folder: Path) -> list[Path]:
    """The parent folder's files that the child keeps as they are (tokenizer, generation config, ...)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not _NOT_COPIED.fullmatch(p.name))


@contextlib.contextmanager
def _scratch_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` (same file system, so that a rename puts it in place), removed on failure."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def write_checkpoint(out: Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], like: Path,
                     before_commit: Callable[[Path], None] | None = None) -> None:
    """Write config.json, model.safetensors and the parent's other files to a scratch folder, then rename it to `out`.

    `before_commit(scratch)` runs on the written folder before it replaces `out` (a check that raises leaves
    `out` as it was). An existing `out` (empty, or replaced under --force) goes only once the new one is whole.
    """
    safetensors = _safetensors()
    with _scratch_folder(out) as scratch:
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        safetensors.numpy.save_file(arrays, str(scratch / WEIGHTS), metadata=dict(METADATA))
        (scratch / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in copied_files(like):
            shutil.copy2(path, scratch / path.name)
        if before_commit is not None:
            before_commit(scratch)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        try:
            os.replace(scratch, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
