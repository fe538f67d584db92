"""Running ``eeipu-ray`` as users do (a subprocess, in Ray's current output mode), or a
command's ``main()`` in this process for what is refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a command-line run: this one, with the repository on
    ``PYTHONPATH`` (``tests.cli.pipelines``) and Tune's output left at its default
    (tests/conftest.py turns the legacy one on for the library's tests)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AIR_NEW_OUTPUT"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **(extra or {})}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "eeipu_ray.cli", *args]


def run_cli(
    *args: str, cwd: Path, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``eeipu-ray ARGS`` to its end; its output captured."""
    return subprocess.run(
        cli_command(*args),
        check=False,
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call_main(
    main: Callable[[list[str]], int], argv: list[str], capsys: Any
) -> tuple[int, str, str]:
    """A command's ``main(argv)`` in this process: its exit status (argparse exits;
    ``main`` returns), stdout and stderr (read from pytest's ``capsys``)."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def run_main(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """``eeipu-ray ARGV`` in this process (see :func:`call_main`)."""
    from eeipu_ray.cli import main

    return call_main(main, argv, capsys)
