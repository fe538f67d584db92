"""BudgetProgress, the live progress of ``eeipu-ray run``, on the trials Tune hands
its callbacks: what each kind of ending prints and what the sweep line counts.
(The sweeps in tests/test_cli.py, tests/cli/test_resume.py and
tests/cli/test_schedulers.py check its lines under a real Tuner.)"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import pytest
from ray.tune.experiment import Trial

from eeipu_ray.tune.progress import BudgetProgress


def _trial(trial_id: str, status: str, **result: Any) -> Any:
    return SimpleNamespace(
        trial_id=trial_id,
        status=status,
        last_result=result,
        is_finished=lambda: status in (Trial.TERMINATED, Trial.ERROR),
    )


def test_lines_of_finished_failed_stopped_and_errored_trials() -> None:
    out = io.StringIO()
    progress = BudgetProgress("loss", "min", budget=10.0, out=out)
    done = _trial("aaa", Trial.TERMINATED, loss=0.5, memoized_stages=0, total_cost=2.0)
    memoized = _trial("bbb", Trial.RUNNING, loss=0.25, memoized_stages=2, total_cost=0.5)
    trials = [done, memoized, _trial("ccc", Trial.RUNNING, loss=9.0)]
    # Tune calls on_trial_complete before it marks the trial terminated.
    progress.on_trial_complete(0, trials, memoized)
    failed = _trial("ddd", Trial.RUNNING, loss=float("nan"), stage_failed=1, total_cost=1.0)
    trials.append(failed)
    memoized.status = Trial.TERMINATED
    progress.on_trial_complete(0, trials, failed)
    stopped = _trial("eee", Trial.RUNNING, loss=0.1, training_iteration=3, total_cost=0.25)
    failed.status = Trial.TERMINATED
    trials.append(stopped)
    progress.on_trial_complete(0, trials, stopped)
    stopped.status = Trial.TERMINATED
    errored = _trial("fff", Trial.ERROR)
    trials.append(errored)
    progress.on_trial_error(0, trials, errored)
    lines = out.getvalue().splitlines()
    assert lines == [
        "trial bbb finished: loss 0.25, 2 stages memoized, cost 0.5 s",
        "[2 trials done: 1 memoized, 0 failed; 1 running] Cost: 2.5 s spent of 10 s (7.5 s left); "
        "best loss 0.25 (trial bbb)",
        "trial ddd failed, cost 1 s",
        "[3 trials done: 1 memoized, 1 failed; 1 running] Cost: 3.5 s spent of 10 s (6.5 s left); "
        "best loss 0.25 (trial bbb)",
        "trial eee ended after 3 results: loss 0.1, cost 0.25 s",
        "[4 trials done: 1 memoized, 1 failed; 1 running] Cost: 3.75 s spent of 10 s (6.25 s "
        "left); best loss 0.1 (trial eee)",
        "trial fff failed (error)",
        "[5 trials done: 1 memoized, 2 failed; 1 running] Cost: 3.75 s spent of 10 s (6.25 s "
        "left); best loss 0.1 (trial eee)",
    ]


def test_energy_units_and_no_budget() -> None:
    out = io.StringIO()
    progress = BudgetProgress("score", "max", cost="energy", out=out)
    trial = _trial("a1", Trial.RUNNING, score=3.0, memoized_stages=1, total_energy_joules=40.0)
    progress.on_trial_complete(0, [trial], trial)
    assert out.getvalue().splitlines() == [
        "trial a1 finished: score 3, 1 stage memoized, cost 40 J",
        "[1 trial done: 1 memoized, 0 failed; 0 running] Cost: 40 J spent (no budget); "
        "best score 3 (trial a1)",
    ]
    with pytest.raises(ValueError, match="mode"):
        BudgetProgress("score", "maximize")
