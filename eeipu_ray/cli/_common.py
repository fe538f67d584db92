"""What the subcommands share: the usage error, option parsing, JSON output."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


class UsageError(Exception):
    """The command line asks for something that cannot be done; exit status 2."""


def parse_size(text: str) -> int:
    """``"20GiB"`` -> bytes (k, m, g, t: powers of 1024; a trailing ``b``/``ib`` is optional)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


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
