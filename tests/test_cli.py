"""The `eeipu-ray` command end to end: the README's main job at a tiny size."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import run_cli, run_main
from tests.test_report import check_html_in_browser, check_png, markdown_trial_rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small `eeipu-ray run` shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("cli")
    cache_dir = tmp_path / "cache"
    tracking_uri = (tmp_path / "mlruns").as_uri()  # file:///...
    proc = run_cli(
        "run",
        "regression",
        "--num-samples",
        "9",
        "--budget",
        "1000",
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
        "--mlflow",  # Ray's MLflow logger callback, into a local file store
        tracking_uri,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "proc": proc,
        "tmp": tmp_path,
        "cache": cache_dir,
        "exp": tmp_path / "results" / "smoke",
        "mlflow": tracking_uri,
    }


def test_run_sweeps_a_builtin_pipeline_and_reuses_prefixes(sweep: dict[str, Any]) -> None:
    proc, tmp_path, cache_dir = sweep["proc"], sweep["tmp"], sweep["cache"]
    summary = json.loads((sweep["exp"] / "summary.json").read_text())
    assert summary["trials"] == 9 and summary["errors"] == 0
    # Stages 1-2 have 2 x 2 x 2 = 8 distinct prefixes; 9 sequential trials must
    # revisit one (pigeonhole), and that trial skips the expensive feature stage.
    reused = [r for r in summary["rows"] if r["memoized_stages"] == 2]
    assert reused, summary["rows"]
    # Kind (a), by margin: both sides hold the same ridge time; the rest is a
    # memory-mapped load (~2-3 ms) against the recorded data + feature compute
    # (~0.1-0.4 s of real NumPy work, more on a busy machine, never less).
    assert all(r["total_cost"] < r["compute_cost"] for r in reused)
    # The totals are the sums of the rows. (Whether memoization wins overall in a
    # 9-trial run is up to timing noise: every miss also pays for its cache write.)
    ok = [r for r in summary["rows"] if r.get("trial_id")]
    assert summary["cost_spent_s"] == sum(r["total_cost"] for r in ok)
    assert summary["cost_without_memoization_s"] == sum(r["compute_cost"] for r in ok)
    assert "started from a cached prefix" in proc.stdout
    # Energy next to time: CPU-seconds always; joules only where a meter measured them.
    assert summary["cost"] == "time" and summary["cpu_seconds"] > 0
    if summary["energy_spent_j"] is None:
        assert "energy: not measured" in proc.stdout
        assert all(r["total_energy_joules"] is None for r in ok)
    else:
        assert f"energy spent (measured): {summary['energy_spent_j']:.1f} J" in proc.stdout

    stats = run_cli("cache", "stats", str(cache_dir), cwd=tmp_path)
    assert stats.returncode == 0, stats.stderr
    before = json.loads(stats.stdout)
    assert before["entries"] >= 2
    assert before["pinned"] >= 1  # the searcher pins the prefixes of its best trials
    listing = run_cli("cache", "ls", str(cache_dir), cwd=tmp_path)
    stages = {line.split()[-1] for line in listing.stdout.splitlines()}
    assert stages == {"data", "data/features"}, listing.stdout
    gc = run_cli("cache", "gc", str(cache_dir), "--max-bytes", "1", cwd=tmp_path)
    assert gc.returncode == 0
    after = json.loads(run_cli("cache", "stats", str(cache_dir), cwd=tmp_path).stdout)
    # Everything unpinned is evicted to get under 1 byte; pinned prefixes stay.
    assert after["entries"] == after["pinned"] == before["pinned"]
    assert f"evicted {before['entries'] - after['entries']} entries" in gc.stdout


def test_mlflow_logs_every_trial_with_its_metrics(
    sweep: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eeipu-ray run --mlflow URI``: every trial is an MLflow run of the experiment
    named after the sweep, with its metrics and its configuration."""
    import mlflow

    trials = json.loads((sweep["exp"] / "trials.json").read_text())["trials"]
    assert len(trials) == 9
    # MLflow 3 opens a file store only when told to; `--mlflow file:...` tells it.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(sweep["mlflow"])
    runs = mlflow.search_runs(experiment_names=["smoke"], output_format="list")
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


def test_run_rejects_an_unknown_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_main(["run", "no_such_pipeline"], capsys)
    assert status == 2 and "no_such_pipeline" in err


def test_run_shows_live_progress_and_writes_trials_and_decisions(sweep: dict[str, Any]) -> None:
    out, exp = sweep["proc"].stdout, sweep["exp"]
    # Live progress, a line per finished trial and one for the sweep (budget,
    # cost-cooling eta, best so far), in Tune's current output mode.
    finished = re.findall(
        r"^trial (\w+) finished: score (-?[0-9.e+-]+), (\d) stages? memoized, cost [0-9.e+-]+ s$",
        out,
        flags=re.M,
    )
    status = re.findall(
        r"^\[(\d+) trials? done: (\d+) memoized, 0 failed; \d+ running\] Cost: [0-9.e+-]+ s "
        r"spent of 1000 s \([0-9.e+-]+ s left\); cost-cooling eta [0-9.]+; best score "
        r"(-?[0-9.e+-]+) \(trial (\w+)\)$",
        out,
        flags=re.M,
    )
    assert len(finished) == 9, out[-3000:]
    assert [int(s[0]) for s in status[:9]] == list(range(1, 10))
    assert status[-1][0] == "9"  # and once more at the end
    # The memoized count and the best so far follow the trials as they finish.
    assert [int(s[1]) for s in status[:9]] == [
        sum(1 for f in finished[: i + 1] if int(f[2]) > 0) for i in range(9)
    ]
    best = max(finished, key=lambda f: float(f[1]))
    assert status[-1][3] == best[0]
    assert "== Status ==" not in out  # no legacy reporter
    trials = json.loads((exp / "trials.json").read_text())
    assert trials["metric"] == "score" and trials["stage_names"] == ["data", "features", "ridge"]
    rows = trials["trials"]
    assert len(rows) == 9 and all(r["status"] == "completed" for r in rows)
    for r in rows:
        assert r["charged_cost"] == pytest.approx(sum(r["stage_costs"].values()))
        assert sum(r["cache_hit"].values()) == r["memoized_stages"]
    decisions = json.loads((exp / "decisions.json").read_text())["decisions"]
    assert {d["trial_id"] for d in decisions} == {r["trial_id"] for r in rows}
    assert all(d["phase"] == "warmup" and d["eta"] == 1.0 for d in decisions)  # 9 < warm-up 10
    spent = [d["budget_spent"] for d in decisions]
    assert spent == sorted(spent) and spent[0] == 0.0
    # ...and the report, written at the end.
    assert f"report: {exp / 'report.html'}" in out
    for name in ("report.md", "report.html", "best_objective.png", "eta.png"):
        assert (exp / name).is_file(), name


def test_report_of_the_run(sweep: dict[str, Any], tmp_path: Path) -> None:
    exp, out_dir = sweep["exp"], tmp_path / "report"
    proc = run_cli("report", str(exp), "--out", str(out_dir), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == ["best_objective.png", "cache_hits.png", "eta.png", "stage_costs.png"]
    for name in pngs:
        check_png(out_dir / name)
        assert f"plot: {out_dir / name}" in proc.stdout
    trial_ids = [r["trial_id"] for r in json.loads((exp / "trials.json").read_text())["trials"]]
    markdown = (out_dir / "report.md").read_text()
    rows = markdown_trial_rows(markdown)
    assert [r[1] for r in rows] == trial_ids
    assert sum(r[3] == "2" for r in rows) >= 1  # the pigeonhole reuse of the sweep
    assert "From the searcher's decision log" in markdown
    check_html_in_browser(out_dir / "report.html", tmp_path, trial_ids, n_images=4)


def test_run_energy_is_refused_where_no_meter_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EEIPU_ENERGY_METERS", "none")  # as on a machine without NVML or RAPL
    status, _, err = run_main(
        ["run", "regression", "--num-samples", "1", "--cost", "energy"], capsys
    )
    assert status == 2
    assert "--cost energy: no energy meter works on this machine" in err
    assert "metering is off" in err  # the reason, per meter
    assert not (tmp_path / "results").exists()
    monkeypatch.delenv("EEIPU_ENERGY_METERS")
    # --energy is the same as --cost energy.
    argv = ["run", "regression", "--energy", "--searcher", "tune-random", "--num-samples", "1"]
    status, _, err = run_main(argv, capsys)
    assert status == 2 and "budget-aware searcher" in err


def test_report_rejects_a_directory_that_is_not_an_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        status, _, err = run_main(["report", str(bad)], capsys)
        assert status == 2, err
        assert str(bad) in err


def test_run_a_user_pipeline_given_as_module_object_with_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``eeipu-ray run module:object -o KEY=VALUE``: the builder gets the options."""
    proc = run_cli(
        "run",
        "tests.tune.toy_pipeline:make_pipeline",
        "-o",
        "name=cli-user",
        "-o",
        "sleep_s=0.01",
        "-o",
        "degrees=[1, 2, 3]",
        "--searcher",
        "random",
        "--num-samples",
        "3",
        "--warmup",
        "2",
        "--no-report",
        "--num-cpus",
        "1",
        "--cache",
        str(tmp_path / "cache"),
        "--name",
        "user",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "user" / "summary.json").read_text())
    assert summary["pipeline"] == "cli-user"  # the name option reached the builder
    assert summary["trials"] == 3 and summary["errors"] == 0
    # degrees=[1, 2, 3] (JSON) replaced the builder's default choices (1, 2).
    assert {r["config"]["features"]["degree"] for r in summary["rows"]} <= {1, 2, 3}

    # Bad options are refused before a cluster starts, naming the option.
    argv = ["run", "tests.tune.toy_pipeline:make_pipeline", "-o", "no_such_option=1"]
    status, _, err = run_main([*argv, "--num-samples", "1"], capsys)
    assert status == 2 and "no_such_option" in err
    status, _, err = run_main(["run", "regression", "-o", "oops", "--num-samples", "1"], capsys)
    assert status == 2 and "'oops'" in err
