"""Training experiments that measure what morphing buys (need the `train` extra); see digits.py and textgrowth.py."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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


def write_results(out: Path, stem: str, results: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                  plot: Callable[[dict[str, Any], Path], None], seconds: float) -> None:
    """OUT/STEM.json, .md (the table, also printed) and .png (the plot) of an experiment's results."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = markdown(results)
    (out / f"{stem}.md").write_text(table)
    plot(results, out / f"{stem}.png")
    print(table)
    print(f"wrote {out / stem}.{{json,md,png}} in {seconds:.0f} s", file=sys.stderr)


def log_to_stderr(log: logging.Logger) -> None:
    """An experiment's progress on stderr, one plain line a step."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
