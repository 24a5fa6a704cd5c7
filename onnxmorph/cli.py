"""The command line: `python -m onnxmorph COMMAND ...`, one subcommand per registered pass."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from onnxmorph import limits
from onnxmorph.contract import registry
from onnxmorph.errors import OnnxMorphError, UsageError, VerificationFailed
from onnxmorph.hf.cli import add_arguments as export_hf_arguments
from onnxmorph.hf.cli import run_command as run_export_hf
from onnxmorph.io import loading as mio
from onnxmorph.search.cli import add_arguments as search_arguments
from onnxmorph.verification import DEFAULT_TRIALS
from onnxmorph.version import __version__

# What a command needs is imported when it runs (`inspect` never loads the verifier or the pipeline).
if TYPE_CHECKING:
    from onnxmorph.contract.passinfra import MorphPass
    from onnxmorph.pipeline.run import MorphOutcome, VerifyOptions
    from onnxmorph.verification.report import Report

log = logging.getLogger("onnxmorph")

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_BUG = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {_message(message)} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="count", default=0, help="say more (repeat for debug)")
    group.add_argument("-q", "--quiet", action="store_true", help="say nothing but errors")
    return common


def _verification_options(parser: argparse.ArgumentParser, seed_flag: str) -> None:
    group = parser.add_argument_group("verification")
    group.add_argument("--atol", type=float, help="absolute tolerance (default by output type; 1e-5 for float32)")
    group.add_argument("--rtol", type=float, help="relative tolerance (default by output type; 1e-4 for float32)")
    group.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                       help=f"random input sets to compare on (default {DEFAULT_TRIALS})")
    group.add_argument(seed_flag, dest="verify_seed", type=int, default=0, metavar="S",
                       help="seed of the random inputs (default 0)")
    group.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                       help="shape of an input with dynamic dimensions, e.g. input:1x3x224x224 (repeatable; "
                            "by default a dynamic batch dimension is 2 and a dynamic sequence axis 16)")
    group.add_argument("--inputs", metavar="X.npz", help="compare on these inputs (an .npz with one array per input)")
    group.add_argument("--verify-by", dest="verify_by", choices=("auto", "outputs", "regions"), default="auto",
                       help="run both models whole and compare outputs, or check the changed regions one by one and "
                            "every other node and weight for identity (for models larger than memory); auto: by "
                            "regions when a model is over ONNXMORPH_MAX_MODEL_BYTES (default auto)")
    group.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog="onnxmorph",
        description="Grow a trained ONNX model into a larger one that computes the same function "
                    "(network morphism), and verify that it does.",
    )
    parser.add_argument("--version", action="version", version=f"onnxmorph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", parents=[common], help="show a model's layers, which morphs apply, and its history")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = sub.add_parser("diff", parents=[common], help="show what changed from PARENT to CHILD")
    p.add_argument("parent", metavar="PARENT")
    p.add_argument("child", metavar="CHILD")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained page drawing the changed region")
    p.add_argument("--model-explorer", metavar="OUT.json", help="write the node mapping for Model Explorer")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                   help="input sizes to count FLOPs at, as verify takes them (repeatable; by default a dynamic "
                        "batch is 1, per example, and a dynamic sequence axis 16)")

    p = sub.add_parser("verify", parents=[common], help="check that CHILD computes PARENT's function")
    p.add_argument("parent", metavar="PARENT")
    p.add_argument("child", metavar="CHILD")
    _verification_options(p, "--seed")

    for name, cls in sorted(registry.load().items()):
        p = sub.add_parser(name, parents=[common], help=cls.summary, description=cls.__doc__)
        p.add_argument("model", metavar="MODEL")
        p.add_argument("-o", "--output", metavar="OUT", help="where to write the child (required unless --dry-run)")
        p.add_argument("--dry-run", action="store_true", help="print the plan (every step, for grow) and write nothing")
        group = p.add_argument_group(f"{name} parameters")
        for param in cls.params:
            kwargs: dict[str, Any] = {"dest": f"param_{param.name}", "help": param.help}
            if param.metavar:
                kwargs["metavar"] = param.metavar
            if param.choices:
                kwargs["choices"] = list(param.choices)
            if param.required:
                kwargs["required"] = True
            elif param.default is not None:
                kwargs["help"] += f" (default {_show_default(param.default)})"
            group.add_argument(param.cli_flag, **kwargs)
        p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
        p.add_argument("--html", metavar="OUT.html", help="also write the diff page of parent and child")
        _verification_options(p, "--verify-seed")
        p.set_defaults(pass_class=cls)

    p = sub.add_parser("search", parents=[common], help="architecture search: morph, train briefly, keep the best")
    search_arguments(p)

    p = sub.add_parser("export-hf", parents=[common], help="write a child grown by widen and block as a Hugging Face "
                       "checkpoint like its parent's")
    export_hf_arguments(p)

    p = sub.add_parser("apply", parents=[common], help="apply a recipe of morphs (JSON or YAML list of steps)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--recipe", required=True, metavar="R.json", help="the recipe file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the child")
    p.add_argument("--verify-each", action="store_true", help="verify after every step, naming the step that broke")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    p.add_argument("--html", metavar="OUT.html", help="also write the diff page of parent and child")
    _verification_options(p, "--verify-seed")
    return parser


def _show_default(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(map(str, value))
    return str(value)


def _setup_logging(args: argparse.Namespace) -> None:
    quiet = args.quiet or getattr(args, "json", False)
    if args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 1 or (not quiet and sys.stderr.isatty()):
        level = logging.INFO
    else:
        level = logging.WARNING
    if quiet:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("onnxmorph: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _shapes(args: argparse.Namespace) -> dict[str, list[int]]:
    """The --shape NAME:DIMS options, parsed."""
    from onnxmorph.verification.verifier import parse_shape

    return dict(parse_shape(text) for text in args.shape)


def _verify_options(args: argparse.Namespace, enabled: bool = True) -> VerifyOptions:
    from onnxmorph.pipeline.run import VerifyOptions

    shapes = _shapes(args)
    if args.trials < 1:
        raise UsageError(f"--trials must be at least 1, not {args.trials}")
    return VerifyOptions(enabled=enabled, atol=args.atol, rtol=args.rtol, trials=args.trials,
                         seed=args.verify_seed, shapes=shapes, inputs=args.inputs, method=args.verify_by)


def _check_output(model: str, output: str) -> Path:
    """The output path, refused when writing it (or OUT.data beside it) would replace a file of the parent.

    Every file of the parent is untouchable, through any path, link or hard link: the model
    file itself and each of its external-data files.
    """
    out = mio.check_output_path(output)
    parent = Path(model)
    if not parent.is_file():
        return out  # loading it says what is wrong
    parent_files = [parent, *mio.external_data_files(parent)]
    for written in (out, out.with_name(out.name + ".data")):
        try:
            if not written.exists():
                continue
        except OSError:  # a name too long to exist: saving says so if it is ever written
            continue
        for kept in parent_files:
            if os.path.samefile(written, kept):
                what = "the parent model" if kept is parent else f"the parent's weights in '{kept.name}'"
                raise UsageError(f"{limits.quote(output)}: writing it would overwrite {what}; choose another path")
    return out


def _print_report(report: Report | None, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        data = dict(extra or {})
        data["verification"] = report.to_dict() if report is not None else None
        print(json.dumps(data, indent=2))
    elif report is not None:
        print(report)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from onnxmorph.pipeline.inspection import format_inspection, inspect

    model = mio.load(args.model, normalize_model=True, lazy=True)  # weights mapped only where read
    info = inspect(model, args.model)
    if args.json:
        print(json.dumps({"model": args.model, **info}, indent=2))
    else:
        print(format_inspection(info, title=args.model))
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from onnxmorph.verification.verifier import read_model_file, verify

    options = _verify_options(args)
    # Each file is checked once, from its header (safety, then onnx.checker: a failing file is bad
    # input, exit 2, not a child that computes something else); onnxruntime then loads it by path.
    parent, child = (read_model_file(path) for path in (args.parent, args.child))
    report = verify(parent, child, atol=options.atol, rtol=options.rtol, trials=options.trials,
                    seed=options.seed, shapes=options.shapes, inputs=options.inputs, method=options.method)
    if args.json or not args.quiet:
        _print_report(report, args.json, {"parent": args.parent, "child": args.child})
    if not report:
        if not args.json:
            sys.stderr.write(f"onnxmorph: {_message(report.summary())}\n")
        return EXIT_MISMATCH
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from onnxmorph.diff.compare import diff
    from onnxmorph.diff.page import write_outputs

    for target in (args.html, args.model_explorer):
        for model in (args.parent, args.child) if target else ():
            _check_output(model, target)
    result = diff(args.parent, args.child, _shapes(args))
    write_outputs(result, html=args.html, model_explorer=args.model_explorer)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.quiet:
        print(result)
    return EXIT_OK


def _check_page(args: argparse.Namespace, out: Path) -> None:
    """A morph's --html target must be writable and neither the parent nor the child."""
    if getattr(args, "html", None):
        _check_output(args.model, args.html)
        if Path(args.html).resolve() in (out.resolve(), out.resolve().with_name(out.name + ".data")):
            raise UsageError(f"--html {args.html}: is the child's own file; choose another path")


@contextlib.contextmanager
def _one_output(args: argparse.Namespace, out: Path) -> Any:
    """The child, its weights file and its --html page are one output: a failure in any leaves none changed."""
    with contextlib.ExitStack() as written:
        for path in (out, out.with_name(out.name + ".data"), getattr(args, "html", None)):
            if path:  # (a symlinked page: the file it names is what is written, and kept)
                written.enter_context(mio.restored_on_failure(mio.check_output_path(path)))
        yield


def _write_child(args: argparse.Namespace, outcome: MorphOutcome, out: Path) -> None:
    # A parent kept with external data gets a child in the same form; the child is not used after
    # saving, so its weights go to the file without a copy.
    if outcome.saved is None:  # a streaming child was saved (and verified by path) by run_passes
        log.info("saving %s", out)
        mio.save(outcome.child, out, external_data=True if outcome.external_data else None, consume=True)
    if getattr(args, "html", None):
        from onnxmorph.diff.page import write_diff_page

        log.info("writing the diff page %s", args.html)
        write_diff_page(args.model, out, args.html, shapes=_shapes(args))


def _finish_morph(args: argparse.Namespace, outcome: MorphOutcome, out: Path) -> int:
    steps = [{"pass": s.name, "params": s.config} for s in outcome.steps]
    if args.json:
        _print_report(outcome.report, True, {"model": args.model, "output": str(out), "steps": steps})
    elif not args.quiet:
        if outcome.report is not None:
            print(outcome.report)
        else:
            print("verification: skipped (--no-verify)")
        print(f"wrote {out}: " + ", ".join(repr(s) for s in outcome.steps))
    return EXIT_OK


def _format_plan(info: dict[str, Any], model: str) -> str:
    """The text of a dry run: the pass, its sizes before -> after, its steps, its other facts."""
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items() if v is not None)
    lines = [f"{info['pass']} {model} ({params}): dry run, nothing written"]
    for key, value in info.items():
        if key == "sizes":
            lines.append("sizes: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in value.items()))
        elif key == "steps":
            lines.append(f"steps ({len(value)}, one verification at the end):")
            lines += [f"  {k}. {line}" for k, line in enumerate(value, 1)]
        elif key not in ("pass", "params"):
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            lines.append(f"{key}: {shown}")
    return "\n".join(lines)


def _cmd_morph(args: argparse.Namespace) -> int:
    cls: type[MorphPass] = args.pass_class
    params = {p.name: getattr(args, f"param_{p.name}") for p in cls.params}
    if args.dry_run:
        from onnxmorph.pipeline.run import plan

        info = plan(args.model, cls.name, **{k: v for k, v in params.items() if v is not None})
        print(json.dumps({"model": args.model, **info}, indent=2) if args.json else _format_plan(info, args.model))
        return EXIT_OK
    if not args.output:
        raise UsageError(f"{cls.name}: -o/--output is required (where to write the child), unless --dry-run")
    step = cls(**{k: v for k, v in params.items() if v is not None})
    out = _check_output(args.model, args.output)
    _check_page(args, out)
    options = _verify_options(args, enabled=not args.no_verify)
    from onnxmorph.pipeline.run import run_passes

    with _one_output(args, out):
        outcome = run_passes(args.model, [step], options, output=out)
        _write_child(args, outcome, out)
    return _finish_morph(args, outcome, out)


def _cmd_apply(args: argparse.Namespace) -> int:
    from onnxmorph.pipeline.recipe import read_recipe

    passes = read_recipe(args.recipe)
    out = _check_output(args.model, args.output)
    _check_page(args, out)
    options = _verify_options(args, enabled=not args.no_verify)
    from onnxmorph.pipeline.run import run_passes

    with _one_output(args, out):
        outcome = run_passes(args.model, passes, options, verify_each=args.verify_each, output=out)
        _write_child(args, outcome, out)
    return _finish_morph(args, outcome, out)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so that pending cleanups (temporary files) run.
    raise KeyboardInterrupt


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

# An error line quotes values taken from the input (names, paths): bounded whatever they hold.
MAX_MESSAGE = 600


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # main() may run inside another program (tests, notebooks): put the logger back afterwards.
    saved_logging = (list(log.handlers), log.level, log.propagate)
    _setup_logging(args)
    # SIGHUP (the terminal closed) and SIGTERM end the run like Ctrl-C: temporary files are removed.
    previous = {sig: signal.signal(sig, _on_sigterm) for sig in _STOP_SIGNALS}
    try:
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "verify":
            return _cmd_verify(args)
        if args.command == "diff":
            return _cmd_diff(args)
        if args.command == "apply":
            return _cmd_apply(args)
        if args.command == "search":
            from onnxmorph.search.cli import run_command as run_search

            return run_search(args)
        if args.command == "export-hf":
            return run_export_hf(args)
        return _cmd_morph(args)
    except VerificationFailed as exc:
        as_json = getattr(args, "json", False)
        if exc.report is not None and (as_json or not args.quiet):
            _print_report(exc.report, as_json)
        sys.stderr.write(f"onnxmorph: verification failed, nothing written: {_message(exc)}\n")
        return EXIT_MISMATCH
    except OnnxMorphError as exc:
        sys.stderr.write(f"onnxmorph: error: {_message(exc)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("onnxmorph: interrupted, nothing written\n")
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): stop quietly, as a killed pipeline member would.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except MemoryError:
        sys.stderr.write("onnxmorph: error: out of memory\n")
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug: still one line, the traceback only with -vv
        if args.verbose >= 2:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"onnxmorph: internal error: {type(exc).__name__}: {_message(first)} "
                         "(a bug in onnxmorph; rerun with -vv for the traceback)\n")
        return EXIT_BUG
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.handlers[:] = saved_logging[0]
        log.setLevel(saved_logging[1])
        log.propagate = saved_logging[2]
