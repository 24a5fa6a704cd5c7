"""A search's state file read back and checked: a rerun builds on it, so nothing in it is taken on trust.

The state names files by path and digest; a rerun reads them, copies the best to best.onnx and
morphs them further. A state edited by hand (or by anyone who can write OUTDIR) could name a
file outside OUTDIR with its right digest, or hold a value of the wrong type that would fail deep
inside the loop. `read_state` refuses all of it in one line: each candidate's files are exactly
`candidates/<id>.onnx` and `candidates/<id>.morphed.onnx`, regular files inside OUTDIR (not
links), and every field has the type the search writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from onnxmorph.errors import UsageError
from onnxmorph.fields import Malformed, as_digest, as_integer, as_list, as_number, as_object, kind
from onnxmorph.io.loading import file_sha256
from onnxmorph.limits import quote

STATE_FILE = "search-state.json"
STATE_FORMAT = "onnxmorph-search/1"
CANDIDATES = "candidates"
# A state holds a few hundred bytes per candidate; ONNXMORPH_MAX_CANDIDATES bounds their number.
MAX_STATE_BYTES = 256 * 2**20

CANDIDATE_ID = re.compile(r"root|r(\d{2,})c(\d{2,})")
STATUSES = ("ok", "not applicable", "verification failed", "training failed")


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
    except Malformed as exc:
        raise UsageError(f"{where}: {exc}") from None
    return data


def check_state(state: Any) -> None:
    """Raise Malformed unless `state` has the shape the search writes (see the module's docstring)."""
    state = as_object(state, "the state")
    settings = as_object(state.get("settings"), "settings")
    if settings.get("format") != STATE_FORMAT:
        raise Malformed(f"settings.format is {quote(repr(settings.get('format')), 60)}, not {STATE_FORMAT!r}")
    parent = as_object(settings.get("parent"), "settings.parent")
    as_digest(parent.get("sha256"), "settings.parent.sha256")
    as_integer(state.get("rounds_done"), "rounds_done", minimum=0)
    candidates = as_list(state.get("candidates"), "candidates")
    by_id: dict[str, dict[str, Any]] = {}
    for k, entry in enumerate(candidates, 1):
        entry = as_object(entry, f"candidate {k}")
        cid = entry.get("id")
        if not isinstance(cid, str) or not CANDIDATE_ID.fullmatch(cid):
            raise Malformed(f"candidate {k}: id {quote(repr(cid), 60)} is not one the search gives")
        if cid in by_id:
            raise Malformed(f"candidate {cid} is listed twice")
        by_id[cid] = entry
        _check_candidate(entry, cid)
    for cid, entry in by_id.items():
        # Each candidate comes from a trained one of an earlier round: the chains end at the root.
        parent_id = entry["parent"]
        if parent_id is None:
            continue
        parent_entry = by_id.get(parent_id)
        if parent_entry is None or parent_entry["status"] != "ok" or parent_entry["round"] >= entry["round"]:
            raise Malformed(f"candidate {cid}: parent {quote(parent_id, 40)} is not a trained candidate of an "
                       "earlier round")


def _check_candidate(entry: dict[str, Any], cid: str) -> None:
    where = f"candidate {cid}"
    round_ = as_integer(entry.get("round"), f"{where}: round", minimum=0)
    match = CANDIDATE_ID.fullmatch(cid)
    expected_round = 0 if cid == "root" else int(match.group(1))  # type: ignore[union-attr]
    if round_ != expected_round:
        raise Malformed(f"{where}: round {round_}, but its id says {expected_round}")
    parent = entry.get("parent")
    if (cid == "root") != (parent is None) or not (parent is None or isinstance(parent, str)):
        raise Malformed(f"{where}: parent {quote(repr(parent), 40)} is not " + ("null" if cid == "root" else "an id"))
    if entry.get("status") not in STATUSES:
        raise Malformed(f"{where}: status {quote(repr(entry.get('status')), 40)} is not one of {', '.join(STATUSES)}")
    if not isinstance(entry.get("reason", ""), str):
        raise Malformed(f"{where}: reason is {kind(entry['reason'])}, not text")
    for j, step in enumerate(as_list(entry.get("morphs"), f"{where}: morphs"), 1):
        step = as_object(step, f"{where}: morph {j}")
        if not isinstance(step.get("pass"), str) or not isinstance(step.get("params"), dict):
            raise Malformed(f"{where}: morph {j} is not {{\"pass\": NAME, \"params\": {{...}}}}")
    if entry["status"] != "ok":
        return
    for key, morphed in (("file", False), ("morphed_file", True)):
        if key not in entry and morphed:
            continue
        if entry.get(key) != candidate_file(cid, morphed):
            raise Malformed(f"{where}: {key} {quote(repr(entry.get(key)), 80)} is not {candidate_file(cid, morphed)!r}")
        as_digest(entry.get(key[:-4] + "sha256"), f"{where}: {key[:-4]}sha256")
    for key in ("val_score", "val_loss"):
        as_number(entry.get(key), f"{where}: {key}")
    for key in ("test_score", "test_loss", "train_loss", "seconds"):
        if entry.get(key) is not None:
            as_number(entry[key], f"{where}: {key}")
    as_integer(entry.get("parameters"), f"{where}: parameters", minimum=0)
    verification = entry.get("verification")
    if verification is not None:
        verification = as_object(verification, f"{where}: verification")
        if not isinstance(verification.get("passed"), bool):
            raise Malformed(f"{where}: verification.passed is not true or false")
        as_number(verification.get("max_abs_error"), f"{where}: verification.max_abs_error")


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
            if path.is_symlink() or not path.is_file() or file_sha256(path) != entry[key[:-4] + "sha256"]:
                raise UsageError(f"{path}: missing or changed since the search wrote it (or a link); the search "
                                 f"in {outdir} cannot continue from it")
