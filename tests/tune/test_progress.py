"""BudgetReporter: the budget line, its columns, and its searcher across Tuner's pickling."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray.cloudpickle as cloudpickle
from ray import tune

from eeipu_ray.pipelines import load_pipeline
from eeipu_ray.search import EngineOptions
from eeipu_ray.tune.progress import BudgetReporter, tuned_parameter_columns
from eeipu_ray.tune.searcher import EEIPUSearcher

FAST = EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20)


def _trial(total_cost: float, finished: bool = True, joules: float | None = None) -> Any:
    result = {"total_cost": total_cost}
    if joules is not None:
        result["total_energy_joules"] = joules
    return SimpleNamespace(last_result=result, is_finished=lambda: finished)


def test_budget_line_reads_the_searcher_and_survives_tuner_pickling(tmp_path: Path) -> None:
    pipeline = load_pipeline("synthetic")
    searcher = EEIPUSearcher(
        pipeline, metric="score", mode="max", budget=500.0, options=replace(FAST, n_warmup=3)
    )
    reporter = BudgetReporter("score", "max", searcher=searcher)
    assert (
        reporter.budget_line([]) == "Cost: 0 s spent of 500 s (500 s left); cost-cooling eta 1.000"
    )
    for i in range(4):  # warm-up, then one BO step
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result=pipeline.run(config).to_result("score"))
    spent = searcher.budget_spent
    # Kind (a), structural: four trials cost 4 x 16.35 units at most, and the BO
    # trial's positive cost lowers eta below 1 whatever config it was.
    assert 0 < spent < 500 and searcher.eta < 1.0
    line = reporter.budget_line([])
    assert f"{spent:.4g} s spent of 500 s ({500 - spent:.4g} s left)" in line
    assert f"eta {searcher.eta:.3f}" in line

    # Tuner keeps both in tuner.pkl (one pickle: one searcher again), and
    # Tuner.restore then restores the searcher's own checkpoint into it.
    pickled = cloudpickle.dumps({"search_alg": searcher, "progress_reporter": reporter})
    searcher.save(str(tmp_path / "searcher-state.pkl"))
    restored = cloudpickle.loads(pickled)
    restored["search_alg"].restore(str(tmp_path / "searcher-state.pkl"))
    assert restored["progress_reporter"].budget_line([]) == line


def test_without_a_searcher_the_trials_costs_are_summed() -> None:
    trials = [_trial(2.5, joules=40.0), _trial(1.0, joules=3.0), _trial(99.0, False, 900.0)]
    reporter = BudgetReporter("loss", "min", budget=100.0, cost="energy")
    assert reporter.budget_line(trials) == "Cost: 43 J spent of 100 J (57 J left)"
    assert BudgetReporter("loss", "min").budget_line(trials) == "Cost: 3.5 s spent (no budget)"
    with pytest.raises(ValueError, match="cost='watts'"):
        BudgetReporter("loss", "min", cost="watts")


def test_the_cost_unit_comes_from_the_searcher() -> None:
    searcher = EEIPUSearcher(
        load_pipeline("synthetic"),
        metric="score",
        mode="max",
        budget=50.0,
        options=replace(FAST, cost="energy"),
    )
    reporter = BudgetReporter("score", "max", searcher=searcher)
    assert reporter.budget_line([]).startswith("Cost: 0 J spent of 50 J")
    assert "total_energy_joules" in reporter._metric_columns


def test_reporter_columns_and_metric_from_tune_config() -> None:
    reporter = BudgetReporter("score", "max", budget=5.0)
    # Tune passes TuneConfig's metric and mode on: equal values are fine...
    reporter.setup(start_time=time.time(), total_samples=4, metric="score", mode="max")
    # ...different ones are refused, as Tune's own reporters do.
    with pytest.raises(ValueError, match="metric"):
        BudgetReporter("score", "max").set_search_properties("loss", None)
    with pytest.raises(ValueError, match="mode"):
        BudgetReporter("score", "maximize")
    out = io.StringIO()
    with redirect_stdout(out):
        reporter.report([], done=True)
    assert "Cost: 0 s spent of 5 s (5 s left)" in out.getvalue()


def test_tuned_parameter_columns_skip_constants_and_disambiguate() -> None:
    space = {
        "data": {"seed": 0, "noise": tune.choice([0.1, 0.3])},
        "model": {"seed": tune.randint(0, 9), "lr": tune.loguniform(1e-4, 1e-1)},
        "eval": {"seed": tune.randint(0, 9)},
    }
    assert tuned_parameter_columns(space) == {
        "data/noise": "noise",
        "model/seed": "model/seed",
        "model/lr": "lr",
        "eval/seed": "eval/seed",
    }
