"""The `search` subcommand's arguments and output; the search itself (onnxmorph.search) is imported when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnxmorph.contract.passinfra import positive_int
from onnxmorph.errors import UsageError
from onnxmorph.search.space import DEFAULT_SPACE_TEXT
from onnxmorph.search.state import STATE_FILE


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `search` subcommand's arguments (onnxmorph.cli adds the common ones)."""
    p.add_argument("model", metavar="PARENT", help="the root model (ONNX file)")
    p.add_argument("--data", required=True, metavar="NAME|X.npz",
                   help="digits, or an .npz with x_train, y_train, x_val, y_val (and x_test, y_test)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for candidates, state, leaderboard")
    group = p.add_argument_group("search")
    group.add_argument("--rounds", type=int, default=3, help="rounds of hill climbing (default 3)")
    group.add_argument("--children", type=int, default=4, help="morphed children per round (default 4)")
    group.add_argument("--keep", type=int, default=1, help="best models the children are made from (default 1)")
    group.add_argument("--steps", type=int, default=200, help="training steps per candidate (default 200)")
    group.add_argument("--parent-steps", type=int, default=0, help="train the parent first (default 0)")
    group.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 0.003)")
    group.add_argument("--batch-size", type=int, default=64, help="minibatch size (default 64)")
    group.add_argument("--morphs", nargs="+", metavar="NAME[:key=a|b,...]",
                       help="morphs to draw from, e.g. deepen widen:factor=1.5|2,method=netmorph|lemon "
                            "(default: " + " ".join(DEFAULT_SPACE_TEXT) + ")")
    group.add_argument("--morphs-per-child", type=int, default=1, help="morphs applied per child (default 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of the whole search (default 0)")
    where = p.add_argument_group("where candidates run").add_mutually_exclusive_group()
    where.add_argument("--ray", action="store_true", help="on a local Ray started for this search")
    where.add_argument("--ray-address", metavar="ADDR", help="on an existing Ray cluster (e.g. ray://head:10001)")
    p.add_argument("--workers", type=positive_or_zero, default=None,
                   help="worker processes (default: one per CPU; 0 runs in this process)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def positive_or_zero(text: str) -> int:
    """`--workers`: 0 or a positive whole number (argparse turns the refusal into its one-line usage error)."""
    if text.strip() == "0":
        return 0
    try:
        return positive_int(text)
    except UsageError:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive whole number, got {text[:40]!r}") from None


def run_command(args: argparse.Namespace) -> int:
    """`python -m onnxmorph search ...`; returns the exit code."""
    from onnxmorph.search import report
    from onnxmorph.search.loop import search

    try:
        result = search(args.model, args.data, args.output, rounds=args.rounds, children=args.children,
                        keep=args.keep, steps=args.steps, lr=args.lr, batch_size=args.batch_size, morphs=args.morphs,
                        morphs_per_child=args.morphs_per_child, parent_steps=args.parent_steps,
                        workers=args.workers, ray=args.ray, ray_address=args.ray_address, seed=args.seed)
    except KeyboardInterrupt:
        if (Path(args.output) / STATE_FILE).is_file():
            sys.stderr.write(f"onnxmorph: interrupted; every finished candidate is kept in {args.output}: "
                             "rerun the same command to continue\n")
        else:
            sys.stderr.write("onnxmorph: interrupted, nothing written\n")
        return 130
    document = json.loads((result.outdir / "leaderboard.json").read_text())
    if args.json:
        print(json.dumps({"outdir": str(result.outdir), "best": document["leaderboard"][0],
                          "root": next(r for r in document["leaderboard"] if r["id"] == "root"),
                          "candidates": len(document["leaderboard"]), "failed": len(document["failed"])}, indent=2))
    elif not args.quiet:
        print(report.format_table(document))
        root, best = result.root, result.best
        print(f"best: {best['id']} val {best['val_score']:.4f} with {best['parameters']} parameters "
              f"(parent {root['val_score']:.4f} with {root['parameters']}); wrote {result.outdir / 'best.onnx'}, "
              "leaderboard.{csv,json,png}")
    return 0
