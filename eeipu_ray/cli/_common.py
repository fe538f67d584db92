"""What the subcommands share: the usage error, option parsing, JSON output."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any


class UsageError(Exception):
    """The command line asks for something that cannot be done; exit status 2."""


# Decimal units are powers of 1000, binary ones powers of 1024, as in IEC 80000-13.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_UNITS_HINT = "units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024)"
_SIZE_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")


def parse_size(text: str) -> int:
    """A size in bytes: ``"20GiB"`` -> ``20 * 1024**3``, ``"500MB"`` -> ``500 * 1000**2``.

    A plain number is bytes; units (any case) are ``B``, ``KB``, ``MB``, ``GB``,
    ``TB`` (powers of 1000) and ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of
    1024). Fractions are fine where they make whole bytes (``"1.5KiB"``).

    Raises:
        ValueError: naming ``text``: not a number with one of those units, a
            negative size, or not a whole number of bytes.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes, optionally with a unit "
            f"({_UNITS_HINT})"
        )
    unit = match["unit"].lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}: unknown unit {match['unit']!r} ({_UNITS_HINT})")
    size = Fraction(match["number"]) * _SIZE_UNITS[unit]
    if size.denominator != 1:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes ({float(size)})")
    return int(size)


def size_argument(text: str) -> int:
    """``type=`` of a size option: :func:`parse_size`, its error as argparse's own."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_size_argument(text: str) -> int:
    """:func:`size_argument` of at least one byte."""
    size = size_argument(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return size


def parse_key_values(items: Sequence[str]) -> dict[str, Any]:
    """``["top_q=10", "name=t5"]`` -> ``{"top_q": 10, "name": "t5"}``.

    A value is read as JSON (numbers, true/false, null, lists, quoted strings)
    and otherwise kept as a string; a key must be a Python name. Raises
    :class:`UsageError` naming the bad item."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE with KEY a Python name")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def write_json(path: str, data: Any) -> None:
    # NaN and infinities are not JSON: write them as null.
    with open(path, "w") as fh:
        json.dump(json_safe(data), fh, indent=2, default=str)


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
