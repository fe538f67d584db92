"""Reports from experiment directories, without Ray: both layouts, eta, bad input,
and the HTML in headless Chromium. (`eeipu-ray run` then `report`: tests/test_cli.py.)"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from eeipu_ray.report import (
    ExperimentDirError,
    TrialRow,
    load_experiment,
    trial_row,
    write_report,
)
from eeipu_ray.report.series import eta_series
from eeipu_ray.search.acquisition import cost_cooling
from tests.cli.helpers import run_cli

STAGES = ["data", "features", "ridge"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ checks
# (also used by tests/test_cli.py on a real run)


def check_png(path: Path) -> tuple[int, int]:
    """Assert ``path`` is a decodable, non-empty PNG of plausible size; return (w, h)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 1600 and 300 <= height <= 1200, (path, width, height)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (height, width)
    assert float(pixels.std()) > 0.01, f"{path} is blank"
    return width, height


def markdown_trial_rows(markdown: str) -> list[list[str]]:
    """The rows of the trials table of a report.md (after its header and rule)."""
    section = markdown.split("## Trials", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]


def chromium() -> str:
    found = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not found:
        pytest.fail(
            "headless Chromium is needed to check report.html: install it with "
            "'apt-get install -y chromium' (Debian/Ubuntu), or point CHROMIUM at a binary"
        )
    return found


def open_in_chromium(page: Path, tmp_path: Path) -> str:
    """Load ``page`` in headless Chromium; return the DOM after its scripts ran."""
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_html_in_browser(page: Path, tmp_path: Path, trial_ids: list[str], n_images: int) -> None:
    dom = open_in_chromium(page, tmp_path)
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:2000]
    assert f'data-images-total="{n_images}"' in body.group(1), body.group(0)
    assert f'data-images-loaded="{n_images}"' in body.group(1), body.group(0)
    rows = re.findall(r'<tr class="trial" data-trial-id="([^"]*)">', dom)
    assert rows == trial_ids


# ----------------------------------------------------------------- helpers


def _result(i: int, memoized: int, score: float | None = None) -> dict[str, Any]:
    compute = [0.1, 2.0 + 0.1 * i, 0.5]
    spent = [
        0.0 if k < memoized - 1 else 0.05 if k < memoized else c for k, c in enumerate(compute)
    ]
    result: dict[str, Any] = {
        "memoized_stages": memoized,
        "total_cost": sum(spent),
        "trial_id": f"t{i:02d}",
        "timestamp": 1_700_000_000 + i,
        "config": {"data": {"noise": 0.1}, "features": {"n": 256 * (1 + i % 2)}, "ridge": {"a": i}},
    }
    result["score"] = 0.5 + 0.01 * i if score is None else score
    for k, s in enumerate(STAGES):
        result[f"stage_costs/{s}"] = spent[k]
        result[f"compute_costs/{s}"] = compute[k]
        result[f"cache_hit/{s}"] = int(k < memoized)
    return result


def _tune_dir(root: Path, results: list[dict[str, Any] | None]) -> Path:
    """A plain Ray Tune experiment directory: one subdirectory per trial."""
    root.mkdir(parents=True)
    for i, result in enumerate(results):
        trial = root / f"regression_t{i:02d}_{i + 1}_noise=0.1_2025-01-01_00-00-0{i % 10}"
        trial.mkdir()
        if result is None:
            (trial / "result.json").write_text("")
            (trial / "error.txt").write_text("Traceback ...\nValueError: stage 'features' failed\n")
            (trial / "params.json").write_text(json.dumps({"data": {"noise": 0.3}}))
            continue
        first = {**result, "score": -1.0}  # an earlier line: only the last one counts
        (trial / "result.json").write_text(json.dumps(first) + "\n" + json.dumps(result) + "\n")
        (trial / "params.json").write_text(json.dumps(result["config"]))
    return root


# ------------------------------------------------------------------- tests


def test_trial_row_reads_the_pipeline_result_schema() -> None:
    row = trial_row(_result(3, memoized=2), "score")
    assert row.completed and row.objective == pytest.approx(0.53)
    assert row.memoized_stages == 2 and row.trial_id == "t03"
    assert row.cache_hit == {"data": True, "features": True, "ridge": False}
    assert row.stage_costs == pytest.approx({"data": 0.0, "features": 0.05, "ridge": 0.5})
    assert row.charged_cost == pytest.approx(0.55)
    assert row.compute_costs["features"] == pytest.approx(2.3)
    nan = trial_row({**_result(1, 0), "score": math.nan}, "score")
    assert nan.status == "failed" and nan.objective is None and "nan" in (nan.error or "")
    missing = trial_row({"trial_id": "x"}, "score")
    assert missing.status == "failed" and "not reported" in (missing.error or "")


def test_report_of_a_plain_tune_directory(tmp_path: Path) -> None:
    results: list[dict[str, Any] | None] = [_result(i, memoized=min(i, 2)) for i in range(5)]
    results.insert(2, None)  # an errored trial
    root = _tune_dir(tmp_path / "exp", results)
    out = tmp_path / "out"
    files = write_report(root, out)
    assert files.markdown.parent == out and files.html.parent == out
    # No budget or warm-up known, no decision log: no eta plot, and the report says why.
    assert set(files.images) == {"best_objective", "stage_costs", "cache_hits"}
    for path in files.images.values():
        assert path.parent == out
        check_png(path)
    markdown = files.markdown.read_text()
    assert "Unavailable: the directory has no decision log" in markdown
    rows = markdown_trial_rows(markdown)
    assert len(rows) == 6
    ids = [r[1] for r in rows]
    assert ids[:5] == [f"t{i:02d}" for i in range(5)]  # completion order (timestamps)
    assert rows[5][2].startswith("failed: ValueError")  # no timestamp: last
    assert rows[4][3] == "2" and "(cached)" in rows[4][6]  # memoized, features loaded
    assert "Same in every trial: data/noise=0.1" not in markdown  # the errored trial differs
    assert "0.54 (trial t04)" in markdown  # the best of the last lines, not the first ones
    assert not (root / "report.md").exists()  # --out: nothing written into the experiment


def test_eta_is_reconstructed_from_budget_and_warmup(tmp_path: Path) -> None:
    root = _tune_dir(tmp_path / "exp", [_result(i, memoized=0) for i in range(6)])
    experiment = load_experiment(root, budget=40.0, n_warmup=2)
    series, note = eta_series(experiment)
    assert series is not None and series.source == "reconstructed" and "Reconstructed" in note
    assert series.eta[:3] == [1.0, 1.0, 1.0]  # warm-up, then the first BO step
    assert all(a > b for a, b in zip(series.eta[2:], series.eta[3:], strict=False))
    spent = series.budget_spent
    assert series.eta[4] == pytest.approx(cost_cooling(40.0, spent[4], spent[2]))
    files = write_report(experiment, tmp_path / "out")
    assert "eta" in files.images
    check_png(files.images["eta"])


def test_report_of_a_run_directory_uses_its_decision_log(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    rows = [
        trial_row(_result(i, memoized=min(i, 2)), "score", stage_names=STAGES) for i in range(4)
    ]
    (root / "trials.json").write_text(
        json.dumps(
            {
                "format": 1,
                "metric": "score",
                "mode": "max",
                "stage_names": STAGES,
                "trials": [r.to_dict() for r in rows],
            }
        )
    )
    (root / "summary.json").write_text(
        json.dumps(
            {
                "pipeline": "regression",
                "searcher": "eeipu",
                "metric": "score",
                "mode": "max",
                "budget": 20.0,
                "warmup": 2,
            }
        )
    )
    decisions = [
        {
            "trial_id": f"t{i:02d}",
            "phase": "warmup" if i < 2 else "bo",
            "eta": e,
            "budget_spent": s,
            "planned_prefix_depth": 0,
            "source_trial": None,
            "acquisition_value": None,
        }
        for i, (e, s) in enumerate([(1.0, 0.0), (1.0, 2.6), (1.0, 5.3), (0.8, 7.4)])
    ]
    (root / "decisions.json").write_text(json.dumps({"format": 1, "decisions": decisions}))
    files = write_report(root)
    assert files.markdown == root / "report.md"
    assert set(files.images) == {"best_objective", "stage_costs", "cache_hits", "eta"}
    markdown = files.markdown.read_text()
    assert "From the searcher's decision log" in markdown
    assert "- **Searcher:** eeipu" in markdown and "- **Budget:** 20" in markdown
    assert [r[1] for r in markdown_trial_rows(markdown)] == [r.trial_id for r in rows]
    check_html_in_browser(files.html, tmp_path, [r.trial_id or "" for r in rows], n_images=4)


def test_min_mode_and_no_completed_trials(tmp_path: Path) -> None:
    root = _tune_dir(tmp_path / "min", [_result(i, 0, score=5.0 - i) for i in range(3)])
    experiment = load_experiment(root, mode="min")
    assert experiment.best() is not None and experiment.best().trial_id == "t02"  # type: ignore[union-attr]
    failed = _tune_dir(tmp_path / "failed", [None, None])
    files = write_report(failed, tmp_path / "out")
    for path in files.images.values():  # "no completed trials" plots, still valid PNGs
        check_png(path)
    assert len(markdown_trial_rows(files.markdown.read_text())) == 2


@pytest.mark.parametrize("layout", ["missing", "file", "empty", "unrelated", "bad-json"])
def test_a_directory_that_is_not_an_experiment_is_refused(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "not-an-experiment"
    if layout == "file":
        path.write_text("hello")
    elif layout == "empty":
        path.mkdir()
    elif layout == "unrelated":
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "notes.txt").write_text("x")
    elif layout == "bad-json":
        path.mkdir()
        (path / "summary.json").write_text("{not json")
    with pytest.raises(ExperimentDirError, match=re.escape(str(path))):
        write_report(path)
    assert not (tmp_path / "report.md").exists()


def test_report_command_refuses_a_bad_directory_with_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "nothing-here"
    bad.mkdir()
    proc = run_cli("report", str(bad), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "not an experiment directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_shows_measured_energy_next_to_time_and_says_when_there_is_none(
    tmp_path: Path,
) -> None:
    metered = []
    for i in range(3):
        result = _result(i, memoized=0)
        for k, s in enumerate(STAGES):
            result[f"energy_joules/{s}"] = 10.0 * (k + 1) + i
            result[f"compute_energy_joules/{s}"] = 10.0 * (k + 1) + i
        result["total_energy_joules"] = sum(10.0 * (k + 1) + i for k in range(3))
        result["total_cpu_seconds"] = 1.5
        metered.append(result)
    row = trial_row(metered[1], "score")
    assert row.energy_joules == pytest.approx(63.0) and row.cpu_seconds == 1.5
    assert row.stage_energy == pytest.approx({"data": 11.0, "features": 21.0, "ridge": 31.0})
    assert TrialRow.from_dict(row.to_dict()) == row

    files = write_report(_tune_dir(tmp_path / "metered", metered), tmp_path / "out1")
    markdown = files.markdown.read_text()
    assert "- **Energy spent:** 189 J (measured)" in markdown
    assert "- **Process CPU time (CPU-seconds):** 4.5" in markdown
    header = next(line for line in markdown.split("## Trials", 1)[1].splitlines()
                  if line.startswith("|"))
    assert "| features cost | ridge cost | energy J | data energy J |" in header
    rows = markdown_trial_rows(markdown)
    assert rows[1][8:12] == ["63", "11", "21", "31"]

    files = write_report(_tune_dir(tmp_path / "plain", [_result(0, 0)]), tmp_path / "out2")
    markdown = files.markdown.read_text()
    assert "- **Energy spent:** not measured (no energy meter where the trials ran)" in markdown
    assert "energy J" not in markdown  # no columns of zeros for energy nobody measured
