"""Killing a driver between Tune's writes of its experiment state.

Tune copies its state files into the experiment directory in place: a driver
killed during a copy leaves a file cut short, and ``Tuner.restore`` then starts
the experiment over (``eeipu-ray run --resume`` refuses such a directory). The
kill tests are about resuming, so they kill between writes: once the newest
state files have been readable and unchanged for a while, the next write is at
least Tune's checkpoint period away (10 s or more by default), or never comes
(a driver whose loop the test has paused).
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

from eeipu_ray.cli._common import UsageError
from eeipu_ray.cli._resume import STATE_FILES, check_saved_state


def _snapshot(exp_dir: Path) -> dict[str, bytes]:
    files = {}
    for pattern, _ in STATE_FILES:
        for path in glob.glob(str(exp_dir / pattern)):
            try:
                files[path] = Path(path).read_bytes()
            except OSError:  # replaced while listed
                files[path] = b""
    return files


def wait_until_settled(exp_dir: Path, *, quiet_s: float = 1.0, timeout: float = 300) -> None:
    """Return once the state Tune would restore from is readable and has not
    changed for ``quiet_s`` seconds; ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    previous, since = None, time.monotonic()
    while time.monotonic() < deadline:
        current = _snapshot(exp_dir)
        if current != previous:
            previous, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            try:
                check_saved_state(str(exp_dir))
            except UsageError:
                pass  # cut short and not yet rewritten: wait for the next write
            else:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the experiment state in {exp_dir} never settled")
