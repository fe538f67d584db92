"""The `eeipu-ray` command end to end: the README's main job at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_AIR_NEW_OUTPUT": "0"}
    return subprocess.run(
        [sys.executable, "-m", "eeipu_ray.cli", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_sweeps_a_builtin_pipeline_and_reuses_prefixes(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    proc = _cli(
        "run",
        "regression",
        "--num-samples",
        "9",
        "--num-cpus",
        "2",
        "--max-concurrent",
        "1",
        "--cache",
        str(cache_dir),
        "--storage-path",
        str(tmp_path / "results"),
        "--name",
        "smoke",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "smoke" / "summary.json").read_text())
    assert summary["trials"] == 9 and summary["errors"] == 0
    # Stages 1-2 have 2 x 2 x 2 = 8 distinct prefixes; 9 sequential trials must
    # revisit one (pigeonhole), and that trial skips the expensive feature stage.
    reused = [r for r in summary["rows"] if r["memoized_stages"] == 2]
    assert reused, summary["rows"]
    assert all(r["total_cost"] < r["compute_cost"] for r in reused)
    # The totals are the sums of the rows. (Whether memoization wins overall in a
    # 9-trial run is up to timing noise: every miss also pays for its cache write.)
    ok = [r for r in summary["rows"] if r.get("trial_id")]
    assert summary["cost_spent_s"] == sum(r["total_cost"] for r in ok)
    assert summary["cost_without_memoization_s"] == sum(r["compute_cost"] for r in ok)
    assert "started from a cached prefix" in proc.stdout

    stats = _cli("cache", "stats", str(cache_dir), cwd=tmp_path)
    assert stats.returncode == 0, stats.stderr
    before = json.loads(stats.stdout)
    assert before["entries"] >= 2
    assert before["pinned"] >= 1  # the searcher pins the prefixes of its best trials
    listing = _cli("cache", "ls", str(cache_dir), cwd=tmp_path)
    stages = {line.split()[-1] for line in listing.stdout.splitlines()}
    assert stages == {"data", "data/features"}, listing.stdout
    gc = _cli("cache", "gc", str(cache_dir), "--max-bytes", "1", cwd=tmp_path)
    assert gc.returncode == 0
    after = json.loads(_cli("cache", "stats", str(cache_dir), cwd=tmp_path).stdout)
    # Everything unpinned is evicted to get under 1 byte; pinned prefixes stay.
    assert after["entries"] == after["pinned"] == before["pinned"]
    assert f"evicted {before['entries'] - after['entries']} entries" in gc.stdout


def test_run_rejects_an_unknown_pipeline(tmp_path: Path) -> None:
    proc = _cli("run", "no_such_pipeline", cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "no_such_pipeline" in proc.stderr
