"""The paper-compatible synthetic pipeline, and EEIPU vs EI on it (no Ray)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from botorch.test_functions import Beale, Branin, Hartmann

from eeipu_ray.search import BOEngine, EngineOptions, SearchSpace
from eeipu_ray.search.synthetic import (
    STAGE_BOUNDS,
    STAGES,
    beale,
    branin,
    hartmann3,
    stage_cost,
    synthetic_objective,
    synthetic_space,
    synthetic_stage_costs,
)

LOAD_COST = 0.1  # what loading one cached stage is charged


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(beale, Beale()), (hartmann3, Hartmann(dim=3)), (branin, Branin())],
    ids=["beale", "hartmann3", "branin"],
)
def test_formulas_match_botorch_inside_its_domain(ours, theirs):
    lo, hi = theirs.bounds
    X = lo + (hi - lo) * torch.rand(
        200, theirs.dim, generator=torch.Generator().manual_seed(0), dtype=torch.double
    )
    # BoTorch keeps its constants in float32 (1.2 -> 1.2000000477): compare at 1e-6
    assert torch.allclose(ours(X), theirs.evaluate_true(X), rtol=1e-6, atol=1e-6)


def test_objective_and_costs_by_hand():
    config = {
        "stage1": {"x1": 2.0, "x2": -1.0},
        "stage2": {"x1": 0.5, "x2": -2.0, "x3": 1.0},
        "stage3": {"x1": 10.0, "x2": 0.0},
    }
    h1 = torch.tensor([2.0, -1.0], dtype=torch.double)
    h2 = torch.tensor([0.5, -2.0, 1.0], dtype=torch.double)
    h3 = torch.tensor([10.0, 0.0], dtype=torch.double)
    assert synthetic_objective(config) == pytest.approx(
        float(-beale(h1) - hartmann3(h2) - branin(h3))
    )
    c1 = ((18 * 2.0**2 + 12) ** 2 + (7 * math.sin(-1.0) + 26) ** 2) / (500 * 2)
    c2 = (
        (19 * math.sin(0.5) + 39) ** 2
        + (16 * math.sin(-2.0) + 39) ** 2
        + (16 * math.sin(1.0) + 20) ** 2
    ) / (500 * 3)
    c3 = ((11 * math.cos(10.0) + 11) ** 2 + (15 * math.cos(0.0) + 36) ** 2) / (500 * 2)
    assert synthetic_stage_costs(config) == pytest.approx([c1, c2, c3])
    with pytest.raises(ValueError, match="takes 2 values"):
        stage_cost(0, [1.0])


def test_space_bounds():
    space = SearchSpace.from_tune(synthetic_space(), stage_order=STAGES)
    assert space.dim == 7
    assert [len(space.dims_of_stage(k)) for k in range(3)] == [2, 3, 2]
    config = space.from_unit(torch.ones(7, dtype=torch.double))
    for stage, (_, hi) in zip(STAGES, STAGE_BOUNDS, strict=True):
        assert all(v == hi for v in config[stage].values())


# ---------------------------------------------------------------- simulator


def _prefix_keys(config) -> list[str]:
    keys, parts = [], []
    for stage in STAGES:
        parts.append(f"{stage}:{sorted(config[stage].items())!r}")
        keys.append("|".join(parts))
    return keys


@dataclass
class SimulationResult:
    bo_iterations: int
    best: float
    charged: float
    budget_spent: float
    memoized_trials: int


def simulate(acquisition: str, seed: int, budget: float = 200.0) -> SimulationResult:
    """Drive the engine on the synthetic pipeline with an in-process prefix cache.

    suggest -> declared stage costs and objective -> memoization (the longest
    cached proper prefix is loaded, each loaded stage charged ``LOAD_COST``) ->
    on_result, until the engine says the budget is spent.
    """
    space = SearchSpace.from_tune(synthetic_space(), stage_order=STAGES)
    engine = BOEngine(
        space,
        EngineOptions(
            acquisition=acquisition,
            budget=budget,
            n_warmup=10,
            seed=seed,
            num_restarts=2,
            raw_samples=64,
            mc_samples=128,
        ),
    )
    cache: set[str] = set()
    charged = 0.0
    i = 0
    while (config := engine.suggest(f"t{i}", cache, _prefix_keys)) is not None:
        keys = _prefix_keys(config)
        compute = synthetic_stage_costs(config)
        memoized = next((k for k in range(len(STAGES) - 1, 0, -1) if keys[k - 1] in cache), 0)
        spent = [LOAD_COST if k < memoized else c for k, c in enumerate(compute)]
        cache.update(keys[:-1])  # every proper prefix is stored
        result = {
            "score": synthetic_objective(config),
            "memoized_stages": memoized,
            "total_cost": sum(spent),
        }
        for k, stage in enumerate(STAGES):
            result[f"stage_costs/{stage}"] = spent[k]
            result[f"compute_costs/{stage}"] = compute[k]
            result[f"cache_hit/{stage}"] = int(k < memoized)
            result[f"load_seconds/{stage}"] = spent[k] if k < memoized else 0.0
            result[f"prefix_key/{stage}"] = keys[k]
        charged += sum(spent)
        engine.on_result(f"t{i}", result)
        i += 1
    records = engine.records
    return SimulationResult(
        bo_iterations=sum(r.phase == "bo" for r in records),
        best=max(r.objective for r in records if r.objective is not None),
        charged=charged,
        budget_spent=engine.budget_spent,
        memoized_trials=sum(r.memoized_stages > 0 for r in records),
    )


@pytest.mark.parametrize("seed", [0])
def test_eeipu_completes_more_iterations_than_ei_within_the_budget(seed):
    eeipu = simulate("eeipu", seed)
    ei = simulate("ei", seed)
    for name, res in (("EEIPU", eeipu), ("EI", ei)):
        print(
            f"seed {seed} {name}: {res.bo_iterations} BO iterations after warm-up, "
            f"best objective {res.best:.3f}, {res.memoized_trials} trials reused a prefix, "
            f"spent {res.budget_spent:.3f}"
        )
        assert res.budget_spent == pytest.approx(res.charged, rel=1e-12)
        assert 200.0 <= res.budget_spent < 200.0 + 20.0  # stops after the one trial that crosses
    assert eeipu.bo_iterations > ei.bo_iterations
    assert eeipu.memoized_trials > 0 and ei.memoized_trials == 0
