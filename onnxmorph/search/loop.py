"""Morph-based architecture search (NASH-style hill climbing): morphed children of the best models, trained briefly.

    import onnxmorph.search
    result = onnxmorph.search.search("parent.onnx", "digits", "out/", rounds=3, children=4, steps=200)
    result.best["id"], result.best["val_score"]

Each round takes the `keep` best models so far; `children` children are made from them by random
applicable morphs (see onnxmorph.search.space), verified against its parent before training, then
trained for `steps`; NASH's control, the best model trained on without a morph, is a candidate too.
Every candidate is written to OUTDIR/candidates/ (the verified untrained child as ID.morphed.onnx,
the trained one as ID.onnx, its receipt chaining back to the root), and the state file is
replaced atomically after each one, so that rerunning the same search continues where it stopped
and ends with the same files as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxmorph import limits
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.io import loading as mio
from onnxmorph.io import saving
from onnxmorph.limits import quote
from onnxmorph.search import report
from onnxmorph.search.data import Dataset, fit_to_model, load_dataset
from onnxmorph.search.space import MorphChoice, as_choices, propose, signature
from onnxmorph.search.state import CANDIDATES, STATE_FILE, STATE_FORMAT, check_files, read_state
from onnxmorph.search.workers import (
    CandidateTask,
    Training,
    check_cluster,
    check_workers,
    executor,
    parse_ray_address,
    require_ray,
)
from onnxmorph.version import __version__

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, one search per folder is then up to the user
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("onnxmorph")


@dataclass(frozen=True)
class Settings:
    """What decides a search's results (the number of rounds may grow on a rerun; workers change nothing)."""

    children: int = 4
    keep: int = 1
    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 64
    morphs_per_child: int = 1
    parent_steps: int = 0
    seed: int = 0

    def check(self) -> None:
        for name in ("children", "keep", "steps", "batch_size", "morphs_per_child", "parent_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number, not {quote(repr(value), 40)}")
        for name in ("children", "keep", "steps", "batch_size", "morphs_per_child"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.parent_steps < 0 or self.seed < 0:
            raise UsageError("--parent-steps and --seed must not be negative")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 10:
            raise UsageError(f"--lr must be a positive learning rate below 10, not {quote(repr(self.lr), 40)}")
        # Each child is that many morphs in a row, like the steps of a recipe.
        limits.RECIPE_STEPS.check(self.morphs_per_child, f"--morphs-per-child {self.morphs_per_child}")


@dataclass
class SearchResult:
    """Where the search wrote its files, its best model and its leaderboard (best first)."""

    outdir: Path
    best: dict[str, Any]
    root: dict[str, Any]
    leaderboard: list[dict[str, Any]]

    @property
    def best_path(self) -> Path:
        return self.outdir / self.best["file"]


Progress = Callable[[dict[str, Any]], None]


def search(parent: str | os.PathLike, data: str | os.PathLike | Dataset, outdir: str | os.PathLike, *,
           rounds: int = 3, children: int = 4, keep: int = 1, steps: int = 200, lr: float = 3e-3,
           batch_size: int = 64, morphs: Sequence[MorphChoice | str | dict[str, Any]] | None = None,
           morphs_per_child: int = 1, parent_steps: int = 0, workers: int | None = None, ray: bool = False,
           ray_address: str | None = None, seed: int = 0, progress: Progress | None = None) -> SearchResult:
    """Run (or continue) a search from the model file `parent` on `data` ("digits" or an .npz), writing to `outdir`.

    Raises UsageError (nothing written) on bad input, or when `outdir` holds another search or
    other files. Everything is checked, and a Ray cluster connected to, before `outdir` is made;
    a new `outdir` that fails before its first candidate is removed again. Interrupted, it leaves
    OUTDIR consistent; the same call continues it.
    """
    settings = Settings(children, keep, steps, lr, batch_size, morphs_per_child, parent_steps, seed)
    settings.check()
    _check_rounds(rounds, children)
    workers = _default_workers() if workers is None else workers
    check_workers(workers)
    if ray_address:
        parse_ray_address(ray_address)  # its form, before Ray is even imported
    if ray or ray_address:
        require_ray()
    if ray_address:
        check_cluster(ray_address)
    space = tuple(as_choices(morphs))
    root_model, root_bytes, root_sha = _read_parent(Path(parent))
    _check_trainable(root_model)
    dataset = fit_to_model(load_dataset(data), root_model)
    identity = {"format": STATE_FORMAT, "parent": {"file": str(parent), "sha256": root_sha},
                "data": dataset.describe(), "morphs": [str(c) for c in space], **asdict(settings)}
    outdir = Path(outdir)
    state, lock, made = _open_state(outdir, identity)
    run = None
    try:
        run = _Run(outdir, state, settings, space, progress)
        run.save()
        # No more processes than a round can keep busy (its children and the control).
        pool = executor(dataset, min(workers, settings.children + 1), ray, ray_address)
        try:
            run.root(pool, root_bytes)
            for r in range(1, rounds + 1):
                run.round(pool, r, rounds)
        except BaseException:
            pool.close(abort=True)
            raise
        pool.close()
        return run.finish()
    except BaseException:
        if made and (run is None or not run.by_id):
            lock.close()
            _discard(outdir, made)
        raise
    finally:
        lock.close()


def _check_rounds(rounds: int, children: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise UsageError(f"--rounds must be a whole number, 0 or more, not {rounds!r}")
    # Each round plans all its children before the first is trained: sized before anything starts
    # (a round's size alone too, whatever the rounds: a rerun may add rounds).
    limits.CANDIDATES.check(children + 1, f"--children {children}")
    limits.CANDIDATES.check(1 + rounds * (children + 1), f"--rounds {rounds} x --children {children}")


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, limits.WORKERS.value()))


def _read_parent(path: Path) -> tuple[onnx.ModelProto, bytes, str]:
    """The root model, the bytes its file will hold in OUTDIR, and the given file's SHA-256."""
    model = mio.load(path)
    sha = mio.digest(model)
    if mio.had_external_data(model):
        data = model.SerializeToString()  # the search's copy holds its weights inline
        model = mio.load_bytes(data, name=str(path))
    else:
        data = path.read_bytes()
    return model, data, sha


def _check_trainable(model: onnx.ModelProto) -> None:
    try:
        from onnxmorph.train import adapter as ot
    except ImportError as exc:
        raise UsageError(f"search trains with PyTorch ({exc.name} is missing): "
                         "pip install 'onnxmorph[train]'") from None
    ot.OnnxModule(model)  # refuses ops it cannot train, naming them


def _open_state(outdir: Path, identity: dict[str, Any]) -> tuple[dict[str, Any], _Lock, str]:
    """The state of the search in `outdir` (a new one, or the one there when it is this search), its lock,
    and what this call made: "folder" (outdir itself), "contents" (in an empty outdir) or "" (a rerun).
    """
    path = outdir / STATE_FILE
    if path.is_file() or path.is_symlink():
        lock = _Lock(outdir)
        try:
            state = read_state(outdir)
            _check_same_search(state["settings"], identity, outdir)
        except BaseException:
            lock.close()
            raise
        return state, lock, ""
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise UsageError(f"{outdir}: exists and holds no search; give a new or empty folder")
    parent = outdir.parent if str(outdir.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{outdir}: folder '{parent}' does not exist")
    made = "contents" if outdir.is_dir() else "folder"
    try:
        outdir.mkdir(exist_ok=made == "contents")
    except FileExistsError:
        raise UsageError(f"{outdir}: another search made it just now") from None
    except OSError as exc:
        raise UsageError(f"{outdir}: cannot create it ({exc.strerror})") from None
    try:
        lock = _Lock(outdir)
    except BaseException:
        _discard(outdir, made)
        raise
    try:
        (outdir / CANDIDATES).mkdir()
    except OSError as exc:
        lock.close()
        _discard(outdir, made)
        raise UsageError(f"{outdir}: cannot create it ({exc.strerror})") from None
    state = {"settings": identity, "tool": f"onnxmorph {__version__}", "rounds_done": 0, "candidates": []}
    return state, lock, made


def _discard(outdir: Path, made: str) -> None:
    """Take back what a search that failed before its first candidate made: its files, and the folder if it made it."""
    for name in (STATE_FILE, "leaderboard.json", "leaderboard.csv", "leaderboard.png", "best.onnx"):
        with contextlib.suppress(FileNotFoundError):
            (outdir / name).unlink()
    with contextlib.suppress(OSError):  # not empty: something else is in there, which stays
        (outdir / CANDIDATES).rmdir()
    if made == "folder":
        with contextlib.suppress(OSError):
            outdir.rmdir()


class _Lock:
    """An exclusive lock on the search in `outdir` while it is open (gone with the process).

    The folder itself is locked, not a lock file in it: refusing a folder leaves nothing behind.
    """

    def __init__(self, outdir: Path) -> None:
        self.fd: int | None = None
        if fcntl is None:
            return
        try:
            self.fd = os.open(outdir, os.O_RDONLY)
        except OSError as exc:
            raise UsageError(f"{outdir}: cannot open it ({exc.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"{outdir}: another search is running there") from None
            # A file system without locks (some network ones): one search per folder is up to the user.
            log.debug("%s: cannot be locked (%s)", outdir, exc.strerror)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_same_search(saved: dict[str, Any], identity: dict[str, Any], outdir: Path) -> None:
    for key, value in identity.items():
        if key == "parent":
            value, old = value["sha256"], saved["parent"]["sha256"]
        else:
            old = saved.get(key)
        if old != value:
            raise UsageError(f"{outdir} holds a search with other settings ({key}: {_brief(old)} there, "
                             f"{_brief(value)} now); rerun it with the same ones, or use another folder")


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _task_seed(seed: int, round_: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, round_, index]).generate_state(1)[0])


class _Run:
    """The loop's bookkeeping: which candidates exist, writing each as it arrives, the kept set."""

    def __init__(self, outdir: Path, state: dict[str, Any], settings: Settings, space: tuple[MorphChoice, ...],
                 progress: Progress | None) -> None:
        self.outdir, self.state, self.settings, self.space = outdir, state, settings, space
        self.progress = progress
        self.by_id = {c["id"]: c for c in state["candidates"]}
        check_files(outdir, state)  # on a rerun, every file listed must still be the one the search wrote

    def _training(self, steps: int) -> Training:
        return Training(steps, self.settings.lr, self.settings.batch_size)

    def root(self, pool: Any, root_bytes: bytes) -> None:
        if "root" in self.by_id:
            return
        log.info("scoring the parent%s", f" after {self.settings.parent_steps} steps" if self.settings.parent_steps
                 else "")
        seed = _task_seed(self.settings.seed, 0, 0)
        task = CandidateTask("root", seed, (), self._training(self.settings.parent_steps))
        for result in pool.run([(task, root_bytes)]):
            self._record(result, 0, None, (1, 1))

    def round(self, pool: Any, r: int, rounds: int) -> None:
        kept = report.ranked(self.state["candidates"], before_round=r)[: self.settings.keep]
        if not kept:
            raise UsageError(self._root_failure())
        planned = self._plan(r, kept)
        parents = {cid: parent["id"] for cid, parent, _ in planned}
        done = sum(cid in self.by_id for cid, _, _ in planned)
        if done < len(planned):
            log.info("round %d/%d: %d candidates from %s", r, rounds, len(planned),
                     ", ".join(dict.fromkeys(parents.values())))
        jobs = []
        for cid, parent, morphs in planned:
            if cid in self.by_id:
                continue
            if isinstance(morphs, str):  # nothing applied: recorded as such, nothing to run
                done += 1
                self._record({"id": cid, "status": "not applicable", "reason": morphs, "morphs": []}, r,
                             parent["id"], (done, len(planned)), rounds)
                continue
            task = CandidateTask(cid, _task_seed(self.settings.seed, r, int(cid.rpartition("c")[2])), tuple(morphs),
                                 self._training(self.settings.steps))
            jobs.append((task, (self.outdir / parent["file"]).read_bytes()))
        for result in pool.run(jobs):
            done += 1
            self._record(result, r, parents[result["id"]], (done, len(planned)), rounds)
        self.state["rounds_done"] = max(self.state["rounds_done"], r)
        self.save()
        report.write(self.outdir, self.state)

    def _root_failure(self) -> str:
        root = self.by_id.get("root", {})
        return f"the parent could not be trained and scored ({root.get('reason', 'no result')}); nothing to search from"

    def _plan(self, r: int, kept: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], Any]]:
        """The round's candidates: (id, parent, the morphs or why none applied); the same on every rerun.

        The first is NASH's control, the best model trained on without a morph. The children's
        morphs are drawn here, one child after the other, each avoiding what an earlier child of the
        same parent got (drawing in the workers could not), from a generator seeded by the search's
        seed, the round and the child's number.
        """
        planned: list[tuple[str, dict[str, Any], Any]] = [(f"r{r:02d}c00", kept[0], [])]
        models: dict[str, onnx.ModelProto] = {}
        taken: dict[str, set[str]] = {}
        for c in range(1, self.settings.children + 1):
            parent = kept[(c - 1) % len(kept)]
            if parent["id"] not in models:
                models[parent["id"]] = mio.load_bytes((self.outdir / parent["file"]).read_bytes(), parent["id"])
            rng = np.random.default_rng(_task_seed(self.settings.seed, r, c))
            try:
                passes = propose(models[parent["id"]], rng, self.space, self.settings.morphs_per_child,
                                 avoid=taken.setdefault(parent["id"], set()))
            except (NotApplicable, UsageError) as exc:
                planned.append((f"r{r:02d}c{c:02d}", parent, str(exc)))
                continue
            taken[parent["id"]].add(signature(passes))
            planned.append((f"r{r:02d}c{c:02d}", parent, [{"pass": p.name, "params": dict(p.config)} for p in passes]))
        return planned

    def _record(self, result: dict[str, Any], r: int, parent: str | None, count: tuple[int, int],
                rounds: int = 0) -> None:
        cid = result["id"]
        entry = {k: v for k, v in result.items() if k not in ("untrained", "trained")}
        entry.update(round=r, parent=parent)
        if result["status"] == "ok":
            folder = self.outdir / CANDIDATES
            if result.get("untrained") is not None:
                saving.write_atomically(folder / f"{cid}.morphed.onnx", result["untrained"])
                entry["morphed_file"] = f"{CANDIDATES}/{cid}.morphed.onnx"
                entry["morphed_sha256"] = hashlib.sha256(result["untrained"]).hexdigest()
            saving.write_atomically(folder / f"{cid}.onnx", result["trained"])
            entry["file"] = f"{CANDIDATES}/{cid}.onnx"
            entry["sha256"] = hashlib.sha256(result["trained"]).hexdigest()
        self.state["candidates"] = [c for c in self.state["candidates"] if c["id"] != cid] + [entry]
        self.by_id[cid] = entry
        self.save()
        self._announce(entry, r, rounds, count)

    def _announce(self, entry: dict[str, Any], r: int, rounds: int, count: tuple[int, int]) -> None:
        best = report.ranked(self.state["candidates"])
        best_entry = best[0] if best else None
        what = (f"val {entry['val_score']:.4f}, {entry['parameters']} params" if entry["status"] == "ok"
                else f"{entry['status']}: {entry.get('reason', '')}")
        where = f"round {r}/{rounds}" if r else "parent"
        label = "" if entry["id"] == "root" else f" {report.change(entry)}"
        log.info("%s: %d/%d done; %s%s (%s); best so far %s", where, count[0], count[1], entry["id"], label, what,
                 f"{best_entry['id']} val {best_entry['val_score']:.4f}" if best_entry else "none")
        if self.progress is not None:
            self.progress({"round": r, "rounds": rounds, "done": count[0], "total": count[1], "candidate": entry,
                           "best": best_entry})

    def save(self) -> None:
        text = json.dumps(self.state, indent=1, sort_keys=True) + "\n"
        saving.write_atomically(self.outdir / STATE_FILE, text.encode())

    def finish(self) -> SearchResult:
        document = report.write(self.outdir, self.state)
        if document["best"] is None:
            raise UsageError(self._root_failure())
        best = self.by_id[document["best"]]
        report.plot(self.state, self.outdir / "leaderboard.png")
        saving.write_atomically(self.outdir / "best.onnx", (self.outdir / best["file"]).read_bytes())
        return SearchResult(self.outdir, best, self.by_id["root"], document["leaderboard"])
