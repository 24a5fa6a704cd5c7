"""A search's candidate job (morph, verify, train, score) and where it runs: this process, local workers, or Ray."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import onnx

from onnxmorph import limits
from onnxmorph.contract.registry import get_pass
from onnxmorph.errors import NotApplicable, UsageError, VerificationFailed
from onnxmorph.io import loading as mio
from onnxmorph.limits import quote
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


def check_workers(workers: int) -> None:
    """Refuse a negative number of workers, or more than ONNXMORPH_MAX_WORKERS, before any is started."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"--workers must be a whole number, 0 or more, not {quote(repr(workers), 40)}")
    limits.WORKERS.check(workers, f"--workers {workers}")


# A worker is a fresh interpreter that imports onnxmorph, not the caller's script: a script that
# calls search() without an `if __name__ == "__main__":` guard is not run again in each worker (as
# multiprocessing's spawn would, starting a search per worker and leaving the parent waiting forever).
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from onnxmorph.search.workers import serve; serve(int(sys.argv[2]), int(sys.argv[3]))")
# How often a worker checks that the process that started it is still there.
PARENT_CHECK_S = 0.25


def serve(job_fd: int, result_fd: int) -> None:
    """A worker's loop: the data set, then jobs until None or the end of the pipe; each result sent back."""
    # Ctrl-C reaches the whole process group; the parent alone decides to stop, and ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    jobs = Connection(job_fd, writable=False)
    results = Connection(result_fd, readable=False)
    try:
        data = jobs.recv()
    except EOFError:
        return
    import torch

    torch.set_num_threads(1)
    while True:
        try:
            job = jobs.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            outcome: tuple[str, Any] = ("result", run_candidate(job[0], job[1], data))
        except Exception as exc:  # a bug: the parent raises it, as it would have in this process
            outcome = ("error", exc)
        try:
            results.send(outcome)
        except Exception:  # an exception that cannot be sent as it is (unpicklable): its type and text
            results.send(("error", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))


def _exit_with_parent(parent: int) -> None:
    # The parent may die without ending its workers (SIGKILL, a crash): a worker then stops at
    # once, even mid-training, instead of finishing a candidate nobody will read.
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(1)


class _Worker:
    """One worker process, its two pipes and a file that collects what it writes on stderr."""

    def __init__(self) -> None:
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, json.dumps(sys.path), str(job_read), str(result_write)],
                pass_fds=(job_read, result_write), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self.stderr)
        except OSError as exc:
            os.close(job_write)
            os.close(result_read)
            self.stderr.close()
            raise UsageError(f"cannot start a worker process ({exc.strerror or exc}); try --workers 0") from None
        finally:  # the worker's ends of the pipes: it holds its own copies
            os.close(job_read)
            os.close(result_write)
        self.jobs = Connection(job_write, readable=False)
        self.results = Connection(result_read, writable=False)
        self.task: str | None = None

    def send(self, message: Any) -> None:
        try:
            self.jobs.send(message)
        except OSError:  # the pipe is closed: the worker is gone
            raise self.died() from None

    def died(self) -> UsageError:
        """Why the worker is gone, as the error the search stops with."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        said = f" ({quote(lines[-1], 160)})" if lines else ""
        doing = f" while running candidate {self.task}" if self.task else " before it ran a candidate"
        return UsageError(f"a worker process {how}{doing}{said}; the finished candidates are kept: rerun the "
                          "same search to continue, or use --workers 0 to run in this process")

    def close(self, abort: bool) -> None:
        try:
            if not abort:
                self.jobs.send(None)
        except OSError:  # it is gone already
            pass
        if abort:
            self.process.kill()
        try:
            self.process.wait(timeout=None if abort else 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for handle in (self.jobs, self.results, self.stderr):
            handle.close()


class LocalWorkers:
    """Runs candidates in `workers` processes of their own (one torch thread each), results as they finish.

    Each worker ends with its parent: ended by `close`, and on its own when the parent is gone.
    A worker that dies stops the search with a one-line UsageError instead of waiting for it.
    """

    def __init__(self, data: Dataset, workers: int) -> None:
        check_workers(workers)
        self.workers: list[_Worker] = []
        try:
            for _ in range(workers):  # all started before any is waited on: they start up side by side
                self.workers.append(_Worker())
            for worker in self.workers:
                worker.send(data)
        except BaseException:
            self.close(abort=True)
            raise

    def run(self, jobs: Iterable[Job]) -> Iterator[dict[str, Any]]:
        queue = deque(jobs)
        idle = list(self.workers)
        busy: dict[Connection, _Worker] = {}
        while queue or busy:
            while queue and idle:
                worker, (task, parent) = idle.pop(), queue.popleft()
                worker.task = task.id
                worker.send((task, parent))
                busy[worker.results] = worker
            for ready in wait(list(busy)):
                worker = busy.pop(ready)  # type: ignore[arg-type]
                try:
                    kind, value = worker.results.recv()
                except (EOFError, OSError):
                    raise worker.died() from None
                worker.task = None
                idle.append(worker)
                if kind == "error":
                    raise value
                yield value

    def close(self, abort: bool = False) -> None:
        # Interrupted: the running candidates are dropped at once (they are rerun on resume).
        for worker in self.workers:
            worker.close(abort)
        self.workers = []


# --------------------------------------------------------------------------- Ray


def require_ray() -> Any:
    """The ray module, imported only when asked for: it is an optional extra."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


RAY_FORMS = "HOST:PORT (the head's GCS address, as `ray start --head` prints it), ray://HOST:PORT or auto"
# The first frame of an HTTP/2 client (gRPC, which Ray's GCS and Ray Client speak): the preface and
# an empty SETTINGS frame. A gRPC server answers with its own SETTINGS frame at once.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS = 0x4
# Connecting for real, bounded: a separate interpreter that can be killed (ray.init blocks in
# C++ for minutes, where neither a timeout nor SIGTERM reaches it, and logs on stderr meanwhile).
_RAY_TRIAL = ("import json, logging, sys; sys.path[:] = json.loads(sys.argv[1]); import ray; "
              "ray.init(address=sys.argv[2], log_to_driver=False, logging_level=logging.ERROR); ray.shutdown()")
PROBE_TIMEOUT_S = 5
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


def parse_ray_address(address: str) -> tuple[str, int] | None:
    """(host, port) of `--ray-address` (None for auto), or UsageError for any other form, before anything runs."""
    text = address.strip()
    if text == "auto":
        return None
    rest = text[len("ray://"):] if text.startswith("ray://") else text
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # [::1]:6379
        host = host[1:-1]
    valid = (sep and host and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536 and len(host) <= 253
             and "://" not in rest and not any(c.isspace() or c in "/?#@[]" or not c.isprintable() for c in host))
    if not valid:
        raise UsageError(f"--ray-address {quote(repr(address), 80)}: give {RAY_FORMS}")
    return host, int(port)


def check_cluster(address: str) -> None:
    """Refuse, in bounded time (ONNXMORPH_RAY_TIMEOUT), an address where no Ray cluster answers.

    Nothing listening, a listener that says nothing or something else than gRPC are refused
    without Ray; then a throwaway process connects with Ray itself and is killed at the limit.
    """
    where = f"--ray-address {quote(address, 80)}"
    timeout = limits.RAY_TIMEOUT.value()
    target = parse_ray_address(address)
    if target is not None:  # a gRPC server answers the preface at once: a few seconds is plenty
        _probe_grpc(*target, min(timeout, PROBE_TIMEOUT_S), where)
    _trial_connect(address, timeout, where)


def _probe_grpc(host: str, port: int, timeout: float, where: str) -> None:
    deadline = time.monotonic() + timeout
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise UsageError(f"{where}: nothing answers there (no connection within {timeout:g} s)") from None
    except OSError as exc:
        raise UsageError(f"{where}: nothing answers there ({exc.strerror or exc})") from None
    reply = b""
    with conn:
        try:
            conn.sendall(_HTTP2_PREFACE)
            while len(reply) < 9:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
        except socket.timeout:
            raise UsageError(f"{where}: a connection was accepted but nothing answered within {timeout:g} s; "
                             f"not a Ray cluster (set {limits.RAY_TIMEOUT.variable} to wait longer)") from None
        except OSError:  # reset or broken: it hung up on us
            pass
    if len(reply) < 9:
        raise UsageError(f"{where}: the connection was closed without an answer; not a Ray cluster")
    if reply[3] != _HTTP2_SETTINGS or reply[5:9] != b"\0\0\0\0":
        raise UsageError(f"{where}: what answers there does not speak gRPC; not a Ray cluster "
                         "(give the head's GCS port, 6379 unless `ray start --port` said otherwise)")


def _trial_connect(address: str, timeout: float, where: str) -> None:
    with tempfile.TemporaryFile() as said:
        trial = subprocess.Popen([sys.executable, "-c", _RAY_TRIAL, json.dumps(sys.path), address],
                                 stdin=subprocess.DEVNULL, stdout=said, stderr=said, start_new_session=True)
        try:
            code = trial.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also on SIGTERM or Ctrl-C while waiting: the trial and whatever it started go
            with contextlib.suppress(OSError):
                os.killpg(trial.pid, signal.SIGKILL)
            trial.wait()
        if code == 0:
            return
        if code is None:
            raise UsageError(f"{where}: no Ray cluster connected within {timeout:g} s "
                             f"(set {limits.RAY_TIMEOUT.variable} to wait longer)")
        said.seek(0)
        lines = said.read().decode("utf-8", "replace").splitlines()
    errors = [m for m in (_ERROR_LINE.match(line.strip()) for line in lines) if m]
    reason = f"{errors[-1].group(1)}: {errors[-1].group(2)}" if errors else f"Ray exited with code {code}"
    raise UsageError(f"{where}: cannot connect to a Ray cluster ({quote(reason, 200)})")


class RayWorkers:
    """Runs candidates as Ray tasks on a local Ray it starts (`address=None`) or on an existing cluster.

    An existing cluster is checked first (`check_cluster`), which bounds the time a wrong address costs.
    """

    def __init__(self, data: Dataset, workers: int, address: str | None) -> None:
        self.ray = ray = require_ray()
        self.started = not ray.is_initialized()
        if self.started:
            if address is None:
                # "local": a new Ray for this search, whatever RAY_ADDRESS names.
                ray.init(address="local", num_cpus=max(1, min(workers, os.cpu_count() or 1)),
                         include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                         object_store_memory=256 * 2**20)
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
