"""Running passes: morph a parent, check invariants after every pass, verify, write the receipt."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from onnxmorph import limits
from onnxmorph.contract.passinfra import MorphPass
from onnxmorph.contract.registry import get_pass
from onnxmorph.errors import NotApplicable, UsageError, VerificationFailed
from onnxmorph.graph.core import Analysis
from onnxmorph.io import loading as mio
from onnxmorph.io import streaming
from onnxmorph.pipeline import receipt
from onnxmorph.verification.verifier import DEFAULT_TRIALS, Report, Verifier
from onnxmorph.version import __version__

log = logging.getLogger("onnxmorph")

ModelLike = Union[onnx.ModelProto, str, os.PathLike]


@dataclass
class VerifyOptions:
    """How a morph is verified (see onnxmorph.verification.verifier.verify)."""

    enabled: bool = True
    atol: float | None = None
    rtol: float | None = None
    trials: int = DEFAULT_TRIALS
    seed: int = 0
    shapes: Mapping[str, Sequence[int]] | None = None
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None
    method: str = "auto"  # outputs (run whole), regions, or auto: by regions when a model does not fit

    def verifier(self, parent: onnx.ModelProto | str | os.PathLike) -> Verifier:
        return Verifier(parent, atol=self.atol, rtol=self.rtol, trials=self.trials, seed=self.seed,
                        shapes=self.shapes, inputs=self.inputs, method=self.method)


@dataclass
class MorphOutcome:
    """A child, its verification report (None when skipped) and the steps that made it."""

    child: onnx.ModelProto
    report: Report | None
    steps: list[MorphPass] = field(default_factory=list)
    external_data: bool = False  # the parent's file kept its weights in external data
    saved: Path | None = None  # where run_passes already wrote (and verified) the child, if it did


def as_model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    log.info("loading %s", model)
    return mio.load(model)


def _morphable(parent: ModelLike, lazy: bool = False) -> tuple[onnx.ModelProto, ModelLike]:
    """(the parent normalised for morphing, the parent as the user gave it).

    Verification runs the second: the normalisation (folding constants into weights) is only a
    means to morph, and a mistake in it must show as a failed verification, not be compared
    with itself. A file is handed to onnxruntime by path; a ModelProto is normalised in a copy.
    """
    if isinstance(parent, onnx.ModelProto):
        return mio.normalize(parent), parent
    log.info("loading %s", parent)
    # Weights stay in their files until a pass touches them (see streaming): always those kept in
    # external data, and those inside the model file when run_passes saves the child itself.
    lazy = lazy or bool(mio.external_data_files(parent))
    model = mio.load(parent, normalize_model=True, lazy=lazy)
    mio.start_digest(model)  # the receipt needs it: read beside the morph
    return model, Path(parent)


def run_passes(
    parent: ModelLike,
    passes: Sequence[MorphPass],
    options: VerifyOptions | None = None,
    *,
    verify_each: bool = False,
    output: str | os.PathLike | None = None,
) -> MorphOutcome:
    """Apply `passes` in order to a copy of `parent`, verify the result, record the receipt.

    Raises NotApplicable (nothing done) when a pass does not apply, VerificationFailed when the
    child differs from the parent. `parent` is never modified. A child whose weights stay in
    files (a parent with external data) is saved to `output` when given, and verified there by
    path before it replaces anything (`outcome.saved`).
    """
    options = options or VerifyOptions()
    parent_model, reference = _morphable(parent, lazy=output is not None)
    # The child's receipt continues the parent's: a malformed one is refused before any work.
    receipt.history(parent_model, str(parent) if not isinstance(parent, onnx.ModelProto) else "the parent")
    verifier = options.verifier(reference) if options.enabled else None
    # A parent whose weights stay in their files (external data, or a model file read lazily because
    # the child is saved here) gets its computed weights written to a file as they are made: beside the
    # output, where saving takes that file over as the child's data file.
    spill = streaming.streams(parent_model)
    where = Path(os.path.realpath(output)).parent if output is not None else None  # where the output really is
    stem = Path(output).name if output is not None else ""
    scratch = None
    try:
        with streaming.spilling(where, stem) if spill else contextlib.nullcontext() as scratch:
            child = _apply(parent_model, passes, verifier, verify_each, scratch)
        if output is not None and streaming.streams(child):
            return _save_verified(parent_model, child, passes, verifier, Path(output))
        return _finish(parent_model, child, passes, verifier, verify_each)
    except BaseException:
        if scratch is not None:  # nothing is written when a morph fails: its computed weights go too
            streaming.release(scratch)
        raise


def _apply(parent_model: onnx.ModelProto, passes: Sequence[MorphPass], verifier: Verifier | None,
           verify_each: bool, scratch: Any) -> onnx.ModelProto:
    child = parent_model
    for k, step in enumerate(passes, 1):
        label = f"step {k} ({step!r})" if len(passes) > 1 else repr(step)
        log.info("morphing: %s", label)
        analysis = Analysis(child)  # one per model state: what requires() reads, call() reuses
        try:
            _check_limits(step, analysis, label)
            result = step.apply(analysis)
        except (NotApplicable, UsageError) as exc:
            if len(passes) == 1:
                raise
            # A recipe names the step that does not apply (its layer may come from an earlier step).
            raise type(exc)(f"step {k} ({step.name}): {exc}") from exc
        del analysis
        child = result.model
        if scratch is not None:  # weights the step replaced again: their scratch files go now
            streaming.drop_unreferenced(scratch, [child])
        if verify_each and verifier is not None and k < len(passes):
            report = verifier.check(child)
            if not report:
                raise VerificationFailed(f"{label}: {report.summary()}", report)
    if child is parent_model:
        child = onnx.ModelProto()
        child.CopyFrom(parent_model)
    return child


def _check_limits(step: MorphPass, analysis: Analysis, label: str) -> None:
    """Refuse a step whose new weights or layers pass the limits, before its plan allocates anything."""
    new_bytes, new_layers = step.new_weights(analysis)
    limits.NEW_BYTES.check(new_bytes, label)
    limits.NEW_LAYERS.check(new_layers, label)


def plan(model: ModelLike, name: str, **params: Any) -> dict[str, Any]:
    """What the registered pass `name` with `params` would do to `model`, without doing it.

    Returns {"pass", "params", ...its plan as `describe` gives it} (for `grow`: "sizes" and every
    "steps"); raises NotApplicable or UsageError as the morph itself would. Nothing is written.
    """
    step = get_pass(name)(**params)
    parent_model, _ = _morphable(model, lazy=not isinstance(model, onnx.ModelProto))
    analysis = Analysis(parent_model)
    _check_limits(step, analysis, repr(step))
    return {"pass": step.name, "params": dict(step.config), **step.describe(step.requires(analysis))}


def _save_verified(parent_model: onnx.ModelProto, child: onnx.ModelProto, passes: Sequence[MorphPass],
                   verifier: Verifier | None, output: Path) -> MorphOutcome:
    """Write the child, verify the written files by path, then rename them into place (see saving.save)."""
    gc.collect()
    mio.strip_transient_metadata(child)
    reports: list[Report | None] = []
    if verifier is None:
        mio.check_structure(child, name="child")

    def verify_written(path: Path) -> None:
        report = verifier.check(path) if verifier is not None else None
        if report is not None and not report:
            raise VerificationFailed(report.summary(), report)
        receipt.append(child, _record(parent_model, passes, report))
        reports.append(report)

    log.info("saving %s (weights copied file to file) and verifying it by path", output)
    # The child is not used after saving: its spilled weights are moved into the data file.
    external = mio.had_external_data(parent_model)
    mio.save(child, output, external_data=True if external else None, consume=True, before_commit=verify_written)
    return MorphOutcome(child=child, report=reports[0], steps=list(passes), external_data=external, saved=output)


def _finish(parent_model: onnx.ModelProto, child: onnx.ModelProto, passes: Sequence[MorphPass],
            verifier: Verifier | None, verify_each: bool) -> MorphOutcome:
    report = None
    if verifier is not None:
        log.info("verifying the child against the parent")
        report = verifier.check(child)
        if not report:
            last = f"step {len(passes)} ({passes[-1]!r}): " if verify_each and len(passes) > 1 else ""
            raise VerificationFailed(last + report.summary(), report)
    else:
        # The pass wrote well-formed weights; checking the structure avoids serialising the child.
        mio.check_structure(child, name="child")
    # The passes' graphs hold the parent alive until the cycle collector runs (gs nodes and tensors
    # refer to each other): free it now, a caller saving the child needs that memory (the parent's
    # size: 550 MB for VGG16).
    gc.collect()
    external = mio.had_external_data(parent_model)
    mio.strip_transient_metadata(child)
    receipt.append(child, _record(parent_model, passes, report))
    return MorphOutcome(child=child, report=report, steps=list(passes), external_data=external)


def _record(parent: onnx.ModelProto, passes: Sequence[MorphPass], report: Report | None) -> dict[str, Any]:
    verification: dict[str, Any] | None = None
    if report is not None:
        verification = {
            "passed": report.passed,
            "trials": report.trials,
            "seed": report.seed,
            "inputs": report.input_source,
            "max_abs_error": report.max_abs_error,
            "max_rel_error": report.max_rel_error,
            "method": report.method,
            "outputs": [
                {"name": o.name, "max_abs_error": o.max_abs_error, "max_rel_error": o.max_rel_error,
                 "atol": o.atol, "rtol": o.rtol}
                for o in report.outputs
            ],
        }
        if report.computed_in:
            verification["computed_in"] = report.computed_in
        if report.method == "regions":
            verification.update(regions=len(report.regions), unchanged_nodes=report.unchanged_nodes,
                                identical_weights=report.identical_weights,
                                identical_weight_bytes=report.identical_weight_bytes)
    return {
        "tool": f"onnxmorph {__version__}",
        "parent_sha256": mio.digest(parent),
        "steps": [{"pass": p.name, "params": dict(p.config)} for p in passes],
        "verification": verification,
    }


def morph(model: ModelLike, name: str, *, verify: bool = True, atol: float | None = None,
          rtol: float | None = None, trials: int = DEFAULT_TRIALS, verify_seed: int = 0,
          shapes: Mapping[str, Sequence[int]] | None = None,
          inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
          **params: Any) -> tuple[onnx.ModelProto, Report | None]:
    """Apply the registered pass `name` with `params` to `model` (a ModelProto or a path).

    Returns (child, report); the report is None when `verify` is false. Raises
    VerificationFailed when the child does not match the parent.
    """
    step = get_pass(name)(**params)
    options = VerifyOptions(enabled=verify, atol=atol, rtol=rtol, trials=trials, seed=verify_seed,
                            shapes=shapes, inputs=inputs)
    outcome = run_passes(model, [step], options)
    return outcome.child, outcome.report
