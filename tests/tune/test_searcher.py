"""EEIPUSearcher through the Ray Tune lifecycle, on a real local Ray cluster."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from eeipu_ray.cache import PrefixCache
from eeipu_ray.pipelines import load_pipeline
from eeipu_ray.pipelines.synthetic import synthetic_objective
from eeipu_ray.search import EngineOptions
from eeipu_ray.search.records import TrialStatus
from eeipu_ray.tune.searcher import EEIPUSearcher, SearcherStateError

FAST = EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20)


def make_searcher(pipeline: Any, cache: PrefixCache | None, **kwargs: Any) -> EEIPUSearcher:
    """A searcher with ``FAST`` options; ``kwargs`` naming EngineOptions fields go there."""
    kwargs.setdefault("budget", 25.0)
    fields = {f.name for f in dataclasses.fields(EngineOptions)} - {"budget", "acquisition"}
    options = {name: kwargs.pop(name) for name in list(kwargs) if name in fields}
    options.setdefault("n_warmup", 4)
    return EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        cache=cache,
        options=replace(FAST, **options),
        **kwargs,
    )


def test_lifecycle_failures_are_charged_and_state_survives_restore(tmp_path: Path) -> None:
    pipeline = load_pipeline("synthetic")
    cache = PrefixCache(tmp_path / "cache")
    searcher = make_searcher(pipeline, cache, budget=1000.0)
    outcomes: list[tuple[dict[str, Any] | None, bool]] = [
        ({"score": float("nan"), "total_cost": 1.0}, False),
        ({"score": float("inf"), "total_cost": 1.0}, False),
        ({"score": float("-inf"), "total_cost": 1.0}, False),
        ({"total_cost": 1.0}, False),  # metric missing
        (None, True),  # errored trial: nothing reported
    ]
    for i, (result, error) in enumerate(outcomes):
        config = searcher.suggest(f"fail{i}")
        assert isinstance(config, dict)
        searcher.on_trial_complete(f"fail{i}", result=result, error=error)
        searcher.on_trial_complete(f"fail{i}", result=result, error=error)  # idempotent
    records = searcher.engine.records
    assert [r.status for r in records] == [TrialStatus.FAILED] * 5
    assert searcher.budget_spent == pytest.approx(4.0)  # charged although failed
    for i in range(4):  # real results: the pipeline run in-process
        config = searcher.suggest(f"ok{i}")
        assert isinstance(config, dict)
        searcher.on_trial_complete(f"ok{i}", result=pipeline.run(config, cache).to_result("score"))
    spent = searcher.budget_spent

    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    fresh = make_searcher(pipeline, cache, budget=1000.0)
    fresh.restore(str(path))
    assert fresh.budget_spent == pytest.approx(spent)
    assert [r.trial_id for r in fresh.engine.records] == [
        r.trial_id for r in searcher.engine.records
    ]
    # The decision log is part of the checkpoint.
    assert fresh.decisions == searcher.decisions
    assert [d.trial_id for d in fresh.decisions] == [r.trial_id for r in records] + [
        f"ok{i}" for i in range(4)
    ]
    nxt = fresh.suggest("after-restore")
    assert isinstance(nxt, dict) and set(nxt) == set(pipeline.stage_names)
    assert fresh.decisions[-1].trial_id == "after-restore"
    # No temp files left behind by the atomic save.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "searcher.pkl"]


def test_budget_ends_the_search_with_finished(tmp_path: Path) -> None:
    pipeline = load_pipeline("synthetic")
    searcher = make_searcher(pipeline, None, budget=3.0)
    n = 0
    while True:
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            break
        assert isinstance(config, dict)
        searcher.on_trial_complete(f"t{n}", result=pipeline.run(config).to_result("score"))
        n += 1
        assert n < 50
    assert searcher.budget_spent >= 3.0
    assert searcher.suggest("late") == Searcher.FINISHED


def test_tuner_sweep_spends_its_budget_exactly_and_reuses_prefixes(
    ray_local: Any, tmp_path: Path
) -> None:
    pipeline = load_pipeline("synthetic")
    cache = PrefixCache(tmp_path / "cache")
    searcher = make_searcher(pipeline, cache, budget=30.0)
    grid = tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="exp", verbose=0),
    ).fit()
    metrics = [r.metrics for r in grid]
    assert not any(r.error for r in grid)
    # The last trial was suggested while budget was left; together they pass it.
    assert sum(m["total_cost"] for m in metrics) >= 30.0
    assert any(m["memoized_stages"] > 0 for m in metrics), "EEIPU never reused a prefix"
    for m, r in zip(metrics, grid, strict=True):  # memoized or not, the data is right
        assert m["score"] == pytest.approx(synthetic_objective(pipeline.nest_config(r.config)))

    restored = make_searcher(pipeline, cache, budget=30.0)
    restored.restore_from_dir(str(tmp_path / "exp"))
    assert restored.budget_spent == pytest.approx(sum(m["total_cost"] for m in metrics))
    assert len(restored.engine.records) == len(metrics)
    assert {d.trial_id for d in restored.decisions} == {m["trial_id"] for m in metrics}
    assert restored.suggest("more") == Searcher.FINISHED
    # The searcher told the cache which prefixes to keep.
    assert cache.pinned() and cache.pinned() <= {e.key for e in cache.entries()}


def test_tune_run_with_concurrency_limiter_and_plain_space(ray_local: Any, tmp_path: Path) -> None:
    def objective(config: dict[str, Any]) -> None:
        tune.report({"loss": (config["x"] - 0.3) ** 2 + config["n"] * 0.01})

    space = {"x": tune.uniform(0.0, 1.0), "n": tune.randint(1, 5), "tag": "constant"}
    searcher = EEIPUSearcher(
        metric="loss",
        mode="min",
        space=space,
        acquisition="carbo",
        options=replace(FAST, n_warmup=3),
        points_to_evaluate=[{"x": 0.3, "n": 1, "tag": "constant"}],
    )
    analysis = tune.run(
        objective,
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=2),
        num_samples=7,
        reuse_actors=True,
        storage_path=str(tmp_path),
        verbose=0,
    )
    configs = [t.config for t in analysis.trials]
    assert len(configs) == 7
    assert {"x": 0.3, "n": 1, "tag": "constant"} in configs  # points_to_evaluate ran
    for c in configs:
        assert 0.0 <= c["x"] <= 1.0 and isinstance(c["n"], int) and 1 <= c["n"] < 5
        assert c["tag"] == "constant"
    assert all(t.last_result.get("loss") is not None for t in analysis.trials)


def test_parallel_suggestions_are_distinct_and_pending_prefixes_count() -> None:
    pipeline = load_pipeline("synthetic")
    searcher = make_searcher(pipeline, None, budget=1000.0, max_concurrent=4, n_warmup=4)
    for i in range(6):  # finish a warm-up so that BO steps follow
        config = searcher.suggest(f"w{i}")
        searcher.on_trial_complete(f"w{i}", result=pipeline.run(config).to_result("score"))
    pending = [searcher.suggest(f"p{i}") for i in range(4)]
    assert all(isinstance(c, dict) for c in pending)
    assert len({repr(sorted((s, sorted(v.items())) for s, v in c.items())) for c in pending}) == 4
    assert searcher.suggest("p4") is None  # at the concurrency limit: wait


def test_lookahead_refills_a_slot_with_a_proposal_computed_while_trials_ran(
    tmp_path: Path,
) -> None:
    pipeline = load_pipeline("synthetic")
    sequential = make_searcher(pipeline, None, budget=1000.0, max_concurrent=1)
    searcher = make_searcher(pipeline, None, budget=1000.0, max_concurrent=4, batch_size=1)
    for s in (sequential, searcher):
        for i in range(5):
            config = s.suggest(f"w{i}")
            s.on_trial_complete(f"w{i}", result=pipeline.run(config).to_result("score"))
    assert isinstance(sequential.suggest("p0"), dict)
    assert sequential._future is None  # one at a time: every proposal sees every result

    first = searcher.suggest("p0")
    assert isinstance(first, dict)
    assert searcher._future is not None  # the next proposal is being computed
    searcher.save(str(tmp_path / "ckpt.pkl"))  # waits for it, keeps it
    assert len(searcher._queue) == 1 and searcher._future is None
    ahead = searcher._queue[0]
    searcher.on_trial_complete("p0", result=pipeline.run(first).to_result("score"))
    second = searcher.suggest("p1")
    assert second == ahead.config
    assert searcher.engine.store["p1"].phase == "bo"
    restored = make_searcher(pipeline, None, budget=1000.0, max_concurrent=4)
    restored.restore(str(tmp_path / "ckpt.pkl"))
    assert [r.trial_id for r in restored.engine.records][-1] == "p0"


def test_a_batch_lookahead_fills_several_slots_from_one_optimization() -> None:
    pipeline = load_pipeline("synthetic")
    searcher = make_searcher(pipeline, None, budget=1000.0, max_concurrent=8, batch_size=4)
    for i in range(6):
        config = searcher.suggest(f"w{i}")
        searcher.on_trial_complete(f"w{i}", result=pipeline.run(config).to_result("score"))
    searcher._settle()  # BO began during the warm-up: start from an empty queue
    searcher._queue.clear()
    first = searcher.suggest("p0")  # computed now; then a batch of 4 in the background
    assert isinstance(first, dict)
    searcher._settle()
    queued = [p.config for p in searcher._queue]
    assert len(queued) == 4  # one optimization, four proposals
    # The next slots are filled from the queue, oldest first, without a new
    # optimization in between; every config is distinct.
    configs = [first] + [searcher.suggest(f"p{i}") for i in range(1, 5)]
    assert configs[1:] == queued
    keys = {repr(sorted((s, sorted(v.items())) for s, v in c.items())) for c in configs}
    assert len(keys) == 5
    assert [searcher.engine.store[f"p{i}"].phase for i in range(5)] == ["bo"] * 5
    # A queued proposal whose config a trial meanwhile had is dropped, not reused.
    searcher._settle()
    taken = searcher._queue[0]
    searcher.engine.register("outside", taken.config)
    assert searcher.suggest("p5") != taken.config


def test_suggest_waits_while_running_trials_are_expected_to_spend_the_budget() -> None:
    from ray.tune.search import Searcher

    pipeline = load_pipeline("synthetic")
    searcher = make_searcher(pipeline, None, budget=30.0, max_concurrent=16, lookahead=False)
    for i in range(2):
        config = searcher.suggest(f"w{i}")
        searcher.on_trial_complete(f"w{i}", result=pipeline.run(config).to_result("score"))
    running: dict[str, Any] = {}
    while (config := searcher.suggest(f"r{len(running)}")) is not None:
        assert config != Searcher.FINISHED
        running[f"r{len(running)}"] = config
    engine = searcher.engine
    assert engine.budget_left > 0 and engine.budget_committed >= 30.0
    assert len(running) < 16  # the budget, not the concurrency limit, said wait
    # The stopping rule, exactly (not what the BO configs happen to cost): each
    # running trial is expected to cost the mean of the two finished ones, and a
    # new one started only while spent + expected < budget.
    spent = searcher.budget_spent
    mean = spent / 2
    n = len(running)
    assert spent + (n - 1) * mean < 30.0 <= spent + n * mean
    assert engine.budget_committed == pytest.approx(spent + n * mean)
    for trial_id, config in running.items():
        searcher.on_trial_complete(trial_id, result=pipeline.run(config).to_result("score"))
    assert searcher.budget_spent == pytest.approx(
        spent + sum(r.charged_cost for r in engine.records if r.trial_id in running)
    )


def test_auto_batch_size_follows_trial_durations_and_compute_time() -> None:
    from eeipu_ray.tune.searcher import _Timing

    timing = _Timing()
    assert timing.demand(running=64) == 1  # nothing measured yet
    timing.batch_seconds = 0.5
    timing._durations.extend([10.0, 12.0, 8.0])  # median 10 s
    # 64 trials of 10 s free 6.4 slots a second: 3.2 while a 0.5 s batch
    # computes; twice that, as a margin, plus one.
    assert timing.demand(running=64) == 8
    assert timing.demand(running=4) == 2
    timing.batch_seconds = 0.01
    assert timing.demand(running=4) == 2  # at least one more than what frees up
    with pytest.raises(ValueError, match="batch_size"):
        EEIPUSearcher(pipeline=load_pipeline("synthetic"), options=EngineOptions(batch_size=0))


def test_add_evaluated_point_and_errors_name_the_problem() -> None:
    pipeline = load_pipeline("synthetic")
    searcher = make_searcher(pipeline, None)
    config = pipeline.nest_config(
        {
            "stage1": {"x1": 0.0, "x2": 0.0},
            "stage2": {"x1": 0.0, "x2": 0.0, "x3": 0.0},
            "stage3": {"x1": 3.0, "x2": 3.0},
        }
    )
    searcher.add_evaluated_point(config, -15.0)
    assert searcher.engine.records[0].objective == pytest.approx(-15.0)
    assert math.isfinite(searcher.engine.records[0].objective)

    no_space = EEIPUSearcher(metric="score", mode="max")
    with pytest.raises(SearcherStateError, match="param_space"):
        no_space.suggest("t0")
    with pytest.raises(SearcherStateError, match="either a pipeline or a space"):
        EEIPUSearcher(pipeline, space={"x": tune.uniform(0, 1)})
    with pytest.raises(ValueError, match=r"'x': grid_search is not supported"):
        EEIPUSearcher(metric="m", mode="max", space={"x": tune.grid_search([1, 2])})


def test_searcher_pickles_without_fitted_models(tmp_path: Path) -> None:
    import pickle

    pipeline = load_pipeline("synthetic")
    searcher = make_searcher(pipeline, PrefixCache(tmp_path / "c"), budget=1000.0)
    for i in range(6):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result=pipeline.run(config).to_result("score"))
    copy = pickle.loads(pickle.dumps(searcher))
    assert copy.budget_spent == pytest.approx(searcher.budget_spent)
    assert isinstance(copy.suggest("t-next"), dict)
    assert os.path.isdir(tmp_path / "c")


def test_add_evaluated_points_with_full_results_teaches_costs() -> None:
    pipeline = load_pipeline("synthetic")
    donor = make_searcher(pipeline, None, budget=1000.0)
    points = []
    for i in range(5):
        config = donor.suggest(f"d{i}")
        points.append((config, pipeline.run(config).to_result("score")))
    searcher = make_searcher(pipeline, None, budget=1000.0)
    searcher.add_evaluated_points([*points, (points[0][0], -99.0)])
    records = searcher.engine.records
    assert len(records) == 6
    assert records[0].compute_costs == pytest.approx(
        [points[0][1][f"compute_costs/{s}"] for s in pipeline.stage_names]
    )
    assert records[-1].objective == pytest.approx(-99.0)
    assert searcher.budget_spent == pytest.approx(sum(r["total_cost"] for _, r in points))


def test_an_errored_trial_is_charged_what_it_last_reported_spending() -> None:
    pipeline = load_pipeline("synthetic")
    searcher = make_searcher(pipeline, None, budget=1000.0)
    config = searcher.suggest("t0")
    assert isinstance(config, dict)
    spent = {"total_cost": 2.5, "stage_costs/stage1": 2.0, "stage_costs/stage2": 0.5}
    # What the trainable reports when a stage raises, then Tune's error call.
    searcher.on_trial_result("t0", {**spent, "score": float("nan"), "stage_failed": 1})
    searcher.on_trial_complete("t0", error=True)
    record = searcher.engine.store["t0"]
    assert record.status is TrialStatus.FAILED and record.objective is None
    assert record.charged_cost == pytest.approx(2.5)
    assert searcher.budget_spent == pytest.approx(2.5)
    # Without a report, an errored trial is charged nothing (nothing is known).
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", error=True)
    assert searcher.budget_spent == pytest.approx(2.5)
