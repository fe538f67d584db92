"""docs/reliability.md names the test behind every row: each must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


def _references(text: str) -> list[tuple[str, str | None]]:
    """``(path, test_name or None)`` for each test a table cell names; a bare
    ``::name`` refers to the path named before it in the same cell."""
    refs: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        for cell in line.split("|"):
            path = None
            for ref in re.findall(r"`([^`]*)`", cell):
                match = re.fullmatch(r"((?:tests|benchmarks)/[\w/]+\.py)?(?:::(\w+))?", ref)
                if not match or not (match.group(1) or match.group(2)):
                    continue
                path = match.group(1) or path
                assert path is not None, f"{ref!r} in {line!r} names no file"
                refs.append((path, match.group(2)))
    return refs


def test_every_test_the_reliability_table_names_exists() -> None:
    refs = _references(DOC.read_text())
    assert len(refs) >= 20
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file():
            missing.append(path)
        elif name is not None and not re.search(
            rf"^(?:async )?def {name}\(", file.read_text(), re.MULTILINE
        ):
            missing.append(f"{path}::{name}")
    assert not missing, missing


def test_the_reference_parser_sees_bare_test_names() -> None:
    refs = _references("| x | y | `tests/a.py::one`, `::two` |\n| `benchmarks/b.py` |\n")
    assert refs == [("tests/a.py", "one"), ("tests/a.py", "two"), ("benchmarks/b.py", None)]
