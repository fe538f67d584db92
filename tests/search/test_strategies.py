"""Acquisition strategies: the registry, what each built-in declares, and a new
method added as one small class that the engine then runs without changes."""

from __future__ import annotations

import math

import pytest

from eeipu_ray.search import BOEngine, EngineOptions, EngineOptionsError
from eeipu_ray.search.acquisition import CostAwareLogEI, LogCArBO, LogEEIPU, LogEIPS
from eeipu_ray.search.engine import ACQUISITIONS
from eeipu_ray.search.strategies import (
    AcquisitionInputs,
    AcquisitionStrategy,
    acquisition_names,
    get_strategy,
    register,
)
from eeipu_ray.search.strategies import base as strategies_base
from tests.search.test_engine import FAST, _keys, _result, _space, observed_engine


@pytest.fixture
def registry():
    """Registrations made by a test are undone after it."""
    before = dict(strategies_base._REGISTRY)
    yield
    strategies_base._REGISTRY.clear()
    strategies_base._REGISTRY.update(before)


def test_every_built_in_is_registered_with_what_it_needs():
    assert set(ACQUISITIONS) <= set(acquisition_names())
    declared = {
        name: (
            s.proposes_randomly,
            s.needs_stage_costs,
            s.needs_total_cost,
            s.memoization_aware,
            s.eta(100.0, 60.0, 20.0),
        )
        for name in ACQUISITIONS
        for s in [get_strategy(name)]
    }
    assert declared == {
        "eeipu": (False, True, False, True, 0.5),  # cooled: (100 - 60) / (100 - 20)
        "ei": (False, False, False, False, 0.0),
        "eips": (False, False, True, False, 1.0),
        "carbo": (False, False, True, False, 0.5),
        "eeipu_gittins": (False, True, False, True, 0.5),
        "random": (True, False, False, False, 0.0),
    }


@pytest.mark.parametrize(
    ("acquisition", "cls"),
    [("eeipu", LogEEIPU), ("ei", CostAwareLogEI), ("eips", LogEIPS), ("carbo", LogCArBO)],
)
def test_the_engine_builds_each_strategy_s_acquisition(acquisition, cls):
    engine = observed_engine(acquisition=acquisition)
    parts = engine._acquisition_parts(engine._models(engine.store), engine.store, engine.eta)
    acqf, cached = engine._acquisition(parts, engine.store, None)
    assert type(acqf) is cls
    assert (cached is not None) == (acquisition == "eeipu")


def test_eeipu_charges_the_overhead_as_a_fraction_of_a_typical_run():
    from eeipu_ray.search.strategies.base import typical_run_cost

    engine = observed_engine(acquisition="eeipu", cost_overhead=0.5)
    parts = engine._acquisition_parts(engine._models(engine.store), engine.store, engine.eta)
    acqf, _ = engine._acquisition(parts, engine.store, None)
    typical = typical_run_cost(parts.costs.stage_costs)
    # The geometric means of the observed stage costs, summed.
    observed = [r.compute_costs for r in engine.store.completed]
    by_hand = sum(
        math.exp(sum(math.log(c[k]) for c in observed) / len(observed))
        for k in range(len(observed[0]))
    )
    assert typical == pytest.approx(by_hand, rel=1e-9)
    assert acqf.log_inverse_cost.overhead == pytest.approx(0.5 * typical)


def test_unknown_names_and_bad_registrations_are_refused(registry):
    with pytest.raises(EngineOptionsError, match=r"'ucb'.*eeipu"):
        EngineOptions(acquisition="ucb")
    with pytest.raises(EngineOptionsError, match="acquisition=3"):
        EngineOptions(acquisition=3)  # type: ignore[arg-type]

    class Unnamed(AcquisitionStrategy):
        pass

    with pytest.raises(ValueError, match=r"Unnamed\.name=''"):
        register(Unnamed)

    class Taken(AcquisitionStrategy):
        name = "ei"

    with pytest.raises(ValueError, match="'ei' is already registered by EI"):
        register(Taken)
    with pytest.raises(TypeError, match="not an AcquisitionStrategy"):
        register(dict)  # type: ignore[arg-type]
    assert type(get_strategy("ei")).__name__ == "EI"


def test_a_new_strategy_is_one_class_and_the_engine_runs_it(registry):
    built: list[AcquisitionInputs] = []

    @register
    class PooledEI(AcquisitionStrategy):
        """Cost-blind EI that still extends cached prefixes (an ablation)."""

        name = "pooled_ei"
        memoization_aware = True

        def build(self, inputs: AcquisitionInputs) -> CostAwareLogEI:
            built.append(inputs)
            return CostAwareLogEI(inputs.objective, inputs.best_f, cost=None, eta=0.0)

    assert "pooled_ei" in acquisition_names()
    engine = BOEngine(
        _space(),
        EngineOptions(**FAST, acquisition="pooled_ei", budget=10_000.0, n_warmup=4, top_q=2),
    )
    cache: set[str] = set()
    for i in range(7):
        config = engine.suggest(f"t{i}", available_prefixes=cache, prefix_keys_of=_keys)
        keys = _keys(config)
        memoized = 2 if keys[1] in cache else 1 if keys[0] in cache else 0
        engine.on_result(f"t{i}", _result(config, memoized=memoized))
        cache.update(keys[:2])
    bo = [r for r in engine.records if r.phase == "bo"]
    assert len(bo) == 3 and len(built) == 3
    # It asked for neither cost model, saw the cached prefixes, and had eta 0.
    assert engine._cache.models.stage_costs is None and engine._cache.models.total_cost is None
    assert all(b.cached is not None and b.eta == 0.0 for b in built)
    assert {d.eta for d in engine.decisions if d.phase == "bo"} == {0.0}
    # Its candidates came from the prefix pool: each BO point's prefix, when it
    # reuses one, is the verbatim stage of an earlier trial.
    for r in bo:
        if r.planned_prefix_depth:
            earlier = [e.config["prep"] for e in engine.records if e.trial_id != r.trial_id]
            assert r.config["prep"] in earlier
