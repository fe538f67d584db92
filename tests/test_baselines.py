"""The MS_BO and LaMBO baselines of ``benchmarks/baselines.py``: real GPs, no mocks.

The searchers are driven directly (suggest -> on_trial_complete with the
synthetic objective) and, at the end, through a real Ray Tune run with the
prefix cache.
"""

from __future__ import annotations

import math
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ray import tune
from scipy import stats

import eeipu_ray.search.optimize as optimize_module
from eeipu_ray.cache import PrefixCache
from eeipu_ray.pipelines.stacking import build_pipeline as build_stacking
from eeipu_ray.pipelines.synthetic import build_pipeline, synthetic_objective, synthetic_stage_costs
from eeipu_ray.search import EngineOptions
from eeipu_ray.search.records import TrialStatus
from eeipu_ray.tune.searcher import EEIPUSearcher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import baselines  # noqa: E402
from baselines import (  # noqa: E402
    BaselineStateError,
    LaMBOSearcher,
    MSBOSearcher,
)

FAST = {"num_restarts": 2, "raw_samples": 64}
N_WARMUP = 10
SEARCHERS = [MSBOSearcher, LaMBOSearcher]


@pytest.fixture(scope="module")
def pipeline() -> Any:
    return build_pipeline()


def make(cls: type, pipeline: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("metric", "score")
    kwargs.setdefault("mode", "max")
    kwargs.setdefault("n_warmup", N_WARMUP)
    return cls(pipeline, **FAST, **kwargs)


def synthetic_result(config: dict[str, Any]) -> dict[str, Any]:
    """What a synthetic pipeline trial reports (flat keys), without running it."""
    result: dict[str, Any] = {"score": synthetic_objective(config), "memoized_stages": 0}
    for k, cost in enumerate(synthetic_stage_costs(config)):
        result[f"stage_costs/stage{k + 1}"] = cost
    return result


def drive(
    searcher: Any,
    n: int,
    report: Callable[[dict[str, Any]], dict[str, Any]] = synthetic_result,
    prefix: str = "t",
) -> list[dict[str, Any]]:
    """``n`` sequential trials: suggest, evaluate, complete. Returns the configs."""
    configs = []
    records = searcher.engine.records if isinstance(searcher, EEIPUSearcher) else searcher.records
    start = len(records)
    for i in range(start, start + n):
        config = searcher.suggest(f"{prefix}{i}")
        configs.append(config)
        searcher.on_trial_complete(f"{prefix}{i}", result=report(config))
    return configs


def upstream(config: dict[str, Any], pipeline: Any) -> list[dict[str, Any]]:
    return [config[s] for s in pipeline.stage_names[:-1]]


def spy_optimizer(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every acquisition optimization the baselines run: per call, the ranked
    candidates (``"ranked"``) and the raw samples it scored with their values
    (``"raw"``, in the optimizer's unit box)."""
    calls: list[dict[str, Any]] = []
    real_rank, real_score = baselines.rank_over_pool, optimize_module._evaluate

    def rank_spy(*args: Any, **kwargs: Any) -> Any:
        calls.append({})
        calls[-1]["ranked"] = real_rank(*args, **kwargs)
        return calls[-1]["ranked"]

    def score_spy(acqf: Any, X: torch.Tensor, batch_limit: int) -> torch.Tensor:
        values = real_score(acqf, X, batch_limit)  # the raw samples, scored once per call
        calls[-1]["raw"] = (X.squeeze(-2).clone(), values.clone())
        return values

    monkeypatch.setattr(baselines, "rank_over_pool", rank_spy)
    monkeypatch.setattr(optimize_module, "_evaluate", score_spy)
    return calls


def check_winner(call: dict[str, Any], acqf: Any, lower: torch.Tensor, width: torch.Tensor) -> Any:
    """The optimization ``call`` maximized ``acqf`` over the box ``lower + U * width``
    and its winner is at least as good as every raw sample it drew; returns the
    ranked candidates mapped into the cube.

    An invariant, not luck: L-BFGS-B only accepts steps that improve on its start (a
    failed line search restores the last iterate) and the best raw sample is always
    one of the restarts. The tolerance covers re-evaluation rounding (~1e-14) only.
    """
    ranked = call["ranked"]
    X_raw, raw_values = call["raw"]
    cube = [lower + c.x * width for c in ranked]  # what the searcher decodes, bit for bit
    with torch.no_grad():
        ours = acqf(torch.stack([cube[0], *(lower + X_raw * width)]).unsqueeze(-2))
    # The optimizer scored this acquisition (the same model) inside this box ...
    assert torch.allclose(ours[1:], raw_values, rtol=1e-9, atol=1e-12)
    # ... and its winner is never below its best raw sample.
    best_raw = float(raw_values[torch.isfinite(raw_values)].max())
    tol = 1e-9 * max(1.0, abs(best_raw))
    assert ranked[0].value >= best_raw - tol
    assert float(ours[0]) >= float(ours[1:].max()) - tol
    return cube


# ------------------------------------------------------------------ warm-up
@pytest.mark.parametrize("cls", SEARCHERS)
def test_warmup_is_ei_searchers_sobol_design(cls: type, pipeline: Any) -> None:
    ei = EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        acquisition="ei",
        options=EngineOptions(num_restarts=2, raw_samples=64, n_warmup=N_WARMUP, seed=3),
    )
    ours = make(cls, pipeline, seed=3)
    expected = drive(ei, N_WARMUP)
    got = drive(ours, N_WARMUP)
    assert got == expected  # exact floats: same Sobol points, same decoding
    assert [r.phase for r in ours.records] == ["warmup"] * N_WARMUP
    bo = ours.suggest("first-bo")
    assert ours.records[-1].phase == "bo"
    # From here on the methods differ. Kind (a): MS_BO's upstream is a seeded uniform
    # draw and LaMBO's first step is confined to a seeded arm (0.53 and 0.27 away from
    # EI's point in the cube); equal configs would need all seven floats equal.
    assert bo != ei.suggest("first-bo")


# -------------------------------------------------------------------- MS_BO
def test_msbo_draws_upstream_at_random_and_the_last_stage_by_ei(
    pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kind (b): the upstream is the seeded draw exactly, the last stage is the EI
    # optimizer's winner, never worse than the raw samples it drew (check_winner:
    # an invariant of the optimizer, not a comparison with points it never saw).
    searcher = make(MSBOSearcher, pipeline, seed=0)
    drive(searcher, N_WARMUP)
    space = searcher.space
    up = torch.zeros(space.dim, dtype=torch.bool)
    up[space.dims_of_prefix(space.n_stages - 1)] = True
    calls = spy_optimizer(monkeypatch)
    upstreams = []
    for step in range(6):
        acqf = searcher.log_ei()  # the model suggest uses: no new result in between
        config = searcher.suggest(f"bo{step}")
        assert len(calls) == step + 1  # one optimization per BO step
        draw = searcher.upstream_draw(step)
        # Upstream: exactly the step's uniform draw.
        assert upstream(config, pipeline) == upstream(space.from_unit(draw), pipeline)
        upstreams.append(draw[up])
        # Last stage: log-EI maximized with the upstream held at the draw; the
        # config is the winner, decoded as is (a fresh upstream: never a repeat).
        lower = torch.where(up, draw, torch.zeros_like(draw))
        width = (~up).to(draw)
        cube = check_winner(calls[-1], acqf, lower, width)
        assert config == space.from_unit(space.snap(cube[0]))
        searcher.on_trial_complete(f"bo{step}", result=synthetic_result(config))
    # Random upstreams: no two BO steps share one.
    assert len({tuple(u.tolist()) for u in upstreams}) == len(upstreams)


def test_msbo_upstream_draws_are_uniform(pipeline: Any) -> None:
    # Kind (a), deterministic: the draws come from torch's CPU generator with fixed
    # seeds (the same numbers on every machine), so the p-values are fixed too
    # (0.45 to 0.98 against the 0.01 threshold).
    searcher = make(MSBOSearcher, pipeline, seed=0)
    draws = torch.stack([searcher.upstream_draw(step) for step in range(400)])
    for i in searcher.space.dims_of_prefix(searcher.space.n_stages - 1):
        assert stats.kstest(draws[:, i].numpy(), "uniform").pvalue > 0.01


def test_msbo_is_reproducible_per_seed(pipeline: Any) -> None:
    a = drive(make(MSBOSearcher, pipeline, seed=5), N_WARMUP + 3)
    b = drive(make(MSBOSearcher, pipeline, seed=5), N_WARMUP + 3)
    assert a == b
    other = make(MSBOSearcher, pipeline, seed=6)
    assert (
        other.upstream_draw(0).tolist()
        != make(MSBOSearcher, pipeline, seed=5).upstream_draw(0).tolist()
    )


# -------------------------------------------------------------------- LaMBO
@pytest.fixture(scope="module")
def lambo_run(pipeline: Any) -> tuple[LaMBOSearcher, list[dict[str, Any]]]:
    """LaMBO, seed 0: 10 warm-up trials and 25 BO steps on the synthetic pipeline."""
    searcher = make(LaMBOSearcher, pipeline, seed=0)
    return searcher, drive(searcher, N_WARMUP + 25)


def test_lambo_tree_has_one_level_per_upstream_stage(pipeline: Any) -> None:
    searcher = make(LaMBOSearcher, pipeline)
    assert searcher.n_arms == 4
    assert [stage for stage, _ in searcher.levels] == [0, 1]
    boxes = [searcher.leaf_box(a) for a in range(searcher.n_arms)]
    # The leaves tile the upstream cube: halves of stage 1's and of stage 2's first dim.
    (i1, i2) = [dim for _, dim in searcher.levels]
    assert [(float(lo[i1]), float(hi[i1]), float(lo[i2]), float(hi[i2])) for lo, hi in boxes] == [
        (0.0, 0.5, 0.0, 0.5),
        (0.0, 0.5, 0.5, 1.0),
        (0.5, 1.0, 0.0, 0.5),
        (0.5, 1.0, 0.5, 1.0),
    ]
    last = searcher.space.dims_of_stage(2)
    for lo, hi in boxes:
        assert lo[last].tolist() == [0.0] * len(last) and hi[last].tolist() == [1.0] * len(last)


def test_lambo_stays_in_its_arm_and_reuses_the_upstream_prefix(
    lambo_run: tuple[LaMBOSearcher, list[dict[str, Any]]], pipeline: Any
) -> None:
    # Kind (a), deterministic: the tree levels h_t come from the seeded generator
    # alone (13 of seed 0's 25 steps must stay), and its arm draws switch arms 6-8
    # times for each of 3000 loss sequences tried (the GP's losses only tilt them);
    # the rest are structural checks.
    searcher, _ = lambo_run
    history = searcher.history
    assert len(history) == 25
    by_id = {r.trial_id: r for r in searcher.records}
    K = len(pipeline.stage_names)
    stays = [h for h in history if not h.switched]
    assert len(stays) > len(history) / 2, "LaMBO should stay in its arm most steps"
    assert any(h.switched for h in history[1:]), "LaMBO never switched arms"
    assert history[0].switched and history[0].kept_stages == 0
    ids = [r.trial_id for r in searcher.records]
    for h in history:
        config = by_id[h.trial_id].config
        lower, upper = searcher.leaf_box(h.arm)
        x = searcher.space.to_unit(config)
        assert bool(((x >= lower - 1e-12) & (x <= upper + 1e-12)).all()), "left its leaf"
        assert 0.0 <= h.loss <= 1.0
        if not h.switched:
            assert h.kept_stages == K - 1
        if h.kept_stages:
            source = by_id[h.source_trial].config
            assert ids.index(h.source_trial) < ids.index(h.trial_id)
            assert (
                upstream(config, pipeline)[: h.kept_stages]
                == upstream(source, pipeline)[: h.kept_stages]
            )
            # Same prefix key, so the trial loads the source's cached stages.
            depth = h.kept_stages
            assert (
                pipeline.prefix_keys(config)[depth - 1] == pipeline.prefix_keys(source)[depth - 1]
            )
    probs = searcher.arm_probabilities
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-9)


def test_lambo_bandit_moves_away_from_the_arms_that_lose(
    pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kind (a), deterministic: the losses are fixed per arm here (the GP's losses,
    # small and run-dependent, may all be 0), so the draws depend only on the seeded
    # generator; the losing half ends with 0.15 of the mass against 0.5 at the start.
    def loss(self: LaMBOSearcher, arm: int, x: torch.Tensor, step: int) -> float:
        return 1.0 if arm >= 2 else 0.0  # arms 2, 3: the upper half of stage 1's cut

    monkeypatch.setattr(LaMBOSearcher, "_arm_loss", loss)
    searcher = make(LaMBOSearcher, pipeline, seed=0)
    drive(searcher, N_WARMUP + 25)
    probs = searcher.arm_probabilities
    assert [h.loss for h in searcher.history] == [float(h.arm >= 2) for h in searcher.history]
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-9)
    assert float(probs[2:].sum()) < 0.25, probs  # from 0.5: the bandit learned


def test_lambo_maximizes_ei_inside_its_arm(pipeline: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Kind (b): each BO step's config is the EI optimizer's winner inside the arm's
    # box (kept stages fixed), never worse than the raw samples it drew
    # (check_winner); no claim on how good the configs turn out.
    searcher = make(LaMBOSearcher, pipeline, seed=0)
    drive(searcher, N_WARMUP)
    space = searcher.space
    calls = spy_optimizer(monkeypatch)
    for step in range(8):
        acqf = searcher.log_ei()  # the model suggest uses: no new result in between
        config = searcher.suggest(f"bo{step}")
        assert len(calls) == step + 1  # one optimization per BO step
        h = searcher.history[-1]
        lower, upper = searcher.leaf_box(h.arm)
        if h.kept_stages:
            dims = space.dims_of_prefix(h.kept_stages)
            source = next(r for r in searcher.records if r.trial_id == h.source_trial)
            lower[dims] = upper[dims] = source.x[dims]
        cube = check_winner(calls[-1], acqf, lower, upper - lower)
        # The config: the best candidate no earlier trial had (repeats are skipped;
        # if all repeat, a random point of the same box).
        tried = space.snap(torch.stack([r.x for r in searcher.records[:-1]]))
        fresh = [
            x
            for x in space.snap(torch.stack(cube))
            if not bool(((x - tried).abs() <= 1e-9).all(-1).any())
        ]
        if fresh:
            decoded = space.from_unit(fresh[0])
            for name in pipeline.stage_names[h.kept_stages :]:  # kept stages: copied verbatim
                assert config[name] == decoded[name]
        else:
            x = space.to_unit(config)
            assert bool(((x >= lower - 1e-12) & (x <= upper + 1e-12)).all())
        searcher.on_trial_complete(f"bo{step}", result=synthetic_result(config))


def test_no_config_is_suggested_twice(
    lambo_run: tuple[LaMBOSearcher, list[dict[str, Any]]],
) -> None:
    searcher, _ = lambo_run
    X = searcher.space.snap(torch.stack([r.x for r in searcher.records]))
    assert torch.unique(X, dim=0).shape[0] == X.shape[0]


# ---------------------------------------------------- shared lifecycle parts
@pytest.mark.parametrize("cls", SEARCHERS)
def test_save_restore_and_pickle_give_the_same_next_suggestion(
    cls: type, pipeline: Any, tmp_path: Path
) -> None:
    searcher = make(cls, pipeline, seed=1)
    drive(searcher, N_WARMUP + 3)
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["searcher.pkl"]  # no temp file left
    restored = make(cls, pipeline, seed=1)
    restored.restore(str(path))
    copied = pickle.loads(pickle.dumps(searcher))
    assert copied._model is None  # no fitted GP travels with the searcher
    expected = searcher.suggest("next")
    assert restored.suggest("next") == expected
    assert copied.suggest("next") == expected
    if cls is LaMBOSearcher:
        assert restored.history == searcher.history
        assert torch.equal(restored.arm_probabilities, searcher.arm_probabilities)
    other = MSBOSearcher if cls is LaMBOSearcher else LaMBOSearcher
    with pytest.raises(BaselineStateError, match="written by"):
        make(other, pipeline).restore(str(path))


@pytest.mark.parametrize("cls", SEARCHERS)
def test_failed_trials_are_recorded_not_fitted(cls: type, pipeline: Any) -> None:
    searcher = make(cls, pipeline, seed=2, n_warmup=6)
    outcomes: list[tuple[dict[str, Any] | None, bool]] = [
        ({"score": float("nan")}, False),
        ({"score": float("inf")}, False),
        ({"score": float("-inf")}, False),
        ({"total_cost": 1.0}, False),  # metric missing
        (None, True),  # errored trial
    ]
    for i, (result, error) in enumerate(outcomes):
        config = searcher.suggest(f"f{i}")
        assert isinstance(config, dict)
        searcher.on_trial_complete(f"f{i}", result=result, error=error)
        searcher.on_trial_complete(f"f{i}", result=result, error=error)  # idempotent
    searcher.on_trial_complete("never-suggested", result={"score": 1.0})  # ignored
    assert [r.status for r in searcher.records] == [TrialStatus.FAILED] * 5
    drive(searcher, 1)  # the 6th warm-up point: one completed trial
    searcher.suggest("still-warmup")  # fewer than 2 completed: no BO yet
    assert searcher.records[-1].phase == "warmup"
    searcher.on_trial_complete("still-warmup", result=None, error=True)
    drive(searcher, 1)  # second completed trial
    drive(searcher, 3)  # BO steps
    assert [r.phase for r in searcher.records][-3:] == ["bo"] * 3
    completed = [r for r in searcher.records if r.status is TrialStatus.COMPLETED]
    assert searcher._objective_model().train_inputs[0].shape[0] == len(completed)
    X = searcher.space.snap(torch.stack([r.x for r in searcher.records]))
    assert torch.unique(X, dim=0).shape[0] == X.shape[0]  # failed configs not retried


@pytest.mark.parametrize("cls", SEARCHERS)
def test_min_mode_mirrors_max_mode(cls: type, pipeline: Any) -> None:
    maximize = drive(make(cls, pipeline, seed=4), N_WARMUP + 2)

    def as_loss(config: dict[str, Any]) -> dict[str, Any]:
        result = synthetic_result(config)
        return {**result, "loss": -result.pop("score")}

    minimize = drive(make(cls, pipeline, seed=4, metric="loss", mode="min"), N_WARMUP + 2, as_loss)
    assert minimize == maximize


@pytest.mark.parametrize("cls", SEARCHERS)
def test_metric_and_mode_from_tune_config(cls: type, pipeline: Any) -> None:
    searcher = cls(pipeline, **FAST)
    with pytest.raises(BaselineStateError, match="metric and mode"):
        searcher.suggest("t0")
    assert searcher.set_search_properties("score", "max", {})
    assert isinstance(searcher.suggest("t0"), dict)


@pytest.mark.parametrize("cls", SEARCHERS)
def test_categorical_and_integer_dimensions(cls: type) -> None:
    stacking = build_stacking()
    searcher = cls(stacking, metric="score", mode="max", n_warmup=6, seed=0, **FAST)

    def fake_accuracy(config: dict[str, Any]) -> dict[str, Any]:
        data, base, meta = config["data"], config["base"], config["meta"]
        score = (
            (data["scaling"] == "quantile")
            + 0.01 * base["knn_k"]
            + math.log(base["boosting_lr"])
            - abs(math.log10(meta["C"]))
            + (meta["meta_input"] == "proba")
        )
        return {"score": float(score)}

    configs = drive(searcher, 6 + 4, fake_accuracy)
    space = stacking.search_space
    for config in configs:
        assert config["data"]["n_samples"] == space["data"]["n_samples"]  # constants filled
        for stage, params in space.items():
            for key, domain in params.items():
                value = config[stage][key]
                if hasattr(domain, "categories"):
                    assert value in domain.categories
                elif hasattr(domain, "lower"):
                    # Log domains decode through exp(log(bound)): the bound to 1 ulp.
                    assert domain.lower * (1 - 1e-12) <= value <= domain.upper * (1 + 1e-12)
        assert isinstance(config["base"]["knn_k"], int)
    X = searcher.space.snap(torch.stack([r.x for r in searcher.records]))
    assert torch.unique(X, dim=0).shape[0] == X.shape[0]
    if cls is LaMBOSearcher:
        dims = searcher.space.dims
        for _, i in searcher.levels:  # cuts fall on cell boundaries
            assert dims[i].kind == "categorical" or dims[i].is_grid
        for lower, upper in (searcher.leaf_box(a) for a in range(searcher.n_arms)):
            for _, i in searcher.levels:
                n = dims[i].n
                assert float(lower[i] * n) == pytest.approx(round(float(lower[i] * n)))
                assert float(upper[i] * n) == pytest.approx(round(float(upper[i] * n)))
        for h in searcher.history:
            lower, upper = searcher.leaf_box(h.arm)
            x = next(r.x for r in searcher.records if r.trial_id == h.trial_id)
            assert bool(((x >= lower) & (x <= upper)).all())


# ---------------------------------------------------------------- Ray Tune
@pytest.mark.slow
@pytest.mark.parametrize("cls", SEARCHERS)
def test_tune_run_with_the_prefix_cache(
    cls: type, pipeline: Any, ray_local: Any, tmp_path: Path
) -> None:
    # Kind (a), deterministic: one trial at a time, so when LaMBO stays in its arm
    # (seed 0's seeded tree levels force stays) the trial it copies has finished
    # and cached its prefix: the reuse does not hang on which trial finished first.
    cache = PrefixCache(tmp_path / "cache")
    searcher = cls(pipeline, metric="score", mode="max", n_warmup=4, seed=0, **FAST)
    grid = tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=14, max_concurrent_trials=1, reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="exp", verbose=0),
    ).fit()
    assert not any(r.error for r in grid)
    metrics = [r.metrics for r in grid]
    assert len(metrics) == 14
    for m, r in zip(metrics, grid, strict=True):  # memoized or not, the data is right
        assert m["score"] == pytest.approx(synthetic_objective(pipeline.nest_config(r.config)))
    if cls is LaMBOSearcher:
        assert any(m["memoized_stages"] > 0 for m in metrics), "LaMBO never reused a prefix"
