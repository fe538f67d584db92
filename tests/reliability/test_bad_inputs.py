"""Bad inputs, tried property-based: search spaces, configs, results, cache URLs.

The invariant everywhere: an invalid input ends in an error of the project's own
types (:class:`eeipu_ray.errors.EEIPUError` subclasses) whose message names the
culprit (stage, key, value), never in a raw ``TypeError``/``ValueError`` from
deep inside BoTorch, torch, NumPy, pyarrow or fsspec; a valid input never raises.
Where the behaviour for NaN, infinite or missing metrics and costs is documented
(``eeipu_ray/search/records.py``, ``eeipu_ray/result.py``, docs/usage.md), it is asserted
exactly: a failed trial is charged what it spent and never fitted.

Everything runs on real parts: real Ray Tune domains, real pipelines run by the
memoized runner, the real engine fitting real GPs, real caches on a temporary
directory and on the loopback moto S3 server.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import PrefixCache
from eeipu_ray.errors import (
    CacheConfigError,
    CacheError,
    CacheStorageError,
    ConfigError,
    EEIPUError,
    PipelineDefinitionError,
    PrefixKeyError,
    StageExecutionError,
)
from eeipu_ray.search import (
    AcquisitionWarning,
    BOEngine,
    EngineOptions,
    SearchSpace,
    SearchSpaceError,
    TrialResultError,
    TrialStateError,
    TrialStatus,
)
from eeipu_ray.tune.searcher import EEIPUSearcher, SearcherOptionsError
from tests.cache.test_prefix_cache import entry_for

# The suite draws the same examples on every run (derandomize): CI is
# reproducible. EEIPU_HYPOTHESIS_EXAMPLES=N explores N random examples a test.
EXPLORE = os.environ.get("EEIPU_HYPOTHESIS_EXAMPLES")
settings.register_profile(
    "reliability",
    max_examples=int(EXPLORE or 25),
    derandomize=EXPLORE is None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROFILE = settings.get_profile("reliability")


def assert_names(exc: BaseException, *culprits: str) -> None:
    """``exc`` is one of the project's errors and its message names every culprit."""
    assert isinstance(exc, EEIPUError), f"{type(exc).__name__} is no EEIPUError: {exc}"
    message = str(exc)
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not named in: {message}"


# Values a config, a result or an option could hold by mistake.
GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(-float("inf")),
    st.integers(min_value=10**310, max_value=10**320),  # beyond the float range
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(1 + 2j),
    st.just(np.arange(3.0)),
    st.just(object()),
)


# ====================================================================== spaces
@st.composite
def valid_domains(draw: st.DrawFn) -> Any:
    """A bounded Ray Tune domain of any kind the encoder supports."""
    kind = draw(
        st.sampled_from(
            ["uniform", "loguniform", "quniform", "randint", "qrandint", "lograndint", "choice"]
        )
    )
    if kind == "uniform":
        lower = draw(st.floats(-1e6, 1e6))
        return tune.uniform(lower, lower + draw(st.floats(0.0, 1e6)))
    if kind == "loguniform":
        lower = draw(st.floats(1e-6, 1e3))
        return tune.loguniform(lower, lower * draw(st.floats(1.001, 1e6)))
    if kind == "quniform":
        q = draw(st.sampled_from([0.001, 0.1, 0.25, 0.5, 3.0]))
        lower = q * draw(st.integers(-100, 100))
        return tune.quniform(lower, lower + q * draw(st.integers(1, 50)), q)
    if kind == "randint":
        lower = draw(st.integers(-1000, 1000))
        return tune.randint(lower, lower + draw(st.integers(1, 1000)))
    if kind == "qrandint":
        q = draw(st.integers(1, 10))
        lower = q * draw(st.integers(-100, 100))
        return tune.qrandint(lower, lower + q * draw(st.integers(1, 20)), q)
    if kind == "lograndint":
        lower = draw(st.integers(1, 1000))
        return tune.lograndint(lower, lower + draw(st.integers(1, 1000)))
    options = st.one_of(
        st.integers(-5, 5), st.text(max_size=4), st.floats(-10, 10), st.none(), st.booleans()
    )
    return tune.choice(draw(st.lists(options, min_size=1, max_size=5, unique_by=repr)))


def _identity(_: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"score": 0.0}


@PROFILE
@given(domain=valid_domains(), u=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4))
def test_every_config_the_engine_decodes_runs_through_the_pipeline(domain: Any, u: list) -> None:
    """Valid spaces never raise, and every config decoded from the cube fits the
    pipeline's own validation (the trial never refuses what the searcher proposes)."""
    pipeline = Pipeline("p", [Stage("only", _identity, {"k": domain, "c": "constant"})])
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    for coordinate in u:
        config = space.from_unit([coordinate])
        assert pipeline.check_config(config) == [config["only"]]
        x = space.to_unit(config)
        assert 0.0 <= float(x[0]) <= 1.0
        if space.dims[0].kind != "float" or space.dims[0].is_grid:
            assert space.from_unit(x) == config  # grids and choices round-trip exactly


@pytest.mark.parametrize(
    ("domain", "words"),
    [
        (tune.grid_search([1, 2]), "grid_search"),
        (tune.sample_from(lambda _: 1), "sample_from"),
        (tune.randn(0, 1), "unbounded"),
        (tune.choice([]), "at least one"),
        (tune.randint(5, 1), "lower <= upper"),
        (tune.uniform(-1.7e308, 1.7e308), "too far apart"),
        ({"nested": tune.uniform(0, 1)}, "nested"),
    ],
    ids=["grid", "sample_from", "randn", "empty-choice", "reversed", "too-wide", "nested"],
)
def test_searcher_refuses_a_stage_space_it_cannot_encode(domain: Any, words: str) -> None:
    """A stage declares a domain BO cannot use: the searcher says which stage/key."""
    pipeline = Pipeline(
        "p",
        [
            Stage("prep", _identity, {"n": tune.randint(1, 5)}),
            Stage("train", _identity, {"bad": domain}),
        ],
    )
    with pytest.raises(SearchSpaceError) as info:
        EEIPUSearcher(pipeline, metric="score", mode="max")
    assert_names(info.value, "train/bad", words)


@PROFILE
@given(name=st.one_of(st.text(max_size=12), GARBAGE))
def test_stage_and_hyperparameter_names_are_checked(name: Any) -> None:
    """Any stage name or hyperparameter name: a valid Stage or a
    PipelineDefinitionError naming it."""
    for build in (
        lambda: Stage(name, _identity),
        lambda: Stage("s", _identity, {name: tune.uniform(0, 1)}),
        lambda: Pipeline(name, [Stage("s", _identity)]),
    ):
        try:
            build()
        except PipelineDefinitionError as exc:
            assert_names(exc, repr(name)[:40])
        except TypeError:
            assume(False)  # an unhashable name cannot even be a dict key: Python's own refusal


@PROFILE
@given(value=GARBAGE)
def test_to_unit_refuses_garbage_naming_stage_and_key(value: Any) -> None:
    space = SearchSpace.from_tune(
        {"a": {"x": tune.uniform(0, 1), "i": tune.randint(0, 5), "c": tune.choice(["u", "v"])}}
    )
    for key in ("x", "i", "c"):
        config = {"a": {"x": 0.5, "i": 1, "c": "u", key: value}}
        with pytest.raises(SearchSpaceError) as info:
            space.to_unit(config)
        assert_names(info.value, f"a/{key}")


@pytest.mark.parametrize(
    "point",
    ["abc", None, ["a", "b"], [0.5], object()],
    ids=lambda p: "object()" if type(p) is object else repr(p),  # no address in the id
)
def test_from_unit_refuses_garbage(point: Any) -> None:
    space = SearchSpace.from_tune({"a": {"x": tune.uniform(0, 1), "y": tune.uniform(0, 1)}})
    with pytest.raises(SearchSpaceError):
        space.from_unit(point)


# ===================================================================== configs
class Calls:
    """Which stages a pipeline run executed (a refused config runs none)."""

    def __init__(self) -> None:
        self.stages: list[str] = []


def config_pipeline(calls: Calls) -> Pipeline:
    def prep(_: Any, p: Mapping[str, Any]) -> np.ndarray:
        calls.stages.append("prep")
        return np.arange(int(p["n"]), dtype=np.float64) * float(p["scale"])

    def train(data: np.ndarray, p: Mapping[str, Any]) -> dict[str, float]:
        calls.stages.append("train")
        return {"score": float(data.mean()) * float(p["lr"]) + int(p["steps"]) + float(p["q"])}

    return Pipeline(
        "cfg",
        [
            Stage(
                "prep",
                prep,
                {
                    "n": tune.randint(2, 20),
                    "scale": tune.uniform(0.5, 2.0),
                    "mode": tune.choice(["a", "b"]),
                    "seed": 0,
                },
            ),
            Stage(
                "train",
                train,
                {
                    "lr": tune.loguniform(1e-3, 1.0),
                    "steps": tune.qrandint(3, 12, 3),
                    "q": tune.quniform(0.0, 1.0, 0.25),
                },
            ),
        ],
    )


VALID = {"prep": {"n": 5, "scale": 1.0, "mode": "a"}, "train": {"lr": 0.1, "steps": 6, "q": 0.5}}
NUMERIC = {
    ("prep", "n"): (2, 20, True),
    ("prep", "scale"): (0.5, 2.0, False),
    ("train", "lr"): (1e-3, 1.0, False),
    ("train", "steps"): (3, 12, True),
    ("train", "q"): (0.0, 1.0, False),
}


def _run(pipeline: Pipeline, config: Any, tmp_path: Path) -> Any:
    return pipeline.run(config, None, trial_dir=tmp_path / "trial", meter=None)


@PROFILE
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 10),
)
def test_valid_configs_never_raise(tmp_path: Path, seed: int, n: int) -> None:
    """Configs the searcher could propose (nested or flat, NumPy scalars) all run."""
    calls = Calls()
    pipeline = config_pipeline(calls)
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    config = space.from_unit(space.sample(1, seed=seed)[0])
    if n % 3 == 1:  # the flat form Tune may hand over
        config = {f"{s}/{k}": v for s, sub in config.items() for k, v in sub.items()}
    elif n % 3 == 2:  # NumPy scalars from another searcher
        config = {
            s: {k: np.float64(v) if isinstance(v, float) else v for k, v in sub.items()}
            for s, sub in config.items()
        }
    run = _run(pipeline, config, tmp_path)
    assert math.isfinite(run.to_result("score")["score"])
    assert calls.stages == ["prep", "train"]


@st.composite
def bad_configs(
    draw: st.DrawFn, mistakes: tuple[str, ...]
) -> tuple[dict[str, Any], tuple[str, ...], str]:
    """A config with exactly one mistake (one of ``mistakes``), the words its
    error must name, and the kind of mistake."""
    config = {s: dict(sub) for s, sub in VALID.items()}
    mistake = draw(st.sampled_from(mistakes))
    if mistake == "missing_stage":
        stage = draw(st.sampled_from(["prep", "train"]))
        del config[stage]
        return config, (f"{stage}/",), mistake
    if mistake == "missing_key":
        stage, key = draw(st.sampled_from([("prep", "n"), ("prep", "mode"), ("train", "lr")]))
        del config[stage][key]
        return config, (f"{stage}/{key}",), mistake
    if mistake == "unknown_key":
        key = draw(st.text("abcxyz_", min_size=1, max_size=6).filter(lambda k: k not in "nlr"))
        assume(key not in config["prep"] and key != "seed")
        config["prep"][key] = 1
        return config, ("prep", repr(key)), mistake
    if mistake == "unknown_stage":
        stage = draw(st.text("abcxyz", min_size=1, max_size=6))
        assume(stage not in config)
        config[stage] = {"x": 1}
        return config, (repr(stage),), mistake
    if mistake == "not_mapping":
        config["train"] = draw(GARBAGE.filter(lambda v: not isinstance(v, Mapping)))
        return config, ("train",), mistake
    if mistake == "garbage":
        stage, key = draw(st.sampled_from(sorted(NUMERIC)))
        value = draw(
            GARBAGE.filter(
                lambda v: (
                    not (isinstance(v, int | float) and not isinstance(v, bool))
                    or not math.isfinite(v)
                    if isinstance(v, float)
                    else not isinstance(v, int) or isinstance(v, bool) or abs(v) > 10**300
                )
            )
        )
        config[stage][key] = value
        return config, (f"{stage}/{key}",), mistake
    if mistake == "out_of_bounds":
        stage, key = draw(st.sampled_from(sorted(NUMERIC)))
        lower, upper, integral = NUMERIC[(stage, key)]
        if integral:
            value: Any = draw(
                st.one_of(st.integers(max_value=lower - 1), st.integers(min_value=upper + 1))
            )
        else:
            value = draw(
                st.one_of(
                    st.floats(max_value=lower - 1e-3, allow_infinity=False),
                    st.floats(min_value=upper + 1e-3, allow_infinity=False),
                )
            )
        config[stage][key] = value
        return config, (f"{stage}/{key}", "bounds"), mistake
    if mistake == "not_integer":
        stage, key = draw(st.sampled_from([("prep", "n"), ("train", "steps")]))
        config[stage][key] = draw(st.floats(3.1, 11.9).filter(lambda v: not v.is_integer()))
        return config, (f"{stage}/{key}", "integer"), mistake
    if mistake == "not_a_choice":
        value = draw(st.one_of(st.text(max_size=3), st.integers(), st.none()))
        assume(value not in ("a", "b"))
        config["prep"]["mode"] = value
        return config, ("prep/mode", "choice"), mistake
    # A NaN constant cannot be keyed: named by the prefix-key code.
    config["prep"]["seed"] = float("nan")
    return config, ("'prep'", "'seed'", "NaN"), mistake


OUT_OF_DOMAIN = ("out_of_bounds", "not_a_choice")
WRONG = (
    "missing_stage",
    "missing_key",
    "unknown_key",
    "unknown_stage",
    "not_mapping",
    "garbage",
    "not_integer",
    "nan_constant",
)


@PROFILE
@given(case=bad_configs(WRONG))
def test_bad_configs_are_refused_naming_the_culprit_before_any_stage_runs(
    tmp_path: Path, case: tuple[dict[str, Any], tuple[str, ...], str]
) -> None:
    config, culprits, _ = case
    calls = Calls()
    with pytest.raises(EEIPUError) as info:
        _run(config_pipeline(calls), config, tmp_path)
    assert isinstance(info.value, ConfigError | PrefixKeyError)
    assert_names(info.value, *culprits)
    assert calls.stages == []  # refused up front: no stage ran, nothing was charged


@PROFILE
@given(case=bad_configs(OUT_OF_DOMAIN))
def test_values_outside_the_declared_space_run_but_fail_check_config(
    tmp_path: Path, case: tuple[dict[str, Any], tuple[str, ...], str]
) -> None:
    """A Tune ``param_space`` may override a stage's declared space: the runner
    runs values of the right kind outside its bounds or categories (and the
    stages get them as given), while ``check_config`` -- what the searcher
    applies to its ``points_to_evaluate`` -- refuses them, naming the culprit."""
    config, culprits, _ = case
    with pytest.raises(ConfigError) as info:
        config_pipeline(Calls()).check_config(config)
    assert_names(info.value, *culprits)
    calls = Calls()
    try:
        _run(config_pipeline(calls), config, tmp_path)
    except ConfigError as exc:
        pytest.fail(f"the runner refused a value of the right kind: {exc}")
    except StageExecutionError as exc:  # the stage's own failure on that value
        assert calls.stages and calls.stages[-1] in str(exc)
        return
    assert calls.stages == ["prep", "train"]


def test_points_to_evaluate_are_checked_when_the_searcher_is_built() -> None:
    pipeline = config_pipeline(Calls())
    bad = {**VALID, "train": {**VALID["train"], "lr": 5.0}}
    with pytest.raises(ConfigError) as info:
        EEIPUSearcher(pipeline, metric="score", mode="max", points_to_evaluate=[VALID, bad])
    assert_names(info.value, "points_to_evaluate[1]", "train/lr", "5.0")
    with pytest.raises(ConfigError) as info:
        EEIPUSearcher(pipeline, metric="score", mode="max", points_to_evaluate=[3])
    assert_names(info.value, "points_to_evaluate[0]", "int")


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"max_concurrent": -1}, "max_concurrent=-1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"cost": "money"}, "cost='money'"),
        ({"mode": "up"}, "mode='up'"),
        ({"budget": float("nan")}, "budget=nan"),
        ({"budget": -3.0}, "budget=-3.0"),
        ({"n_warmup": 0}, "n_warmup=0"),
        ({"acquisition": "magic"}, "acquisition='magic'"),
    ],
)
def test_searcher_options_are_refused_naming_them(kwargs: dict[str, Any], culprit: str) -> None:
    args: dict[str, Any] = {"metric": "score", "mode": "max", **kwargs}
    with pytest.raises(EEIPUError) as info:
        if set(kwargs) <= {"batch_size", "cost", "n_warmup"}:  # EngineOptions fields
            EEIPUSearcher(config_pipeline(Calls()), options=EngineOptions(**kwargs))
        else:
            EEIPUSearcher(config_pipeline(Calls()), **args)
    assert_names(info.value, culprit)
    if "max_concurrent" in kwargs:
        assert isinstance(info.value, SearcherOptionsError | ValueError)


# ===================================================================== results
STAGES = ("prep", "train")


def small_engine(acquisition: str = "eeipu", mode: str = "max", **extra: Any) -> BOEngine:
    space = SearchSpace.from_tune(
        {"prep": {"x": tune.uniform(0, 1)}, "train": {"y": tune.uniform(0, 1)}},
        stage_order=STAGES,
    )
    options = EngineOptions(
        acquisition=acquisition,
        mode=mode,
        budget=None,
        n_warmup=2,
        num_restarts=2,
        raw_samples=16,
        maxiter=5,
        mc_samples=16,
        fit_maxiter_cold=20,
        fit_maxiter_warm=5,
        **extra,
    )
    return BOEngine(space, options)


METRIC_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**320), max_value=10**320),
    GARBAGE,
)
COST_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), GARBAGE)
MISSING = object()


def _valid_metric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range: not finite
        return None
    return number if math.isfinite(number) else None


def _valid_cost(value: Any) -> float | None:
    number = _valid_metric(value)  # a cost is a valid metric that is not negative
    return number if number is not None and number >= 0 else None


@PROFILE
@given(
    metric=st.one_of(st.just(MISSING), METRIC_VALUES),
    costs=st.lists(st.one_of(st.just(MISSING), COST_VALUES), min_size=2, max_size=2),
    mode=st.sampled_from(["max", "min"]),
)
def test_results_are_recorded_as_documented(
    metric: Any, costs: list[Any], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Any metric and stage costs: a finite metric completes the trial (flipped once
    for ``min``), anything else fails it; valid costs (finite, >= 0) are charged
    and learned, invalid ones neither, with a warning naming trial, key and value."""
    engine = small_engine(mode=mode)
    engine.suggest("t0")
    result: dict[str, Any] = {}
    if metric is not MISSING:
        result["score"] = metric
    for stage, cost in zip(STAGES, costs, strict=True):
        if cost is not MISSING:
            result[f"stage_costs/{stage}"] = cost
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eeipu_ray.search.records"):
        engine.on_result("t0", result)
    record = engine.store["t0"]

    expected = _valid_metric(metric) if metric is not MISSING else None
    if expected is None:
        assert record.status is TrialStatus.FAILED and record.objective is None
        assert "score" in (record.error or "")
        assert engine.store.train_xy()[0].shape[0] == 0  # a failure is never fitted
    else:
        assert record.status is TrialStatus.COMPLETED
        assert record.objective == (expected if mode == "max" else -expected)
    valid = [_valid_cost(c) if c is not MISSING else None for c in costs]
    assert record.stage_costs == valid
    assert record.compute_costs == valid  # executed stages: spent = compute cost
    assert record.charged_cost == math.fsum(c for c in valid if c is not None)
    assert engine.budget_spent == record.charged_cost
    for stage, cost, ok in zip(STAGES, costs, valid, strict=True):
        if cost is not MISSING and cost is not None and ok is None:
            assert any(
                f"stage_costs/{stage}" in r.getMessage() and "t0" in r.getMessage()
                for r in caplog.records
            ), caplog.text
    # Idempotent: a second completion changes nothing.
    engine.on_result("t0", {"score": 1.0, "stage_costs/prep": 99.0})
    assert engine.store["t0"].charged_cost == record.charged_cost


@PROFILE
@given(result=GARBAGE.filter(lambda v: v is not None and not isinstance(v, Mapping)))
def test_a_result_that_is_no_mapping_is_refused_and_the_trial_stays_pending(result: Any) -> None:
    engine = small_engine()
    engine.suggest("t0")
    with pytest.raises(TrialResultError) as info:
        engine.on_result("t0", result)
    assert_names(info.value, "'t0'", type(result).__name__)
    assert engine.store["t0"].status is TrialStatus.PENDING


@pytest.mark.parametrize("trial_id", [0, None, b"t", "", ("t",)], ids=repr)
def test_trial_ids_must_be_strings(trial_id: Any) -> None:
    engine = small_engine()
    with pytest.raises(TrialStateError) as info:
        engine.suggest(trial_id)
    assert_names(info.value, repr(trial_id))
    assert len(engine.store) == 0


@pytest.mark.filterwarnings("ignore::eeipu_ray.errors.EEIPUWarning")
@pytest.mark.parametrize("warping", ["power", "none"])
@pytest.mark.parametrize("acquisition", ["eeipu", "ei", "eips", "carbo"])
def test_extreme_but_finite_results_never_crash_a_bo_step(acquisition: str, warping: str) -> None:
    """Metrics near the float limits and costs from 1e-320 to 1e308 are valid: the
    engine proposes a config every time, and the budget adds up to ``inf``, not an
    OverflowError. Unwarped, the GP's numbers overflow and the step proposes a
    random config with an AcquisitionWarning; the default warping rescales the
    metrics first (keeping their order), so the GP has finite numbers to fit."""
    engine = small_engine(acquisition, objective_warping=warping)
    outcomes = [
        (1e308, (1e-320, 1e300)),
        (-1e308, (1e300, 1e-320)),
        (0.0, (1e308, 1e308)),
        (1.0, (0.0, 0.0)),
    ]
    for i, (metric, (c1, c2)) in enumerate(outcomes):
        assert engine.suggest(f"t{i}") is not None
        engine.on_result(
            f"t{i}", {"score": metric, "stage_costs/prep": c1, "stage_costs/train": c2}
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(len(outcomes), len(outcomes) + 2):
            config = engine.suggest(f"t{i}")
            assert config is not None and set(config) == set(STAGES)
            engine.on_result(f"t{i}", {"score": 2.0, "stage_costs/prep": 1.0})
    assert engine.budget_spent == math.inf
    fallback = any(issubclass(w.category, AcquisitionWarning) for w in caught)
    if warping == "none":
        assert fallback  # the fallback is announced, never silent
    else:
        decisions = engine.decisions[len(outcomes) :]
        assert [d.phase for d in decisions] == ["bo", "bo"]
        # Every BO step that did not fall back chose its config by acquisition.
        assert fallback or all(d.acquisition_value is not None for d in decisions)


def test_searcher_charges_a_failed_trial_its_last_report_as_documented(
    tmp_path: Path,
) -> None:
    """docs/usage.md: a trial whose stage raises reports what it spent (metric NaN,
    ``stage_failed`` 1) before the error reaches Tune, which then tells the
    searcher only ``error=True``; the searcher charges that report, fits nothing
    of it, and the failing stage's running time teaches no cost GP. A NaN metric
    from a finished trial is a failure too, charged and not fitted. Both survive
    a checkpoint round trip."""
    pipeline = config_pipeline(Calls())
    searcher = EEIPUSearcher(
        pipeline, metric="score", mode="max", options=EngineOptions(n_warmup=3)
    )
    for trial in ("t0", "t1", "t2"):
        assert isinstance(searcher.suggest(trial), dict)
    searcher.on_trial_result(
        "t0",
        {
            "score": math.nan,
            "stage_failed": 1,
            "stage_costs/prep": 2.0,
            "compute_costs/prep": 2.0,
            "stage_costs/train": 0.5,
            "total_cost": 2.5,
        },
    )
    searcher.on_trial_complete("t0", None, error=True)
    searcher.on_trial_complete(
        "t1", {"score": math.nan, "stage_costs/prep": 1.0, "stage_costs/train": 1.0}
    )
    searcher.on_trial_complete(
        "t2", {"score": 3.0, "stage_costs/prep": 1.0, "stage_costs/train": 2.0}
    )
    store = searcher.engine.store
    assert store["t0"].status is TrialStatus.FAILED and store["t0"].charged_cost == 2.5
    assert store["t0"].compute_costs == [2.0, None]  # the failing stage: no cost learned
    assert store["t1"].status is TrialStatus.FAILED and store["t1"].charged_cost == 2.0
    assert searcher.budget_spent == 2.5 + 2.0 + 3.0
    assert store.train_xy()[0].shape[0] == 1  # only t2 is fitted

    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = EEIPUSearcher(
        pipeline, metric="score", mode="max", options=EngineOptions(n_warmup=3)
    )
    restored.restore(str(path))
    assert restored.budget_spent == searcher.budget_spent
    assert [r.status for r in restored.engine.records] == [r.status for r in store]
    assert isinstance(restored.suggest("t3"), dict)


# ================================================================== cache URLs
SCHEMES = st.sampled_from(
    ["", "s3://", "s3a://", "file://", "memory://", "nosuch://", "S3://", "gs://", "::"]
)


@PROFILE
@given(scheme=SCHEMES, rest=st.text(max_size=20))
def test_any_url_string_constructs_or_is_a_cache_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, rest: str
) -> None:
    """Construction touches no storage; it accepts the URL or says why not."""
    monkeypatch.chdir(tmp_path)
    url = scheme + rest
    try:
        cache = PrefixCache(url)
    except CacheConfigError as exc:
        shown = url.replace("\x00", "\\x00")[:10]
        named = shown[:3] in str(exc) or repr(shown[:3])[1:-1] in str(exc)  # as !r shows it
        assert named or "empty" in str(exc) or "NUL" in str(exc), str(exc)
        return
    assert isinstance(cache.url, str) and cache.url
    if "://" not in url:
        assert os.path.isabs(cache.url)  # local paths are pinned: trials chdir


@PROFILE
@given(url=GARBAGE.filter(lambda v: v is not None and not isinstance(v, str)))
def test_non_string_urls_are_refused(url: Any) -> None:
    with pytest.raises(CacheConfigError) as info:
        PrefixCache(url)
    assert_names(info.value, "url")


OPTION_VALUES = st.one_of(GARBAGE, st.integers(-5, 5), st.floats(-5, 5))


@PROFILE
@given(
    option=st.sampled_from(
        ["byte_budget", "object_store_budget", "touch_interval", "unreachable_cooldown"]
    ),
    value=OPTION_VALUES,
)
def test_cache_options_are_valid_or_a_cache_config_error(
    tmp_path: Path, option: str, value: Any
) -> None:
    try:
        PrefixCache(tmp_path / "cache", **{option: value})
    except CacheConfigError as exc:
        assert_names(exc, option)


@pytest.mark.parametrize("option", ["touch_interval", "unreachable_cooldown"])
def test_cache_time_options_beyond_the_float_range_are_refused(tmp_path: Path, option: str) -> None:
    with pytest.raises(CacheConfigError, match=option):
        PrefixCache(tmp_path / "cache", **{option: 10**400})


@PROFILE
@given(rest=st.text(st.characters(blacklist_characters="/\\"), min_size=1, max_size=12))
def test_relative_local_urls_store_and_load_inside_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rest: str
) -> None:
    """Odd but valid local names (unicode, spaces, ``~x``, ``..``-free): a working
    cache under the directory they name, or a CacheError, never a raw crash."""
    assume(rest not in (".", "..") and "\x00" not in rest)
    work = Path(tempfile.mkdtemp(prefix="w", dir=tmp_path))
    monkeypatch.chdir(work)
    key, meta = entry_for()
    try:
        cache = PrefixCache(rest)
        cache.store(key, np.arange(3.0), meta)
        hit = cache.load(key)
    except CacheError as exc:
        assert isinstance(exc, EEIPUError)
        return
    assert hit is not None and hit.value.tolist() == [0.0, 1.0, 2.0]
    # Every example works in its own w<...> directory: nothing lands beside them.
    outside = [p for p in tmp_path.rglob("*") if p.relative_to(tmp_path).parts[0][0] != "w"]
    assert outside == [], outside
    assert any(p.name == "manifest.json" for p in work.rglob("*"))


@PROFILE
@given(bucket=st.text(max_size=12), prefix=st.text(max_size=8))
def test_s3_urls_on_a_real_server_work_or_raise_cache_errors(
    s3_server: dict[str, Any], bucket: str, prefix: str
) -> None:
    """Hostile bucket and prefix names against the loopback S3 API: refused at
    construction, or a CacheError on use (no such bucket), never a botocore or
    fsspec exception."""
    key, meta = entry_for()
    options = {**s3_server["storage_options"], "retries": 1}
    try:
        cache = PrefixCache(f"s3://{bucket}/{prefix}", storage_options=options)
    except CacheConfigError:
        return
    try:
        assert cache.load(key) is None
        cache.store(key, np.arange(3.0), meta)
    except CacheError:
        return


def test_read_only_scheme_store_is_a_cache_error() -> None:
    key, meta = entry_for()
    cache = PrefixCache("http://127.0.0.1:1/cache", unreachable_cooldown=0)
    with pytest.raises(CacheStorageError, match="does not support"):
        cache.store(key, np.arange(3.0), meta)


@pytest.mark.parametrize("url", ["s3://bucket::file", "simplecache::s3://bucket/p", "/a::b"])
def test_chained_urls_are_refused_at_construction(url: str, s3_server: dict[str, Any]) -> None:
    with pytest.raises(CacheConfigError, match="'::'"):
        PrefixCache(url, storage_options=s3_server["storage_options"])


def test_relative_file_url_means_one_directory_in_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "driver").mkdir()
    (tmp_path / "trial").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    driver_cache = PrefixCache("file://cache")
    shipped = pickle.dumps(driver_cache)  # what Tune sends to a trial
    monkeypatch.chdir(tmp_path / "trial")  # Tune runs a trial in its own directory
    key, meta = entry_for()
    pickle.loads(shipped).store(key, np.arange(3.0), meta)
    monkeypatch.chdir(tmp_path / "driver")
    assert driver_cache.contains(key)


def test_torch_and_numpy_metrics_are_numbers() -> None:
    """The metric may arrive as a NumPy scalar or 0-d tensor (a stage's own
    arithmetic): recorded as the float it holds."""
    engine = small_engine()
    for i, metric in enumerate([np.float32(0.5), torch.tensor(0.25), np.int64(3)]):
        engine.suggest(f"t{i}")
        engine.on_result(f"t{i}", {"score": metric, "stage_costs/prep": 1.0})
        assert engine.store[f"t{i}"].objective == float(metric)
