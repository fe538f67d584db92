"""A driver killed mid-experiment resumes with Tuner.restore: the budget spent
and the observations come back, and the search finishes within its budget."""

from __future__ import annotations

import glob
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from eeipu_ray.cache import PrefixCache
from eeipu_ray.pipelines.synthetic import build_pipeline, synthetic_objective
from eeipu_ray.tune.searcher import EEIPUSearcher
from tests.experiment_files import wait_until_settled

DRIVER = Path(__file__).with_name("restore_driver.py")
BUDGET = 30.0  # restore_driver's: more than its four warm-up trials cost (24.9)


def _checkpoint_state(exp_dir: Path) -> dict[str, Any] | None:
    paths = sorted(glob.glob(str(exp_dir / "searcher-state-*.pkl")))
    if not paths:
        return None
    try:
        with open(paths[-1], "rb") as fh:
            return pickle.load(fh)
    except (EOFError, pickle.UnpicklingError):
        return None


def _completed(state: dict[str, Any]) -> dict[str, float]:
    return {
        r["trial_id"]: r["objective"]
        for r in state["engine"]["records"]
        if r["status"] == "completed"
    }


def test_killed_driver_resumes_with_budget_and_observations(tmp_path: Path) -> None:
    storage, cache_dir = tmp_path / "results", tmp_path / "cache"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    cmd = [sys.executable, str(DRIVER)]
    driver = subprocess.Popen(
        [*cmd, "start", str(storage), str(cache_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    exp_dir = storage / "exp"
    state = None
    deadline = time.monotonic() + 1200
    try:
        while time.monotonic() < deadline:
            state = _checkpoint_state(exp_dir)
            # Tuner.restore reloads the searcher only when the storage holds the
            # search generator's state too (Tune copies the staging directory up
            # file by file; a busy machine can be killed in between).
            synced = glob.glob(str(exp_dir / "search_gen_state-*.json")) and glob.glob(
                str(exp_dir / "experiment_state-*.json")
            )
            if state is not None and len(_completed(state)) >= 4 and synced:
                # Pause the driver's loop, then kill it once what it wrote has
                # settled: no state file is cut short (tests/experiment_files.py).
                (storage / "pause").touch()
                wait_until_settled(exp_dir)
                break
            if driver.poll() is not None:
                pytest.fail(
                    "driver ended before it was killed:\n"
                    + driver.stdout.read().decode(errors="replace")[-3000:]
                )
            time.sleep(0.5)
        else:
            pytest.fail("the sweep never checkpointed its 4 warm-up trials")
    finally:
        # SIGKILL the driver and the local Ray cluster it started (its session).
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=300)
        (storage / "pause").unlink(missing_ok=True)  # the resumed driver unpickles the callback
    assert state is not None
    before = _checkpoint_state(exp_dir)  # the last state written before the kill
    assert before is not None
    spent_before = sum(r["charged_cost"] or 0.0 for r in before["engine"]["records"])
    # Kind (a), deterministic: the driver runs its four Sobol warm-up trials (24.9
    # units), then holds the next ones (BO suggestions, pending) until it is killed,
    # so the kill always finds budget left: no race with the sweep.
    assert 0 < spent_before < BUDGET, "kill the driver before the budget is spent"

    resumed = subprocess.run(
        [*cmd, "resume", str(storage), str(cache_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    cache = PrefixCache(cache_dir)
    pinned_after = cache.pinned()  # read before anything below could touch the pins
    pipeline = build_pipeline(time_scale=0.15)
    # No cache: restoring this copy must not change the pins under test.
    final = EEIPUSearcher(pipeline, metric="score", mode="max", budget=BUDGET, cache=None)
    final.restore_from_dir(str(exp_dir))
    # The pinned prefixes survived the kill: the cache pins exactly the proper
    # prefixes of the resumed search's top trials, and holds every one of them.
    assert before["pinned"], "the searcher had pinned prefixes before the kill"
    wanted = final.engine.pins()
    assert pinned_after == wanted, (
        f"cache pins not wanted by the resumed search: {sorted(pinned_after - wanted)}; "
        f"wanted but not pinned: {sorted(wanted - pinned_after)}; the search's records: "
        f"{[(r.trial_id, r.status.value, r.objective) for r in final.engine.records]}; "
        f"searcher states: {sorted(os.path.basename(p) for p in glob.glob(str(exp_dir / '*')))}; "
        f"resumed driver: {resumed.stdout[-1500:]}"
    )
    assert all(cache.contains(key) for key in pinned_after)
    records = {r.trial_id: r for r in final.engine.records}
    # Every observation from before the kill is still there, unchanged.
    for trial_id, objective in _completed(before).items():
        assert records[trial_id].objective == pytest.approx(objective)
    # The budget carried over: the resumed search stopped at BUDGET in total,
    # not at BUDGET spent after the restart.
    assert final.budget_spent >= BUDGET
    assert final.budget_spent - spent_before < BUDGET
    assert final.budget_spent == pytest.approx(sum(r.charged_cost or 0.0 for r in records.values()))
    for r in records.values():
        if r.objective is not None:
            assert r.objective == pytest.approx(synthetic_objective(pipeline.nest_config(r.config)))
