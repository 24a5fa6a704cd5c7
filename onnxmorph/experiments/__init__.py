"""Training experiments that measure what morphing buys (need the `train` extra); see digits.py and textgrowth.py."""

from __future__ import annotations

import argparse
import dataclasses
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


def budget_main(argv: Sequence[str] | None, *, stem: str, doc: str, arms: Sequence[str], arms_default: str,
                quick: Any, full: Any, run: Callable[[Any, int], dict[str, Any]],
                markdown: Callable[[dict[str, Any]], str], plot: Callable[[dict[str, Any], Path], None],
                log: logging.Logger) -> int:
    """The command line of an experiment at equal compute: budgets, seeds, arms, workers; runs it and writes
    `--out/STEM.{json,md,png}`. `quick` and `full` are its Config dataclasses (fields seeds, steps, arms,
    threads, device)."""
    import torch

    parser = argparse.ArgumentParser(prog=f"python -m onnxmorph.experiments.{stem}", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets and one seed (a smoke test, < 60 s)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the results (default: docs)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="the whole budget in steps (default: 1000)")
    parser.add_argument("--arms", default=None, help=f"comma-separated, of {', '.join(arms)} (default: {arms_default})")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 2, quick: 1)")
    parser.add_argument("--threads", type=int, default=full.threads, help="torch threads per process (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--name", default=None, help=f"file name stem (default: {stem}, quick: {stem}-quick)")
    args = parser.parse_args(argv)
    if not log.handlers:
        log_to_stderr(log)
    overrides: dict[str, Any] = {"threads": args.threads, "device": args.device}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.arms is not None:
        overrides["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    for flag in ("seeds", "steps", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    if "arms" in overrides and (not overrides["arms"] or not set(overrides["arms"]) <= set(arms)):
        parser.error(f"--arms takes one or more of {', '.join(arms)}, not {args.arms!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU that torch sees")
    config = dataclasses.replace(quick if args.quick else full, **overrides)
    workers = args.workers if args.workers is not None else (1 if args.quick or args.device != "cpu" else 2)
    results = run(config, workers)
    write_results(args.out, args.name or (f"{stem}-quick" if args.quick else stem), results, markdown, plot,
                  results["seconds"])
    return 0
