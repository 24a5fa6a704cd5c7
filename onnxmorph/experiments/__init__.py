"""Training experiments that measure what morphing buys (need the `train` extra); see digits.py and textgrowth.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def run_jobs(function: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], workers: int,
             initializer: Callable[[], None] | None = None) -> list[Any]:
    """`function(*job)` for every job, in `workers` processes when more than one; results in job order."""
    if workers <= 1:
        return [function(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child of a process whose OpenMP pool is running can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer) as pool:
        futures = [pool.submit(function, *job) for job in jobs]
        return [f.result() for f in futures]
