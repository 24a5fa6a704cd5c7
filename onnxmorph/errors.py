"""Typed errors of onnxmorph; the CLI maps each to a one-line message and an exit code."""

from __future__ import annotations

from typing import Any


class OnnxMorphError(Exception):
    """Base class of every error onnxmorph raises on purpose."""

    exit_code = 2


class InvalidModelError(OnnxMorphError):
    """The model cannot be read, is not ONNX, or is not a valid graph."""


class UnsafeModelError(InvalidModelError):
    """The model asks for something onnxmorph refuses to do (escaping paths, huge sizes)."""


class UsageError(OnnxMorphError):
    """A parameter, path or option is wrong (unknown layer, bad size, unwritable output)."""


class NotApplicable(OnnxMorphError):
    """A morph cannot be applied to this layer while preserving the function."""


class VerificationFailed(OnnxMorphError):
    """The child does not compute the parent's function within the tolerances."""

    exit_code = 1

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(exc).__name__)
    return first if len(first) <= 300 else first[:297] + "..."
