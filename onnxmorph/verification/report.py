"""The verification report and the comparison rule: per-output errors, tolerances, PASS or FAIL.

Comparison follows Polygraphy's rule: an element fails only when its absolute error exceeds
`atol` *and* its relative error exceeds `rtol`. Default tolerances depend on the output type:

* float32: atol 1e-5, rtol 1e-4. A morph changes the order of float32 sums; each dot product
  of fan-in n then differs by about sqrt(n) * 2**-24 relative to its terms (~1e-6 for n in the
  thousands), and a few such layers stay below 1e-4 relative. A change of one weight tensor by
  0.1% moves outputs by ~1e-3 relative, ten times the tolerance. The default atol is for
  outputs of magnitude about 1 and is scaled by the output's largest magnitude above that.
* float16 / bfloat16: 1e-2 both (11 and 8 bits of mantissa).
* float64: 1e-9 absolute, 1e-8 relative.
* integer and bool outputs: exact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

_TOLERANCES = {
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float16): (1e-2, 1e-2),
    np.dtype(np.float64): (1e-9, 1e-8),
}


def default_tolerances(dtype: np.dtype) -> tuple[float, float]:
    """(atol, rtol) used for an output of `dtype` when the caller gives none."""
    dtype = np.dtype(dtype)
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return (1e-2, 1e-2)
    return (0.0, 0.0)


@dataclass
class OutputCheck:
    """Comparison figures of one output over all trials."""

    name: str
    shape: list[int]
    dtype: str
    atol: float
    rtol: float
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    needed_atol: float = 0.0
    needed_rtol: float = 0.0
    mismatched: int = 0
    elements: int = 0
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None and self.mismatched == 0


@dataclass
class Report:
    """The result of a verification: truthy when the child computes the parent's function."""

    outputs: list[OutputCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trials: int = 0
    seed: int = 0
    inputs: dict[str, list[int]] = field(default_factory=dict)
    input_source: str = "random"
    # "outputs": both models ran whole and their outputs were compared; "regions": the child was
    # checked region by region (onnxmorph.verification.regions), the models never ran whole.
    method: str = "outputs"
    # Empty when onnxruntime ran the models as they are; else what it ran instead and why.
    computed_in: str = ""
    # Verification by regions: one summary per changed region, and what was found unchanged.
    regions: list[dict[str, Any]] = field(default_factory=list)
    unchanged_nodes: int = 0
    identical_weights: int = 0
    identical_weight_bytes: int = 0

    @property
    def passed(self) -> bool:
        # By regions, a child with no changed region at all is the parent (every node and weight compared).
        compared = bool(self.outputs) or (self.method == "regions" and not self.regions)
        return not self.problems and compared and all(o.passed for o in self.outputs)

    def method_line(self) -> str:
        """What was checked, in words (what a PASS claims)."""
        if self.method == "regions":
            shared = _bytes(self.identical_weight_bytes)
            text = (f"by regions: {len(self.regions)} changed region(s) run in the parent and the child on the same "
                    f"inputs at their boundaries (random where large weights feed them); {self.unchanged_nodes} "
                    f"unchanged nodes and {self.identical_weights} shared weights ({shared}) found identical; the "
                    "models were not run whole")
        else:
            text = "the parent and the child run whole on the same inputs, every output compared"
        if self.computed_in:
            text += f"; computed in {self.computed_in}"
        return text

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def summary(self) -> str:
        """One line: PASS/FAIL with the worst errors or the first problem."""
        if self.passed:
            what = "output(s)" if self.method != "regions" else f"region output(s) of {len(self.regions)} region(s)"
            return (
                f"PASS: {len(self.outputs)} {what} equal over {self.trials} trial(s) "
                f"(max abs error {_fmt(self.max_abs_error)}, max rel error {_fmt(self.max_rel_error)})"
                + (f"; computed in {self.computed_in.split(' (')[0]}" if self.computed_in else "")
            )
        if self.problems:
            return f"FAIL: {self.problems[0]}"
        bad = next(o for o in self.outputs if not o.passed)
        if bad.problem:
            return f"FAIL: output '{bad.name}': {bad.problem}"
        return (
            f"FAIL: output '{bad.name}': {bad.mismatched} of {bad.elements} elements differ "
            f"(max abs error {_fmt(bad.max_abs_error)} > atol {_fmt(bad.atol)}, "
            f"max rel error {_fmt(bad.max_rel_error)} > rtol {_fmt(bad.rtol)})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        for out, raw in zip(self.outputs, data["outputs"]):
            raw["passed"] = out.passed
            for key in ("max_abs_error", "max_rel_error", "needed_atol", "needed_rtol"):
                raw[key] = _json_float(raw[key])
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        header = ["output", "shape", "max abs err", "max rel err", "needed atol", "needed rtol",
                  "atol", "rtol", "result"]
        rows = [header]
        for o in self.outputs:
            rows.append([
                o.name, "x".join(map(str, o.shape)) or "scalar", _fmt(o.max_abs_error),
                _fmt(o.max_rel_error), _fmt(o.needed_atol), _fmt(o.needed_rtol), _fmt(o.atol),
                _fmt(o.rtol), "PASS" if o.passed else "FAIL",
            ])
        widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
        lines = [
            f"verification: {'PASS' if self.passed else 'FAIL'} ({self.trials} trial(s), "
            f"seed {self.seed}, inputs: {self.input_source}; an element fails when it exceeds "
            "both atol and rtol)"
        ]
        if self.method != "outputs" or self.computed_in:
            lines.append(f"  checked {self.method_line()}")
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        for o in self.outputs:
            if o.problem:
                lines.append(f"  output '{o.name}': {o.problem}")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.2e}"


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def compare(check: OutputCheck, expected: np.ndarray, actual: np.ndarray) -> None:
    if expected.shape != actual.shape:
        check.problem = f"shape {list(actual.shape)} differs from the parent's {list(expected.shape)}"
        return
    if expected.dtype != actual.dtype:
        check.problem = f"type {actual.dtype} differs from the parent's {expected.dtype}"
        return
    check.elements += expected.size
    if expected.size == 0:
        return
    # flattened: the comparison is per element, and a 0-d array's arithmetic yields numpy scalars
    expected, actual = expected.reshape(-1), actual.reshape(-1)
    if expected.dtype.kind in "fc":
        e = expected.astype(np.float64)
        a = actual.astype(np.float64)
        both_nan = np.isnan(e) & np.isnan(a)
        same_inf = np.isinf(e) & (e == a)
        diff = np.abs(a - e)
        diff[both_nan | same_inf] = 0.0
        diff[np.isnan(diff)] = np.inf
        magnitude = np.abs(e)
        magnitude[np.isnan(magnitude)] = 0.0
    else:
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        magnitude = np.abs(expected.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / magnitude)
    # An infinite difference (NaN or infinity on one side only) fails whatever the tolerance.
    rel[np.isinf(diff) | np.isnan(rel)] = np.inf
    over_abs = diff > check.atol
    over_rel = rel > check.rtol
    check.mismatched += int(np.count_nonzero(over_abs & over_rel))
    check.max_abs_error = max(check.max_abs_error, float(diff.max()))
    check.max_rel_error = max(check.max_rel_error, float(rel.max()))
    if over_rel.any():
        check.needed_atol = max(check.needed_atol, float(diff[over_rel].max()))
    if over_abs.any():
        check.needed_rtol = max(check.needed_rtol, float(rel[over_abs].max()))


def output_scale(arrays: Any) -> float:
    """The largest finite magnitude of a float output over the trials (0 for other types)."""
    scale = 0.0
    for array in arrays:
        if array.dtype.kind != "f" or array.size == 0:
            continue
        finite = np.abs(array[np.isfinite(array)])
        if finite.size:
            scale = max(scale, float(finite.max()))
    return scale


def blind_spots(feeds: Sequence[Mapping[str, np.ndarray]], expected: Sequence[Sequence[np.ndarray]],
                output_names: Sequence[str]) -> list[str]:
    """Why these inputs cannot show a difference between two models (empty when they can).

    A verification on such inputs would pass whatever the child computes: an empty input (an
    empty batch), a float input that is all NaN, or a parent output that is empty or all NaN
    on every trial.
    """
    problems = []
    for name, array in feeds[0].items():
        if array.size == 0:
            problems.append(f"input '{name}' is empty (shape {list(array.shape)}): a difference cannot show")
        elif array.dtype.kind == "f" and all(np.isnan(feed[name]).all() for feed in feeds):
            problems.append(f"input '{name}' is all NaN: a difference cannot show")
    for k, name in enumerate(output_names):
        arrays = [trial[k] for trial in expected]
        if all(a.size == 0 for a in arrays):
            problems.append(f"the parent's output '{name}' is empty: a difference cannot show")
        elif all(a.dtype.kind in "fc" and np.isnan(a).all() for a in arrays):
            problems.append(f"the parent's output '{name}' is all NaN on these inputs: a difference cannot show")
    return problems
