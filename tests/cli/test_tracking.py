"""``eeipu-ray run --mlflow URI``: Ray's MLflowLoggerCallback logs every trial, with
its metrics, into an MLflow experiment named after the run (a local file store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.helpers import run_cli

mlflow = pytest.importorskip("mlflow")


def test_mlflow_logs_every_trial_with_its_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracking_uri = (tmp_path / "mlruns").as_uri()  # file:///...
    proc = run_cli(
        "run",
        "synthetic",
        "--num-samples",
        "3",
        "--warmup",
        "3",
        "--max-concurrent",
        "1",
        "--num-cpus",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--name",
        "tracked",
        "--no-report",
        "--mlflow",
        tracking_uri,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = json.loads((tmp_path / "results" / "tracked" / "trials.json").read_text())["trials"]
    assert len(trials) == 3

    # MLflow 3 opens a file store only when told to; `--mlflow file:...` tells it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
    assert len(runs) == len(trials)
    by_trial = {r.data.tags["trial_name"]: r for r in runs}
    for trial in trials:
        (name,) = [n for n in by_trial if n.endswith(trial["trial_id"])]
        run = by_trial[name]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["score"] == pytest.approx(trial["objective"])
        assert run.data.metrics["total_cost"] == pytest.approx(trial["charged_cost"])
        assert run.data.metrics["memoized_stages"] == trial["memoized_stages"]
        # The trial's configuration, as MLflow params ("stage/name").
        for stage, params in trial["config"].items():
            for key, value in params.items():
                assert float(run.data.params[f"{stage}/{key}"]) == pytest.approx(value)
