"""Resource limits checked before allocating: each one named, with the variable that raises it.

An input or a parameter can ask for any amount of memory or time (`widen --width 100000000`,
a YAML recipe of nested aliases, an .npz bomb). Every such request is sized first, from the
parameters and the model's declared shapes, and refused in one line when it passes its limit.
Each limit is an environment variable, so a user who does mean it can raise it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from onnxmorph.errors import UnsafeModelError, UsageError


def physical_memory() -> int:
    """Bytes of physical memory (8 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * 2**30


@dataclass(frozen=True)
class Limit:
    """A bound with its environment variable; `value()` reads the variable each time."""

    variable: str
    what: str
    unit: str  # "bytes", "seconds" or "" (a count)

    def default(self) -> int:
        return _DEFAULTS[self.variable]()

    def value(self) -> int:
        text = os.environ.get(self.variable, "").strip()
        if not text:
            return self.default()
        return parse_amount(text, self.variable)

    def check(self, amount: float, subject: str, error: type[Exception] = UsageError) -> None:
        """Refuse `amount` of this resource for `subject` when it passes the limit."""
        limit = self.value()
        if amount > limit:
            raise error(
                f"{subject} would need {_show(amount, self.unit)}, over the limit of {_show(limit, self.unit)} "
                f"for {self.what}; refused (set {self.variable} to raise it)"
            )


def parse_amount(text: str, name: str) -> int:
    """A limit's value as a user writes it (`1000`, `2e9`): a finite, non-negative whole number, or UsageError.

    `inf`, `nan`, `1e400` (infinity once read) and numbers too long to read are refused in one
    line, never an OverflowError.
    """
    shown = quote(repr(text), 40)
    try:
        number = float(text)
    except ValueError:
        raise UsageError(f"{name}={shown}: expected a whole number") from None
    if not math.isfinite(number):
        raise UsageError(f"{name}={shown}: expected a finite whole number")
    if number < 0:
        raise UsageError(f"{name}={shown}: expected a non-negative number")
    return int(number)


def _show(amount: float, unit: str) -> str:
    if unit == "seconds":
        return f"{amount:g} s"
    if unit != "bytes":
        return f"{int(amount)}"
    for name, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if amount >= size:
            return f"{amount / size:.1f} {name}"
    return f"{int(amount)} bytes"


_DEFAULTS = {
    # A model file and what it declares: half of the memory (the rest is for the child).
    "ONNXMORPH_MAX_MODEL_BYTES": lambda: physical_memory() // 2,
    # New weights a morph may create: a quarter of the memory, since solving them takes a few
    # times their size in work arrays.
    "ONNXMORPH_MAX_NEW_BYTES": lambda: physical_memory() // 4,
    # Layers a single morph may add (subnet depth x branches, blocks): each costs a solve.
    "ONNXMORPH_MAX_NEW_LAYERS": lambda: 1024,
    # Recipes: file size, steps, nesting.
    "ONNXMORPH_MAX_RECIPE_BYTES": lambda: 1 * 2**20,
    "ONNXMORPH_MAX_RECIPE_STEPS": lambda: 1000,
    # Verification inputs (--inputs X.npz and the random ones): bytes in memory.
    "ONNXMORPH_MAX_INPUT_BYTES": lambda: physical_memory() // 8,
    # A search's worker processes: each holds PyTorch and a model; more than the CPUs only queue.
    "ONNXMORPH_MAX_WORKERS": lambda: max(2, os.cpu_count() or 1),
    # The candidates one search call may train (rounds x (children + 1), and the root): each is
    # a morph, a verification and a training run, and is planned before the round starts.
    "ONNXMORPH_MAX_CANDIDATES": lambda: 10_000,
    # Connecting to an existing Ray cluster (--ray-address): Ray itself retries for minutes.
    "ONNXMORPH_RAY_TIMEOUT": lambda: 30,
}

MODEL_BYTES = Limit("ONNXMORPH_MAX_MODEL_BYTES", "a model", "bytes")
NEW_BYTES = Limit("ONNXMORPH_MAX_NEW_BYTES", "the weights one morph creates", "bytes")
NEW_LAYERS = Limit("ONNXMORPH_MAX_NEW_LAYERS", "the layers one morph adds", "")
RECIPE_BYTES = Limit("ONNXMORPH_MAX_RECIPE_BYTES", "a recipe file", "bytes")
RECIPE_STEPS = Limit("ONNXMORPH_MAX_RECIPE_STEPS", "the steps of a recipe", "")
INPUT_BYTES = Limit("ONNXMORPH_MAX_INPUT_BYTES", "verification inputs", "bytes")
WORKERS = Limit("ONNXMORPH_MAX_WORKERS", "a search's worker processes", "")
CANDIDATES = Limit("ONNXMORPH_MAX_CANDIDATES", "the candidates of one search", "")
RAY_TIMEOUT = Limit("ONNXMORPH_RAY_TIMEOUT", "connecting to a Ray cluster", "seconds")

ALL = (MODEL_BYTES, NEW_BYTES, NEW_LAYERS, RECIPE_BYTES, RECIPE_STEPS, INPUT_BYTES, WORKERS, CANDIDATES, RAY_TIMEOUT)

# Nesting of a recipe document: a list of flat objects needs 3; JSON and YAML parsers recurse.
MAX_RECIPE_DEPTH = 16


def check_model_bytes(amount: float, subject: str) -> None:
    MODEL_BYTES.check(amount, subject, UnsafeModelError)


def quote(value: object, limit: int = 200) -> str:
    """`value` as text for an error message: one line, at most `limit` characters."""
    text = str(value).replace("\n", "\\n").replace("\r", "\\r").replace("\x00", "\\0")
    return text if len(text) <= limit else text[: limit - 3] + "..."
