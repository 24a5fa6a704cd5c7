"""Checks of values read from JSON that anyone may have edited (receipts, a search's state): each says where and why.

A check returns the value when it has the type the writer gives it and raises `Malformed`
otherwise, with a message that starts with `where`; the reader turns that into its own one-line
error (InvalidModelError for a receipt, UsageError for a search state).
"""

from __future__ import annotations

import re
from typing import Any

from onnxmorph.limits import quote

SHA256 = re.compile(r"[0-9a-f]{64}")


class Malformed(Exception):
    """A value that is not what its writer writes; the message says where and why."""


def kind(value: Any) -> str:
    """What a JSON value is, for a message: 'an object', 'a list', 'a string', 'a number', ..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def as_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Malformed(f"{where} is {kind(value)}, not an object")
    return value


def as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise Malformed(f"{where} is {kind(value)}, not a list")
    return value


def as_string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{where} is {kind(value)}, not a string")
    return value


def as_number(value: Any, where: str, *, optional: bool = False) -> float | None:
    """A JSON number that prints as a float: not a boolean, not an integer too large for a float."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Malformed(f"{where} is {kind(value)}, not a number")
    try:
        return float(value)
    except OverflowError:
        raise Malformed(f"{where} is a number too large to print") from None


def as_integer(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise Malformed(f"{where} is {quote(repr(value), 40)}, not a whole number{bound}")
    return value


def as_digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise Malformed(f"{where} is not a SHA-256 digest (64 hexadecimal digits)")
    return value
