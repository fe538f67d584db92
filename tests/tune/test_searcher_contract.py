"""EEIPUSearcher keeps Ray Tune's searcher contract.

One lifecycle for every acquisition, with a pipeline and with a plain nested
space: suggest -> result -> complete (NaN, +inf, -inf, a missing metric, an
error) -> save -> restore into a freshly built ``EEIPUSearcher()`` -> complete
a trial that was pending at save time -> suggest. Then nested plain spaces of
every Tune domain kind, a Tuner ``param_space`` with a pipeline, the
constructor's arguments against ``EngineOptions``, and real ``tune.run`` /
``tune.Tuner`` sweeps with nested spaces on a local Ray cluster.

Every assertion here is structural or exact (shapes, types, bounds, record
statuses, sums of reported costs): nothing compares an optimizer's output
against a threshold, so no rounding or machine can flip it.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import PrefixCache
from eeipu_ray.errors import ConfigError
from eeipu_ray.pipelines import load_pipeline
from eeipu_ray.pipelines.synthetic import synthetic_objective
from eeipu_ray.search import (
    ACQUISITIONS,
    EngineOptions,
    EngineOptionsError,
    EngineStateError,
    SearchSpaceError,
)
from eeipu_ray.search.records import TrialStatus
from eeipu_ray.tune.searcher import EEIPUSearcher, SearcherOptionsError, SearcherStateError

FAST = EngineOptions(num_restarts=2, raw_samples=32, mc_samples=32, maxiter=10)

# A plain space nested three levels deep, with constants at every level.
NESTED = {
    "model": {
        "lr": tune.loguniform(1e-4, 1e-1),
        "layers": {"depth": tune.randint(1, 6), "kind": "mlp"},
    },
    "batch": tune.choice([16, 32, 64]),
    "dropout": tune.uniform(0.0, 0.5),
    "seed": 7,
}

# Every bounded Tune domain kind, nested.
EVERY_KIND = {
    "float": {
        "uniform": tune.uniform(-2.0, 3.0),
        "quniform": tune.quniform(0.0, 1.0, 0.25),
        "loguniform": tune.loguniform(1e-3, 10.0),
        "qloguniform": tune.qloguniform(1.0, 100.0, 1.0),
    },
    "int": {
        "randint": tune.randint(-3, 4),
        "qrandint": tune.qrandint(0, 20, 5),
        "lograndint": tune.lograndint(1, 1000),
        "qlograndint": {"deeper": tune.qlograndint(2, 64, 2)},
    },
    "choice": {"optimizer": tune.choice(["sgd", "adam", None]), "flag": tune.choice([True, False])},
    "constants": {"name": "run", "list": [1, 2], "empty": {}},
    "top": 3.5,
}


def nested_score(config: dict[str, Any]) -> float:
    """A deterministic objective of a config of ``NESTED``."""
    model = config["model"]
    return (
        -((math.log10(model["lr"]) + 2.0) ** 2)
        - 0.1 * model["layers"]["depth"]
        - (config["dropout"] - 0.2) ** 2
        + (0.05 if config["batch"] == 32 else 0.0)
    )


def nested_cost(config: dict[str, Any]) -> float:
    return 1.0 + 0.25 * config["model"]["layers"]["depth"]


def assert_nested_config(config: Any) -> None:
    """``config`` has NESTED's shape, constants in place, values in their domains."""
    assert isinstance(config, dict)
    assert set(config) == {"model", "batch", "dropout", "seed"}
    assert set(config["model"]) == {"lr", "layers"}
    assert set(config["model"]["layers"]) == {"depth", "kind"}
    assert config["seed"] == 7 and config["model"]["layers"]["kind"] == "mlp"
    assert isinstance(config["model"]["lr"], float) and 1e-4 <= config["model"]["lr"] <= 1e-1
    depth = config["model"]["layers"]["depth"]
    assert type(depth) is int and 1 <= depth < 6
    assert config["batch"] in (16, 32, 64)
    assert isinstance(config["dropout"], float) and 0.0 <= config["dropout"] <= 0.5


# --------------------------------------------------------------- lifecycle
SYNTHETIC = load_pipeline("synthetic")


def make_searcher(kind: str, acquisition: str, cache: PrefixCache | None) -> EEIPUSearcher:
    common = {
        "metric": "score",
        "mode": "max",
        "budget": 1000.0,
        "acquisition": acquisition,
        "options": replace(FAST, n_warmup=3),
    }
    if kind == "pipeline":
        return EEIPUSearcher(SYNTHETIC, cache=cache, **common)
    common["options"] = replace(common["options"], cost_key="cost")
    return EEIPUSearcher(space=NESTED, **common)


def good_result(kind: str, config: dict[str, Any], cache: PrefixCache | None) -> dict[str, Any]:
    if kind == "pipeline":
        return SYNTHETIC.run(config, cache).to_result("score")
    return {"score": nested_score(config), "cost": nested_cost(config)}


def check_suggestion(kind: str, config: Any) -> None:
    if kind == "pipeline":
        assert isinstance(config, dict) and set(config) == set(SYNTHETIC.stage_names)
        SYNTHETIC.check_config(config)  # every value inside its declared domain
    else:
        assert_nested_config(config)


BAD_OUTCOMES: list[tuple[str, dict[str, Any] | None, bool]] = [
    ("nan", {"score": float("nan"), "total_cost": 1.0, "cost": 1.0}, False),
    ("+inf", {"score": float("inf"), "total_cost": 1.0, "cost": 1.0}, False),
    ("-inf", {"score": float("-inf"), "total_cost": 1.0, "cost": 1.0}, False),
    ("missing", {"total_cost": 1.0, "cost": 1.0}, False),
    ("error", None, True),
]


@pytest.mark.parametrize("kind", ["pipeline", "plain"])
@pytest.mark.parametrize("acquisition", ACQUISITIONS)
def test_lifecycle_save_restore_into_a_fresh_searcher(
    kind: str, acquisition: str, tmp_path: Path
) -> None:
    cache = PrefixCache(tmp_path / "cache") if kind == "pipeline" else None
    searcher = make_searcher(kind, acquisition, cache)
    for i in range(4):  # warm-up (3), then one BO step
        config = searcher.suggest(f"ok{i}")
        check_suggestion(kind, config)
        searcher.on_trial_result(f"ok{i}", {"training_iteration": 1})
        searcher.on_trial_complete(f"ok{i}", result=good_result(kind, config, cache))
    for name, result, error in BAD_OUTCOMES:  # BO steps, each ending badly
        config = searcher.suggest(name)
        check_suggestion(kind, config)
        searcher.on_trial_complete(name, result=result, error=error)
        searcher.on_trial_complete(name, result=result, error=error)  # idempotent
    statuses = {r.trial_id: r.status for r in searcher.engine.records}
    assert [statuses[f"ok{i}"] for i in range(4)] == [TrialStatus.COMPLETED] * 4
    assert [statuses[name] for name, _, _ in BAD_OUTCOMES] == [TrialStatus.FAILED] * 5
    spent_before = searcher.budget_spent
    assert spent_before == pytest.approx(sum(r.charged_cost for r in searcher.engine.records))
    # One trial is running when the checkpoint is written; it has reported progress.
    pending = searcher.suggest("pending")
    check_suggestion(kind, pending)
    searcher.on_trial_result("pending", {"training_iteration": 1})
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))

    fresh = EEIPUSearcher()  # no pipeline, no space, no metric
    fresh.restore(str(path))
    assert (fresh.metric, fresh.mode, fresh.budget) == ("score", "max", 1000.0)
    assert fresh.engine.options.acquisition == acquisition
    assert fresh.budget_spent == pytest.approx(spent_before)
    assert [(r.trial_id, r.status) for r in fresh.engine.records] == [
        (r.trial_id, r.status) for r in searcher.engine.records
    ]
    assert fresh.decisions == searcher.decisions
    # Tune's calls work at once, on the trial that was pending at save time too.
    fresh.on_trial_result("pending", {"training_iteration": 2})
    fresh.on_trial_complete("pending", result=good_result(kind, pending, cache))
    record = fresh.engine.store["pending"]
    assert record.status is TrialStatus.COMPLETED
    assert fresh.budget_spent == pytest.approx(spent_before + record.charged_cost)
    nxt = fresh.suggest("after-restore")
    check_suggestion(kind, nxt)
    fresh.on_trial_complete("after-restore", result=good_result(kind, nxt, cache))
    assert fresh.engine.store["after-restore"].status is TrialStatus.COMPLETED
    # The atomic save left no temporary file behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["searcher.pkl"]


def test_a_restored_searcher_keeps_the_arguments_it_was_given(tmp_path: Path) -> None:
    searcher = make_searcher("pipeline", "eeipu", None)
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", result=good_result("pipeline", config, None))
    path = tmp_path / "s.pkl"
    searcher.save(str(path))

    elsewhere = PrefixCache(tmp_path / "elsewhere")
    more = EEIPUSearcher(budget=2000.0, cache=elsewhere)
    more.restore(str(path))
    assert more.budget == 2000.0  # a larger budget to go on with
    assert more.engine.options.n_warmup == 3 and more.engine.options.num_restarts == 2
    assert more._cache is elsewhere

    with pytest.raises(SearcherStateError, match=r"metric='score'.*metric='loss'"):
        EEIPUSearcher(metric="loss").restore(str(path))
    other = EEIPUSearcher(load_pipeline("synthetic", layout="back5"), metric="score", mode="max")
    with pytest.raises(SearcherStateError, match="written for pipeline 'synthetic'"):
        other.restore(str(path))
    plain = EEIPUSearcher(space={"x": tune.uniform(0, 1)})
    with pytest.raises(EngineStateError, match="another search space"):
        plain.restore(str(path))
    with pytest.raises(SearcherStateError, match="not an EEIPUSearcher checkpoint"):
        (tmp_path / "junk.pkl").write_bytes(b"\x80\x05N.")  # pickled None
        EEIPUSearcher().restore(str(tmp_path / "junk.pkl"))


def _offset(previous: Any, params: dict[str, Any]) -> float:
    return float(params["a"])


def test_restore_of_a_pipeline_with_closures_and_of_one_that_cannot_be_pickled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scale = 3.0
    closures = Pipeline(
        "closures",
        [
            Stage("prep", _offset, {"a": tune.uniform(0.0, 1.0)}),
            Stage(
                "fit",
                lambda a, hp: {"score": scale * a - hp["b"] ** 2},
                {"b": tune.uniform(-1.0, 1.0)},
            ),
        ],
    )
    searcher = EEIPUSearcher(
        closures, metric="score", mode="max", options=replace(FAST, n_warmup=2)
    )
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", result=closures.run(config).to_result("score"))
    searcher.save(str(tmp_path / "closures.pkl"))
    fresh = EEIPUSearcher()
    fresh.restore(str(tmp_path / "closures.pkl"))
    nxt = fresh.suggest("t1")
    # The restored pipeline runs: its lambda came back with the checkpoint.
    assert fresh._pipeline.run(nxt).to_result("score")["score"] == pytest.approx(
        scale * nxt["prep"]["a"] - nxt["fit"]["b"] ** 2
    )

    lock = threading.Lock()  # no pickle can carry it

    def locked(previous: Any, params: dict[str, Any]) -> dict[str, float]:
        with lock:
            return {"score": -params["a"]}

    unpicklable = Pipeline("locked", [Stage("only", locked, {"a": tune.uniform(0.0, 1.0)})])
    searcher = EEIPUSearcher(
        unpicklable, metric="score", mode="max", options=replace(FAST, n_warmup=2)
    )
    config = searcher.suggest("t0")
    searcher.on_trial_complete("t0", result=unpicklable.run(config).to_result("score"))
    with caplog.at_level(logging.WARNING, logger="eeipu_ray.tune.searcher"):
        searcher.save(str(tmp_path / "locked.pkl"))
    assert "without its pipeline" in caplog.text
    with pytest.raises(SearcherStateError, match="pass the pipeline"):
        EEIPUSearcher().restore(str(tmp_path / "locked.pkl"))
    again = EEIPUSearcher(unpicklable)
    again.restore(str(tmp_path / "locked.pkl"))
    assert [r.trial_id for r in again.engine.records] == ["t0"]
    assert isinstance(again.suggest("t1"), dict)


# ------------------------------------------------------- nested plain spaces
def _assert_every_kind(config: Any) -> None:
    assert isinstance(config, dict)
    assert set(config) == set(EVERY_KIND)
    f, i, c = config["float"], config["int"], config["choice"]
    assert set(f) == set(EVERY_KIND["float"]) and all(type(v) is float for v in f.values())
    assert -2.0 <= f["uniform"] <= 3.0
    assert 0.0 <= f["quniform"] <= 1.0 and (f["quniform"] / 0.25) == round(f["quniform"] / 0.25)
    assert 1e-3 <= f["loguniform"] <= 10.0
    assert 1.0 <= f["qloguniform"] <= 100.0 and f["qloguniform"] == round(f["qloguniform"])
    assert set(i) == set(EVERY_KIND["int"]) and set(i["qlograndint"]) == {"deeper"}
    ints = [i["randint"], i["qrandint"], i["lograndint"], i["qlograndint"]["deeper"]]
    assert all(type(v) is int for v in ints)
    assert -3 <= i["randint"] < 4  # randint's upper bound is exclusive
    assert 0 <= i["qrandint"] <= 20 and i["qrandint"] % 5 == 0  # qrandint's is inclusive
    assert 1 <= i["lograndint"] < 1000
    assert 2 <= i["qlograndint"]["deeper"] <= 64 and i["qlograndint"]["deeper"] % 2 == 0
    assert c["optimizer"] in ("sgd", "adam", None) and c["flag"] in (True, False)
    assert config["constants"] == {"name": "run", "list": [1, 2], "empty": {}}
    assert config["top"] == 3.5


def _kind_score(config: dict[str, Any]) -> float:
    return config["float"]["uniform"] - abs(config["int"]["randint"]) - config["float"]["quniform"]


@pytest.mark.parametrize("how", ["constructor", "positional", "set_search_properties"])
def test_nested_spaces_of_every_domain_kind_round_trip(how: str) -> None:
    kwargs: dict[str, Any] = {"options": replace(FAST, n_warmup=4, cost_key="cost")}
    if how == "constructor":
        searcher = EEIPUSearcher(space=EVERY_KIND, metric="score", mode="max", **kwargs)
    elif how == "positional":
        searcher = EEIPUSearcher(EVERY_KIND, "score", "max", **kwargs)
    else:
        searcher = EEIPUSearcher(**kwargs)
        assert searcher.set_search_properties("score", "max", EVERY_KIND) is True
    assert searcher.engine.space.dim == 10  # one dimension per domain, none per constant
    for i in range(7):  # warm-up and BO steps
        config = searcher.suggest(f"t{i}")
        _assert_every_kind(config)
        searcher.on_trial_complete(f"t{i}", result={"score": _kind_score(config), "cost": 1.0})
    # What the engine learned is what was suggested: decode(encode(config)) == config.
    for record in searcher.engine.records:
        assert searcher._from_engine(searcher.engine.space.from_unit(record.x)) == (
            searcher._from_engine(record.config)
        )
    assert searcher.budget_spent == pytest.approx(7.0)


def test_nested_points_and_evaluated_points_are_accepted_nested_or_flat() -> None:
    point = {
        "model": {"lr": 0.01, "layers": {"depth": 2, "kind": "mlp"}},
        "batch": 32,
        "dropout": 0.2,
        "seed": 7,
    }
    searcher = EEIPUSearcher(
        space=NESTED,
        metric="score",
        mode="max",
        options=replace(FAST, n_warmup=3, cost_key="cost"),
        points_to_evaluate=[point],
    )
    assert searcher.suggest("given") == point  # handed to Tune exactly as given
    searcher.on_trial_complete("given", result={"score": 1.0, "cost": 1.0})
    searcher.add_evaluated_point({**point, "dropout": 0.4}, 0.5)
    flat = {"model/lr": 0.001, "model/layers/depth": 4, "batch": 16, "dropout": 0.1}
    searcher.add_evaluated_points([(flat, {"score": 0.25, "cost": 2.0})])
    objectives = [r.objective for r in searcher.engine.records]
    assert objectives == [1.0, 0.5, 0.25]
    x = searcher.engine.records[2].x
    assert (
        searcher._from_engine(searcher.engine.space.from_unit(x))["model"]["layers"]["depth"] == 4
    )
    with pytest.raises(SearchSpaceError, match="model/layers/depth"):
        searcher.add_evaluated_point({"model": {"lr": 0.01}, "batch": 16, "dropout": 0.1}, 0.0)


def test_nested_space_errors_name_the_key() -> None:
    with pytest.raises(SearchSpaceError, match=r"'model/opt': grid_search is not supported"):
        EEIPUSearcher(space={"model": {"opt": tune.grid_search([1, 2])}}, metric="m", mode="max")
    with pytest.raises(SearchSpaceError, match="both flatten to 'a/b'"):
        EEIPUSearcher(space={"a/b": tune.uniform(0, 1), "a": {"b": 1}}, metric="m", mode="max")
    with pytest.raises(SearchSpaceError, match="non-empty string"):
        EEIPUSearcher(space={"a": {3: tune.uniform(0, 1)}}, metric="m", mode="max")
    # A flat space with "/" in its keys stays flat.
    flat = EEIPUSearcher(space={"a/b": tune.uniform(0, 1)}, metric="m", mode="max", options=FAST)
    assert set(flat.suggest("t0")) == {"a/b"}


# ---------------------------------------------------- param_space, options
def test_a_tuner_param_space_overrides_the_pipelines_declared_space(tmp_path: Path) -> None:
    pipeline = load_pipeline("synthetic")
    searcher = EEIPUSearcher(pipeline, budget=1e6, options=replace(FAST, n_warmup=3))
    override = {"stage1": {"x1": tune.uniform(5.0, 6.0), "x2": 0.5}}
    assert searcher.set_search_properties("score", "max", override) is True
    assert searcher.engine.space.dim == 6  # stage1/x2 is a constant now
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        assert 5.0 <= config["stage1"]["x1"] <= 6.0 and config["stage1"]["x2"] == 0.5
        assert -2.0 <= config["stage2"]["x1"] <= 2.0  # stages left out keep their space
        result = pipeline.run(config).to_result("score")
        assert result["score"] == pytest.approx(synthetic_objective(pipeline.nest_config(config)))
        searcher.on_trial_complete(f"t{i}", result=result)
    # Tune calls again on Tuner.restore with the same param_space: accepted.
    assert searcher.set_search_properties("score", "max", override) is True
    # Another space once trials ran: declined (Tune then raises).
    assert searcher.set_search_properties(None, None, {"stage1": {"x1": tune.uniform(0, 1)}}) is (
        False
    )
    with pytest.raises(SearcherStateError, match="metric='loss'"):
        searcher.set_search_properties("loss", None, override)
    # A checkpoint keeps the overridden space, into a fresh searcher or one given the pipeline.
    searcher.save(str(tmp_path / "override.pkl"))
    for fresh in (EEIPUSearcher(), EEIPUSearcher(pipeline)):
        fresh.restore(str(tmp_path / "override.pkl"))
        config = fresh.suggest("after")
        assert 5.0 <= config["stage1"]["x1"] <= 6.0 and config["stage1"]["x2"] == 0.5


def test_param_space_keys_the_pipeline_lacks_are_named() -> None:
    pipeline = load_pipeline("synthetic")
    searcher = EEIPUSearcher(pipeline, metric="score", mode="max", options=FAST)
    with pytest.raises(SearchSpaceError, match="'nostage' names no stage"):
        searcher.set_search_properties(None, None, {"nostage": {"x": tune.uniform(0, 1)}})
    with pytest.raises(SearchSpaceError, match="'stage1/x9' is no hyperparameter"):
        searcher.set_search_properties(None, None, {"stage1": {"x9": tune.uniform(0, 1)}})
    with pytest.raises(SearchSpaceError, match="'stage2/x7' is no hyperparameter"):
        searcher.set_search_properties(None, None, {"stage2/x7": 1.0})
    # Flat "stage/key" entries are overrides too.
    assert searcher.set_search_properties(None, None, {"stage3/x1": 4.0}) is True
    assert searcher.suggest("t0")["stage3"]["x1"] == 4.0
    # points_to_evaluate must fit the overridden space.
    points = [
        {
            "stage1": {"x1": 0.0, "x2": 0.0},
            "stage2": {"x1": 0.0, "x2": 0.0, "x3": 0.0},
            "stage3": {"x1": 1.0, "x2": 1.0},
        }
    ]
    with_points = EEIPUSearcher(pipeline, metric="score", mode="max", points_to_evaluate=points)
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\].*stage1/x1"):
        with_points.set_search_properties(None, None, {"stage1": {"x1": tune.uniform(5, 6)}})


def test_a_plain_searcher_holding_a_space_declines_a_param_space_with_domains() -> None:
    searcher = EEIPUSearcher(space={"x": tune.uniform(0, 1)}, options=FAST)
    assert searcher.set_search_properties("m", "max", {"y": tune.uniform(0, 1)}) is False
    # Constants only: Tune merges them into every config; metric and mode are taken.
    assert searcher.set_search_properties("m", "min", {"tag": "a"}) is True
    assert (searcher.metric, searcher.mode) == ("m", "min")
    assert EEIPUSearcher().set_search_properties("m", "max", {"tag": "a"}) is False


def test_arguments_given_win_options_set_stay_and_conflicts_name_both() -> None:
    searcher = EEIPUSearcher(space={"x": tune.uniform(0, 1)}, options=EngineOptions(budget=5.0))
    assert searcher.budget == 5.0  # not overridden by an argument that was not given
    searcher = EEIPUSearcher(
        space={"x": tune.uniform(0, 1)},
        metric="m",
        mode="max",
        budget=7.0,
        options=EngineOptions(n_warmup=3, acquisition="ei"),
    )
    assert (searcher.engine.options.n_warmup, searcher.engine.options.budget) == (3, 7.0)
    assert searcher.engine.options.acquisition == "ei"
    with pytest.raises(
        SearcherOptionsError, match=r"budget=10\.0 conflicts with options\.budget=5\.0"
    ):
        EEIPUSearcher(budget=10.0, options=EngineOptions(budget=5.0))
    with pytest.raises(SearcherOptionsError, match="acquisition='ei' conflicts"):
        EEIPUSearcher(acquisition="ei", options=EngineOptions(acquisition="carbo"))
    by_options = EEIPUSearcher(
        space={"x": tune.uniform(0, 1)}, options=EngineOptions(metric="loss", mode="min")
    )
    assert (by_options.metric, by_options.mode) == ("loss", "min")
    with pytest.raises(SearcherOptionsError, match="metric='acc' conflicts"):
        EEIPUSearcher(metric="acc", options=EngineOptions(metric="loss"))
    with pytest.raises(SearcherOptionsError, match="given twice"):
        EEIPUSearcher({"x": tune.uniform(0, 1)}, space={"x": tune.uniform(0, 1)})
    with pytest.raises(SearcherOptionsError, match=r"pipeline=.*str"):
        EEIPUSearcher("synthetic")
    with pytest.raises(SearcherOptionsError, match=r"options=.*dict"):
        EEIPUSearcher(options={"budget": 5})


def test_former_arguments_go_into_the_options_with_a_future_warning() -> None:
    space = {"x": tune.uniform(0, 1)}
    with pytest.warns(FutureWarning, match=r"options=EngineOptions\(seed=4\)"):
        searcher = EEIPUSearcher(space, "m", "max", seed=4, options=EngineOptions(n_warmup=3))
    assert (searcher.options.seed, searcher.options.n_warmup) == (4, 3)
    with pytest.warns(FutureWarning) as caught:
        searcher = EEIPUSearcher(
            space,
            "m",
            "max",
            n_warmup=2,
            cost="energy",
            cost_key="j",
            lookahead=False,
            batch_size=3,
        )
    assert len(caught) == 5
    o = searcher.options
    assert (o.n_warmup, o.cost, o.cost_key, o.lookahead, o.batch_size) == (
        2,
        "energy",
        "j",
        False,
        3,
    )
    with (
        pytest.warns(FutureWarning),
        pytest.raises(SearcherOptionsError, match=r"n_warmup=2 conflicts with options\.n_warmup=3"),
    ):
        EEIPUSearcher(space, n_warmup=2, options=EngineOptions(n_warmup=3))
    with pytest.warns(FutureWarning), pytest.raises(EngineOptionsError, match="batch_size=0"):
        EEIPUSearcher(space, batch_size=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_warmups'"):
        EEIPUSearcher(space, n_warmups=2)


def test_checkpoints_of_the_former_arguments_restore_into_the_options(tmp_path: Path) -> None:
    """Checkpoints and pickles that kept cost, cost_key, lookahead and batch_size
    beside the options (before they were options) restore with those values."""
    import pickle

    space = {"x": tune.uniform(0, 1)}
    searcher = EEIPUSearcher(space, "m", "max", options=replace(FAST, n_warmup=2))
    searcher.suggest("t0")
    path = tmp_path / "older.pkl"
    searcher.save(str(path))
    with open(path, "rb") as fh:
        state = pickle.load(fh)
    older = {"cost": "energy", "cost_key": "joules", "lookahead": False, "batch_size": 2}
    state["search"].update(older)
    with open(path, "wb") as fh:
        pickle.dump(state, fh)
    restored = EEIPUSearcher()
    restored.restore(str(path))
    o = restored.options
    assert (o.cost, o.cost_key, o.lookahead, o.batch_size, o.n_warmup) == (
        "energy",
        "joules",
        False,
        2,
        2,
    )
    # Given to this instance, an option wins over the checkpoint's former argument.
    mine = EEIPUSearcher(options=EngineOptions(batch_size=5))
    mine.restore(str(path))
    assert (mine.options.batch_size, mine.options.cost) == (5, "energy")
    # A searcher pickled with the former attributes (as Tuner pickles it).
    pickled = searcher.__getstate__()
    pickled.update({f"_{name}": value for name, value in older.items()})
    again = EEIPUSearcher.__new__(EEIPUSearcher)
    again.__setstate__(pickled)
    assert (again.options.cost, again.options.batch_size) == ("energy", 2)
    assert not set(vars(again)) & {f"_{name}" for name in older}
    assert isinstance(again.suggest("t1"), dict)


# ------------------------------------------------- real Tune, nested spaces
def _nested_trainable(config: dict[str, Any]) -> None:
    assert_nested_config(config)  # the trial got the nested config
    tune.report({"score": nested_score(config), "cost": nested_cost(config)})


def test_tune_run_with_a_nested_param_space_finishes_on_the_budget(
    ray_local: Any, tmp_path: Path
) -> None:
    searcher = EEIPUSearcher(budget=8.0, options=replace(FAST, n_warmup=3, cost_key="cost"))
    analysis = tune.run(
        _nested_trainable,
        config=NESTED,
        metric="score",
        mode="max",
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=1),
        num_samples=-1,  # only the searcher's budget ends the run
        reuse_actors=True,
        storage_path=str(tmp_path),
        verbose=0,
    )
    trials = analysis.trials
    assert trials and all(t.status == "TERMINATED" for t in trials)
    costs = [t.last_result["cost"] for t in trials]
    # Every trial but the last started with budget left; together they reach it.
    assert sum(costs) >= 8.0 and sum(costs[:-1]) < 8.0
    assert searcher.budget_spent == pytest.approx(sum(costs))
    for t in trials:
        assert_nested_config(t.config)
        assert t.last_result["score"] == pytest.approx(nested_score(t.config))
    assert searcher.suggest("more") == Searcher.FINISHED


def _fit(trainable: Any, param_space: dict[str, Any], searcher: EEIPUSearcher, where: Path) -> Any:
    """A Tuner run that only the searcher's budget ends; its results, none failed."""
    grid = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="score", mode="max", search_alg=searcher, num_samples=-1, reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(where.parent), name=where.name, verbose=0),
    ).fit()
    assert not grid.errors
    return list(grid)


def test_tuner_with_a_nested_param_space_and_a_pipeline_override(
    ray_local: Any, tmp_path: Path
) -> None:
    searcher = EEIPUSearcher(budget=8.0, options=replace(FAST, n_warmup=3, cost_key="cost"))
    results = _fit(_nested_trainable, NESTED, searcher, tmp_path / "nested")
    assert sum(r.metrics["cost"] for r in results) >= 8.0
    for r in results:
        assert_nested_config(r.config)

    # With a pipeline, the param_space narrows stage1/x1: the trials run it.
    pipeline = load_pipeline("synthetic")
    cache = PrefixCache(tmp_path / "cache")
    searcher = EEIPUSearcher(pipeline, budget=20.0, cache=cache, options=replace(FAST, n_warmup=3))
    trainable = pipeline.as_trainable(cache=cache, metric="score")
    override = {"stage1": {"x1": tune.uniform(1.5, 2.0)}}
    results = _fit(trainable, override, searcher, tmp_path / "override")
    assert sum(r.metrics["total_cost"] for r in results) >= 20.0
    for r in results:
        assert 1.5 <= r.config["stage1"]["x1"] <= 2.0
        assert r.metrics["score"] == pytest.approx(
            synthetic_objective(pipeline.nest_config(r.config))
        )


def test_a_plain_searcher_with_its_own_space_and_a_param_space_with_domains_fails_in_tune(
    ray_local: Any, tmp_path: Path
) -> None:
    searcher = EEIPUSearcher(space=NESTED, metric="score", mode="max", options=FAST)
    with pytest.raises(Exception, match="already instantiated with a search space"):
        tune.run(
            _nested_trainable,
            config={"other": tune.uniform(0, 1)},
            search_alg=searcher,
            num_samples=1,
            storage_path=str(tmp_path),
            verbose=0,
        )
