"""``eeipu-ray run --resume``: a sweep whose driver was SIGKILLed goes on to spend
its budget, keeping every trial that had finished and the searcher's observations."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from eeipu_ray.tune.searcher import EEIPUSearcher
from tests.cli.helpers import cli_command, cli_env, run_cli, run_main
from tests.cli.pipelines import runs_per_trial
from tests.experiment_files import wait_until_settled

BUDGET = 30.0
# The first four trials (the warm-up, Sobol points of the synthetic pipeline)
# cost 24.9 units: the fifth trial is held until the driver is killed, so the
# kill always finds budget left.
HOLD_AFTER = 4


def _finished_trials(exp_dir: Path) -> dict[str, float]:
    """Trial id -> score of the trials Tune's newest experiment state holds as
    finished (what ``Tuner.restore`` keeps); empty while there is none to read."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        state = json.loads(states[-1].read_text())
    except (OSError, ValueError):  # being written
        return {}
    finished = {}
    for trial_json, run_metadata in state["trial_data"]:
        trial = json.loads(trial_json)
        result = json.loads(run_metadata).get("last_result") or {}
        if trial["status"] == "TERMINATED" and "score" in result:
            finished[trial["trial_id"]] = result["score"]
    return finished


def _restored(exp_dir: Path) -> Any:
    """A fresh searcher with the newest checkpoint in ``exp_dir``."""
    searcher = EEIPUSearcher()
    searcher.restore_from_dir(str(exp_dir))
    return searcher


def _searcher_observations(exp_dir: Path) -> dict[str, float]:
    """Trial id -> objective of the completed trials in the searcher's checkpoint."""
    return {
        r.trial_id: r.objective
        for r in _restored(exp_dir).engine.records
        if r.status.value == "completed" and r.objective is not None
    }


def test_a_killed_sweep_resumes_and_spends_its_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hold_dir, exp_dir = tmp_path / "hold", tmp_path / "results" / "sweep"
    hold_dir.mkdir()
    (hold_dir / "hold").touch()
    run_args = [
        "tests.cli.pipelines:held_synthetic",
        "-o",
        f"hold_dir={hold_dir}",
        "-o",
        f"hold_after={HOLD_AFTER}",
        "--budget",
        str(BUDGET),
        "--warmup",
        "4",
        "--max-concurrent",
        "1",
        "--num-cpus",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--storage-path",
        str(tmp_path / "results"),
        "--name",
        "sweep",
        "--no-report",
    ]
    driver = subprocess.Popen(
        cli_command("run", *run_args),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the driver and its local Ray
    )
    before: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            before = _finished_trials(exp_dir)
            held = sum(runs_per_trial(hold_dir).values()) > HOLD_AFTER
            # Tune checkpoints the searcher with the experiment state; restore
            # needs both (and the search generator's) in the directory.
            synced = list(exp_dir.glob("searcher-state-*.pkl")) and list(
                exp_dir.glob("search_gen_state-*.json")
            )
            if len(before) >= HOLD_AFTER and held and synced:
                # Kill between Tune's writes of its state (tests/experiment_files.py).
                wait_until_settled(exp_dir)
                break
            if driver.poll() is not None:
                out = driver.stdout.read().decode(errors="replace") if driver.stdout else ""
                pytest.fail(f"the sweep ended before it was killed:\n{out[-3000:]}")
            time.sleep(0.5)
        else:
            pytest.fail(f"the sweep never checkpointed {HOLD_AFTER} finished trials")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=300)
    before_output = driver.stdout.read().decode(errors="replace") if driver.stdout else ""
    before = _finished_trials(exp_dir)  # what the settled state holds
    assert len(before) >= HOLD_AFTER
    observed_before = _searcher_observations(exp_dir)
    assert set(before) <= set(observed_before)
    spent_before = sum(r.charged_cost or 0.0 for r in _restored(exp_dir).engine.records)
    assert 0 < spent_before < BUDGET
    # The live progress had shown them finishing.
    for trial_id in before:
        assert f"trial {trial_id} finished: score" in before_output, before_output[-3000:]

    # A resumed run keeps its settings: a different one is refused, naming both.
    status, _, err = run_main(["run", "--resume", str(exp_dir), "--budget", "99"], capsys)
    assert status == 2 and "--budget 99.0" in err and "30.0" in err

    # State that Tune could not read (a file cut short by a kill during Tune's
    # copy, or an experiment state without trials) is refused, naming the file:
    # Tune would start the experiment over.
    for pattern, cut in [
        ("experiment_state-*.json", "half"),
        ("searcher-state-*.pkl", "half"),
        ("experiment_state-*.json", "no trials"),
    ]:
        copy = Path(tempfile.mkdtemp(dir=tmp_path)) / "sweep"
        shutil.copytree(exp_dir, copy)
        path = sorted(copy.glob(pattern))[-1]
        if cut == "half":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_text(json.dumps({**json.loads(path.read_text()), "trial_data": []}))
        status, _, err = run_main(["run", "--resume", str(copy)], capsys)
        assert status == 2 and path.name in err, err
        assert ("over" if cut == "half" else "holds no trial") in err

    (hold_dir / "hold").unlink()
    resumed = run_cli("run", "--resume", str(exp_dir), cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    # The sweep spent its budget: the searcher stopped at BUDGET in total,
    # counting what was spent before the kill.
    final = _restored(exp_dir)
    assert final.budget_spent >= BUDGET
    assert final.budget_spent - spent_before < BUDGET
    # The searcher's observations after the resume include the ones before it.
    observed_after = _searcher_observations(exp_dir)
    for trial_id, objective in observed_before.items():
        assert observed_after[trial_id] == pytest.approx(objective)
    assert len(observed_after) > len(observed_before)
    # No trial that had finished is lost or run again...
    trials = json.loads((exp_dir / "trials.json").read_text())["trials"]
    scores = {t["trial_id"]: t["objective"] for t in trials}
    assert len(scores) == len(trials)  # one row per trial
    runs = runs_per_trial(hold_dir)
    for trial_id, score in before.items():
        assert scores[trial_id] == pytest.approx(score)
        assert runs[trial_id] == 1, runs
    # ...and the summary counts them with the new ones.
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["trials"] == len(trials) > len(before) and summary["errors"] == 0
    assert summary["budget"] == BUDGET and summary["pipeline"] == "held-synthetic"
    decisions = json.loads((exp_dir / "decisions.json").read_text())["decisions"]
    assert set(before) <= {d["trial_id"] for d in decisions}
    # The resumed driver's progress counts the restored trials too.
    assert f"[{len(trials)} trials done:" in resumed.stdout
