"""A search's candidate job (morph, verify, train, score) and where it runs: this process, local workers, or Ray."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxmorph.contract.registry import get_pass
from onnxmorph.errors import NotApplicable, UsageError, VerificationFailed
from onnxmorph.io import loading as mio
from onnxmorph.pipeline import receipt
from onnxmorph.pipeline.run import VerifyOptions, run_passes
from onnxmorph.search.data import Dataset
from onnxmorph.verification.verifier import Report
from onnxmorph.version import __version__

log = logging.getLogger("onnxmorph")

RAY_HINT = "pip install 'onnxmorph[search]'"


@dataclass(frozen=True)
class Training:
    """How each candidate is trained: Adam for `steps` minibatch steps."""

    steps: int
    lr: float
    batch_size: int


@dataclass(frozen=True)
class CandidateTask:
    """One candidate: morphs ({"pass", "params"}) of the parent (none: the parent trained on), then training."""

    id: str
    seed: int
    morphs: tuple[dict[str, Any], ...]
    training: Training


def run_candidate(task: CandidateTask, parent: bytes, data: Dataset) -> dict[str, Any]:
    """Morph the parent (given as its file's bytes), verify the child against it, train it and score it.

    The untrained child is verified before any training and returned beside the trained one
    (both serialised); the trained one's receipt ends with a training record whose parent digest
    is the untrained child's. A morph that does not apply or does not verify makes a failed
    candidate (status and reason), not an exception.
    """
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    model = mio.load_bytes(parent, name=f"parent of {task.id}")
    result: dict[str, Any] = {"id": task.id, "status": "ok", "morphs": [], "verification": None}
    untrained = parent
    if task.morphs:
        try:
            passes = [get_pass(m["pass"])(**m["params"]) for m in task.morphs]
            outcome = run_passes(model, passes, VerifyOptions())
        except (NotApplicable, UsageError) as exc:
            return {**result, "status": "not applicable", "reason": str(exc)}
        except VerificationFailed as exc:
            return {**result, "status": "verification failed", "reason": str(exc),
                    "verification": _report(exc.report)}
        result["morphs"] = [{"pass": p.name, "params": dict(p.config)} for p in passes]
        result["verification"] = _report(outcome.report)
        untrained = outcome.child.SerializeToString()
        result["untrained"] = untrained
        model = mio.load_bytes(untrained, name=task.id)
    try:
        trained, metrics = train_and_score(model, data, task.training, task.seed)
    except UsageError as exc:
        return {**result, "status": "training failed", "reason": str(exc)}
    if trained is None:
        result["trained"] = untrained  # no training asked for: the model as it is
    else:
        mio.strip_transient_metadata(trained)
        receipt.append(trained, _training_record(hashlib.sha256(untrained).hexdigest(), task, data, metrics))
        result["trained"] = trained.SerializeToString()
    result.update(metrics, parameters=count_parameters(model), seconds=round(time.perf_counter() - start, 3))
    return result


def _report(report: Report | None) -> dict[str, Any] | None:
    """The verification report as data, with its worst errors over all outputs."""
    if report is None:
        return None
    data = report.to_dict()
    data.update(max_abs_error=float(report.max_abs_error), max_rel_error=float(report.max_rel_error))
    return data


def _training_record(parent_sha: str, task: CandidateTask, data: Dataset, metrics: dict[str, Any]) -> dict[str, Any]:
    """The receipt entry of a training run: training changes the function, so nothing is verified."""
    params = {"steps": task.training.steps, "lr": task.training.lr, "batch_size": task.training.batch_size,
              "seed": task.seed, "optimizer": "adam", "data": data.name, "candidate": task.id}
    return {"kind": "train", "tool": f"onnxmorph {__version__}", "parent_sha256": parent_sha,
            "steps": [{"pass": "train", "params": params}], "verification": None,
            "result": {k: metrics[k] for k in ("val_score", "val_loss", "test_score") if k in metrics}}


def train_and_score(model: onnx.ModelProto, data: Dataset, training: Training,
                    seed: int) -> tuple[onnx.ModelProto | None, dict[str, Any]]:
    """Train a copy of `model` (not when `training.steps` is 0) and score it on the validation and test data."""
    import torch

    from onnxmorph.train import adapter as ot

    net = ot.to_torch(model)
    trained = None
    if training.steps:
        loss = "cross_entropy" if data.task == "classification" else "mse"
        losses = ot.fit(net, data.x_train, data.y_train, loss=loss, steps=training.steps,
                        batch_size=training.batch_size, seed=seed,
                        optimizer=lambda p: torch.optim.Adam(p, lr=training.lr))
        trained = ot.to_onnx(net)
        metrics: dict[str, Any] = {"train_loss": losses[-1]}
    else:
        metrics = {"train_loss": None}
    metrics.update(_scores(net, data.x_val, data.y_val, data.task, "val"))
    if data.x_test is not None:
        metrics.update(_scores(net, data.x_test, data.y_test, data.task, "test"))
    return trained, metrics


def _scores(net: Any, x: np.ndarray, y: np.ndarray, task: str, split: str) -> dict[str, float]:
    """Accuracy (classification) or minus the mean squared error (regression): higher is better."""
    import torch
    import torch.nn.functional as F

    from onnxmorph.train import adapter as ot

    out = torch.from_numpy(ot.predict(net, x))
    target = torch.from_numpy(y)
    if task == "classification":
        loss = float(F.cross_entropy(out, target))
        score = float((out.argmax(dim=1) == target).double().mean())
    else:
        loss = float(F.mse_loss(out, target))
        score = -loss
    return {f"{split}_score": score, f"{split}_loss": loss}


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of the float initializers: the model's weights."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats))


# --------------------------------------------------------------------------- where candidates run


Job = tuple[CandidateTask, bytes]


class InProcess:
    """Runs candidates one after the other in this process (`workers=0`: debugging, tiny searches)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def run(self, jobs: Iterable[Job]) -> Iterator[dict[str, Any]]:
        for task, parent in jobs:
            yield run_candidate(task, parent, self.data)

    def close(self, abort: bool = False) -> None:
        pass


_WORKER_DATA: Dataset | None = None


def _init_worker(data: Dataset) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    # Ctrl-C reaches the whole process group; the parent alone decides to stop, and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)


def _run_in_worker(job: Job) -> dict[str, Any]:
    assert _WORKER_DATA is not None
    return run_candidate(job[0], job[1], _WORKER_DATA)


class LocalWorkers:
    """Runs candidates in `workers` spawned processes (one torch thread each), results as they finish."""

    def __init__(self, data: Dataset, workers: int) -> None:
        # spawn, not fork: a forked child of a process whose OpenMP pool is running can hang.
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(workers, initializer=_init_worker, initargs=(data,))

    def run(self, jobs: Iterable[Job]) -> Iterator[dict[str, Any]]:
        yield from self.pool.imap_unordered(_run_in_worker, list(jobs), chunksize=1)

    def close(self, abort: bool = False) -> None:
        # Interrupted: the running candidates are dropped at once (they are rerun on resume).
        if abort:
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()


def require_ray() -> Any:
    """The ray module, imported only when asked for: it is an optional extra."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def check_reachable(address: str) -> None:
    """Refuse a HOST:PORT nothing listens on: Ray itself retries for minutes before it gives up."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray:// (Ray Client has its own timeout) or a form Ray will judge
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc})") from None


class RayWorkers:
    """Runs candidates as Ray tasks on a local Ray it starts (`address=None`) or on an existing cluster."""

    def __init__(self, data: Dataset, workers: int, address: str | None) -> None:
        self.ray = ray = require_ray()
        self.started = not ray.is_initialized()
        if self.started:
            if address is None:
                ray.init(num_cpus=max(1, min(workers, os.cpu_count() or 1)), include_dashboard=False,
                         log_to_driver=False, logging_level=logging.ERROR, object_store_memory=256 * 2**20)
            else:
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
                except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise UsageError(f"--ray-address {address}: cannot connect to a Ray cluster ({first})") from None
        self.data = ray.put(data)
        self.remote = ray.remote(num_cpus=1)(run_candidate)

    def run(self, jobs: Iterable[Job]) -> Iterator[dict[str, Any]]:
        pending = [self.remote.remote(task, parent, self.data) for task, parent in jobs]
        try:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    yield self.ray.get(ref)
        finally:
            for ref in pending:
                self.ray.cancel(ref)

    def close(self, abort: bool = False) -> None:
        if self.started:
            self.ray.shutdown()


def executor(data: Dataset, workers: int, ray: bool = False, ray_address: str | None = None) -> Any:
    """Where the candidates run: Ray when asked for, else `workers` local processes (0: this process)."""
    if ray or ray_address:
        return RayWorkers(data, max(workers, 1), ray_address)
    if workers == 0:
        return InProcess(data)
    return LocalWorkers(data, workers)
