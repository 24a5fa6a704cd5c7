"""A search's state file read back and checked: a rerun builds on it, so nothing in it is taken on trust.

The state names files by path and digest; a rerun reads them, copies the best to best.onnx and
morphs them further. A state edited by hand (or by anyone who can write OUTDIR) could name a
file outside OUTDIR with its right digest, or hold a value of the wrong type that would fail deep
inside the loop. `read_state` refuses all of it in one line: each candidate's files are exactly
`candidates/<id>.onnx` and `candidates/<id>.morphed.onnx`, regular files inside OUTDIR (not
links), and every field has the type the search writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from onnxmorph.errors import UsageError
from onnxmorph.limits import quote

STATE_FILE = "search-state.json"
STATE_FORMAT = "onnxmorph-search/1"
CANDIDATES = "candidates"
# A state holds a few hundred bytes per candidate; ONNXMORPH_MAX_CANDIDATES bounds their number.
MAX_STATE_BYTES = 256 * 2**20

CANDIDATE_ID = re.compile(r"root|r(\d{2,})c(\d{2,})")
STATUSES = ("ok", "not applicable", "verification failed", "training failed")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    """What is wrong with the state, said from where it is."""


def candidate_file(cid: str, morphed: bool = False) -> str:
    """Where a candidate's trained (or verified, untrained) model is, relative to OUTDIR."""
    return f"{CANDIDATES}/{cid}{'.morphed' if morphed else ''}.onnx"


def read_state(outdir: Path) -> dict[str, Any]:
    """The state in `outdir`, checked; UsageError naming the file and the problem otherwise."""
    path = outdir / STATE_FILE
    where = f"{path}: not a search state onnxmorph can continue"
    if path.is_symlink() or not path.is_file():
        raise UsageError(f"{where} (not a regular file)")
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise UsageError(f"{where} (larger than {MAX_STATE_BYTES // 2**20} MiB)")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise UsageError(f"{where} (nested too deeply)") from None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON, an integer of 5000 digits
        raise UsageError(f"{where} ({quote(exc, 120)})") from None
    try:
        check_state(data)
    except _Bad as exc:
        raise UsageError(f"{where}: {exc}") from None
    return data


def check_state(state: Any) -> None:
    """Raise _Bad unless `state` has the shape the search writes (see the module's docstring)."""
    state = _object(state, "the state")
    settings = _object(state.get("settings"), "settings")
    if settings.get("format") != STATE_FORMAT:
        raise _Bad(f"settings.format is {quote(repr(settings.get('format')), 60)}, not {STATE_FORMAT!r}")
    parent = _object(settings.get("parent"), "settings.parent")
    _digest(parent.get("sha256"), "settings.parent.sha256")
    _count(state.get("rounds_done"), "rounds_done")
    candidates = state.get("candidates")
    if not isinstance(candidates, list):
        raise _Bad(f"candidates is {_kind(candidates)}, not a list")
    by_id: dict[str, dict[str, Any]] = {}
    for k, entry in enumerate(candidates, 1):
        entry = _object(entry, f"candidate {k}")
        cid = entry.get("id")
        if not isinstance(cid, str) or not CANDIDATE_ID.fullmatch(cid):
            raise _Bad(f"candidate {k}: id {quote(repr(cid), 60)} is not one the search gives")
        if cid in by_id:
            raise _Bad(f"candidate {cid} is listed twice")
        by_id[cid] = entry
        _check_candidate(entry, cid)
    for cid, entry in by_id.items():
        # Each candidate comes from a trained one of an earlier round: the chains end at the root.
        parent_id = entry["parent"]
        if parent_id is None:
            continue
        parent_entry = by_id.get(parent_id)
        if parent_entry is None or parent_entry["status"] != "ok" or parent_entry["round"] >= entry["round"]:
            raise _Bad(f"candidate {cid}: parent {quote(parent_id, 40)} is not a trained candidate of an "
                       "earlier round")


def _check_candidate(entry: dict[str, Any], cid: str) -> None:
    where = f"candidate {cid}"
    round_ = _count(entry.get("round"), f"{where}: round")
    match = CANDIDATE_ID.fullmatch(cid)
    expected_round = 0 if cid == "root" else int(match.group(1))  # type: ignore[union-attr]
    if round_ != expected_round:
        raise _Bad(f"{where}: round {round_}, but its id says {expected_round}")
    parent = entry.get("parent")
    if (cid == "root") != (parent is None) or not (parent is None or isinstance(parent, str)):
        raise _Bad(f"{where}: parent {quote(repr(parent), 40)} is not " + ("null" if cid == "root" else "an id"))
    if entry.get("status") not in STATUSES:
        raise _Bad(f"{where}: status {quote(repr(entry.get('status')), 40)} is not one of {', '.join(STATUSES)}")
    if not isinstance(entry.get("reason", ""), str):
        raise _Bad(f"{where}: reason is {_kind(entry['reason'])}, not text")
    morphs = entry.get("morphs")
    if not isinstance(morphs, list):
        raise _Bad(f"{where}: morphs is {_kind(morphs)}, not a list")
    for j, step in enumerate(morphs, 1):
        step = _object(step, f"{where}: morph {j}")
        if not isinstance(step.get("pass"), str) or not isinstance(step.get("params"), dict):
            raise _Bad(f"{where}: morph {j} is not {{\"pass\": NAME, \"params\": {{...}}}}")
    if entry["status"] != "ok":
        return
    for key, morphed in (("file", False), ("morphed_file", True)):
        if key not in entry and morphed:
            continue
        if entry.get(key) != candidate_file(cid, morphed):
            raise _Bad(f"{where}: {key} {quote(repr(entry.get(key)), 80)} is not {candidate_file(cid, morphed)!r}")
        _digest(entry.get(key[:-4] + "sha256"), f"{where}: {key[:-4]}sha256")
    for key in ("val_score", "val_loss"):
        _number(entry.get(key), f"{where}: {key}")
    for key in ("test_score", "test_loss", "train_loss", "seconds"):
        if entry.get(key) is not None:
            _number(entry[key], f"{where}: {key}")
    _count(entry.get("parameters"), f"{where}: parameters")
    verification = entry.get("verification")
    if verification is not None:
        verification = _object(verification, f"{where}: verification")
        if not isinstance(verification.get("passed"), bool):
            raise _Bad(f"{where}: verification.passed is not true or false")
        _number(verification.get("max_abs_error"), f"{where}: verification.max_abs_error")


def check_files(outdir: Path, state: dict[str, Any]) -> None:
    """Every file the (checked) state lists must be the one the search wrote, inside `outdir`."""
    folder = outdir / CANDIDATES
    if folder.is_symlink() or not folder.is_dir():
        raise UsageError(f"{folder}: not the search's own folder of candidates (missing, or a link)")
    for entry in state["candidates"]:
        for key in ("file", "morphed_file"):
            if key not in entry:
                continue
            path = outdir / entry[key]
            if path.is_symlink() or not path.is_file() or _sha256(path) != entry[key[:-4] + "sha256"]:
                raise UsageError(f"{path}: missing or changed since the search wrote it (or a link); the search "
                                 f"in {outdir} cannot continue from it")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- field checks


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} is {_kind(value)}, not an object")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"{where} is {quote(repr(value), 40)}, not a whole number >= 0")
    return value


def _number(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"{where} is {_kind(value)}, not a number")
    try:
        float(value)
    except OverflowError:
        raise _Bad(f"{where} is a number too large") from None


def _digest(value: Any, where: str) -> None:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise _Bad(f"{where} is not a SHA-256 digest")
