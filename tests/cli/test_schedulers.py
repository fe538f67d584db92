"""``eeipu-ray run --scheduler asha|sm2``: Tune's scheduler stops trials early on
their intermediate results, and the sweep and its outputs take such trials in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.helpers import run_cli

EPOCHS = 9  # tests.cli.pipelines.reporting: 9 reports, then the final result


@pytest.mark.parametrize(
    ("scheduler", "tune_name"), [("asha", "AsyncHyperBandScheduler"), ("sm2", "SM2Scheduler")]
)
def test_scheduler_stops_trials_early(scheduler: str, tune_name: str, tmp_path: Path) -> None:
    proc = run_cli(
        "run",
        "tests.cli.pipelines:reporting",
        "--scheduler",
        scheduler,
        "--searcher",
        "random",  # seeded: the same configurations in the same order every time
        "--num-samples",
        "8",
        "--warmup",
        "8",
        "--max-concurrent",
        "1",
        "--num-cpus",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--name",
        scheduler,
        "--no-report",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert tune_name in proc.stdout  # Tune's experiment header names the scheduler
    exp = tmp_path / "results" / scheduler
    rows = json.loads((exp / "summary.json").read_text())["rows"]
    assert len(rows) == 8 and not any("error" in r for r in rows)
    iterations = {}
    for trial_dir in exp.glob("reporting_*"):
        results = (trial_dir / "result.json").read_text().splitlines()
        iterations[trial_dir.name.split("_")[-1]] = len(results)
    assert len(iterations) == 8
    # Stopped at a rung: fewer results than the nine epochs and the final one.
    stopped = {t for t, n in iterations.items() if n < EPOCHS + 1}
    assert stopped and stopped != set(iterations), iterations
    for trial_id in stopped:
        assert f"trial {trial_id} ended after {iterations[trial_id]} result" in proc.stdout
    for trial_id in set(iterations) - stopped:
        assert f"trial {trial_id} finished: score" in proc.stdout
    # The per-trial table shows no memoized count for a trial stopped before its
    # pipeline's end.
    assert all(r["memoized_stages"] is None for r in rows if r["trial_id"] in stopped)
