"""Print the core dependencies of pyproject.toml pinned to their lowest allowed versions.

``ray[tune]>=2.50`` becomes ``ray[tune]==2.50``; a requirement without a ``>=``
floor is printed as it is. ``--skip NAME`` leaves a package out (torch, which
the test script installs first from its own spec).

    python scripts/lowest_requirements.py --skip torch > /tmp/lowest.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

FLOOR = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+(?:\[[^\]]+\])?)\s*>=\s*(?P<version>[^,;\s]+)\s*$")


def lowest(requirement: str) -> str:
    """``name[extras]==floor`` for a ``name[extras]>=floor`` requirement."""
    match = FLOOR.match(requirement.split(";", maxsplit=1)[0].strip())
    if match is None:
        return requirement
    return f"{match['name']}=={match['version']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", default=str(Path(__file__).parents[1] / "pyproject.toml"))
    parser.add_argument("--skip", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    skip = {s.lower() for s in args.skip}
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower()
        if name not in skip:
            print(lowest(requirement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
