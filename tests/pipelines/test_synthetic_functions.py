"""The synthetic layouts: BoTorch terms, costs, spaces; EEIPU vs EI on the paper's (no Ray)."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

import pytest
import torch
from botorch.test_functions import (
    Ackley,
    Beale,
    Branin,
    DixonPrice,
    Griewank,
    Hartmann,
    Levy,
    Rastrigin,
    Rosenbrock,
    SixHumpCamel,
    StyblinskiTang,
    ThreeHumpCamel,
)

from eeipu_ray.pipelines.synthetic import (
    LAYOUTS,
    STAGE_BOUNDS,
    STAGE_COST_TERMS,
    STAGE_KEYS,
    STAGES,
    BoTorchTerm,
    Layout,
    SyntheticStage,
    get_layout,
    logistic10,
    stage_cost,
    stage_term,
    stage_values,
    synthetic_objective,
    synthetic_space,
    synthetic_stage_costs,
)
from eeipu_ray.search import BOEngine, EngineOptions, SearchSpace

LOAD_COST = 0.1  # what loading one cached stage is charged

# Each layout's test functions, stage by stage.
TERMS = {
    "paper": [Beale, Hartmann, Branin],
    "front4": [Rosenbrock, Levy, SixHumpCamel, Ackley],
    "back5": [Rastrigin, DixonPrice, ThreeHumpCamel, StyblinskiTang, Griewank],
    "flat4": [Hartmann, Branin, SixHumpCamel, Levy],
    "costly3": [ThreeHumpCamel, Ackley, Griewank],
}
FIXED_DIM = (Beale, Branin, SixHumpCamel, ThreeHumpCamel)


def _botorch(cls, dim, bounds=None, dtype=torch.float64):
    """BoTorch's ``cls`` built here, its constants made in ``dtype``."""
    kwargs = {} if cls in FIXED_DIM else {"dim": dim}
    if bounds is not None:
        kwargs["bounds"] = [bounds] * dim
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return cls(**kwargs)
    finally:
        torch.set_default_dtype(previous)


def _box_points(bounds, dim, n, seed):
    lo, hi = bounds
    X = lo + (hi - lo) * torch.rand(
        n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.double
    )
    return torch.cat([X, torch.tensor([[lo] * dim, [hi] * dim], dtype=torch.double)])


@pytest.mark.parametrize("name", list(TERMS))
def test_stage_terms_are_botorch_classes_built_with_the_layout_bounds(name):
    layout = get_layout(name)
    assert [s.term.function for s in layout.stages] == TERMS[name]
    for k, stage in enumerate(layout.stages):
        d = len(stage.keys)
        assert (stage.term.dim, stage.term.bounds) == (d, stage.bounds)
        # Beale's global minimum (3, 0.5) lies outside the paper's [-2, 2]^2, and
        # BoTorch refuses such custom bounds: it runs on its own [-4.5, 4.5]^2.
        bounds = None if stage.term.function is Beale else stage.bounds
        theirs = _botorch(stage.term.function, d, bounds)
        X = _box_points(stage.bounds, d, 300, seed=k)
        got = [stage_term(k, x.tolist(), layout) for x in X]
        expected = [stage.term_scale * float(theirs.evaluate_true(x)) for x in X]
        if stage.term.function is Ackley:  # the project's rounding order, see _ackley
            assert got == pytest.approx(expected, rel=1e-12, abs=0.0)
            assert torch.allclose(stage.term(X), theirs.evaluate_true(X), rtol=1e-12, atol=0.0)
            continue
        assert stage.term(X).tolist() == theirs.evaluate_true(X).tolist()  # bit for bit
        assert got == expected


def test_botorch_constants_in_float32_agree_to_1e_6():
    # BoTorch makes Hartmann's constants in the default dtype (1.2 -> 1.2000000477
    # in float32); the layouts make them in float64, exactly.
    paper = get_layout("paper")
    X = _box_points((-2.0, 2.0), 3, 200, seed=0)
    float32 = _botorch(Hartmann, 3, (-2.0, 2.0), dtype=torch.float32)
    assert float32.ALPHA.dtype == torch.float32 and torch.get_default_dtype() == torch.float32
    assert torch.allclose(paper.stages[1].term(X), float32.evaluate_true(X), rtol=1e-6, atol=1e-6)


def test_points_outside_the_stage_box_are_evaluated_by_the_same_formula():
    """A Tune param_space may move a stage outside its declared box; the term is
    then BoTorch's formula there too, on a box that holds the point."""
    assert math.isfinite(stage_term(1, [2.0, -2.0, 0.5]))  # a corner of the box
    cases = [
        (0, [5.0, 0.0], "paper", Beale, 2),  # Beale also outside BoTorch's [-4.5, 4.5]^2
        (0, [-6.0, 7.0], "paper", Beale, 2),
        (1, [2.5, 0.0, 0.0], "paper", Hartmann, 3),  # on [-2, 2]^3
        (2, [12.0, -1.0], "paper", Branin, 2),
    ]
    for k, values, layout, function, dim in cases:
        wide = _botorch(function, dim, (-20.0, 20.0))
        expected = float(wide.evaluate_true(torch.tensor([values], dtype=torch.double))[0])
        assert stage_term(k, values, layout) == expected, (function.__name__, values)
    # Ackley keeps the project's rounding order (see the Ackley test above).
    ackley = _botorch(Ackley, 3, (-20.0, 20.0))
    x = torch.tensor([[0.0, 5.5, 0.0]], dtype=torch.double)
    got = stage_term(3, [0.0, 5.5, 0.0], "front4") / get_layout("front4").stages[3].term_scale
    assert got == pytest.approx(float(ackley.evaluate_true(x)[0]), rel=1e-12)
    with pytest.raises(ValueError, match="takes 3 values per point, got 2"):
        get_layout("paper").stages[1].term(torch.zeros(2, dtype=torch.double))


def test_objective_and_costs_by_hand():
    config = {
        "stage1": {"x1": 2.0, "x2": -1.0},
        "stage2": {"x1": 0.5, "x2": -2.0, "x3": 1.0},
        "stage3": {"x1": 10.0, "x2": 0.0},
    }
    h1 = torch.tensor([2.0, -1.0], dtype=torch.double)
    h2 = torch.tensor([0.5, -2.0, 1.0], dtype=torch.double)
    h3 = torch.tensor([10.0, 0.0], dtype=torch.double)
    beale, branin = _botorch(Beale, 2), _botorch(Branin, 2)
    hartmann3 = _botorch(Hartmann, 3, (-2.0, 2.0))  # outside BoTorch's [0, 1]^3
    expected = -beale.evaluate_true(h1) - hartmann3.evaluate_true(h2) - branin.evaluate_true(h3)
    assert synthetic_objective(config) == pytest.approx(float(expected))
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


def test_botorch_terms_compare_and_pickle_by_value():
    # A pipeline's stages carry their Layout to Ray's workers: unpickled, a
    # built-in layout must still be the layout of its name.
    term = BoTorchTerm(Griewank, 3, (-3.0, 3.0))
    assert term == LAYOUTS["costly3"].stages[2].term
    for name, layout in LAYOUTS.items():
        clone = pickle.loads(pickle.dumps(layout))
        assert clone == layout and get_layout(clone) is clone
        config = _random_configs(layout, 1, seed=4)[0]
        assert synthetic_objective(config, clone) == synthetic_objective(config, name)
    assert torch.get_default_dtype() == torch.float32  # restored after building
    with pytest.raises(ValueError, match="has 2 dimensions, not 3"):
        BoTorchTerm(Branin, 3, (0.0, 10.0))
    with pytest.raises(ValueError, match="No global optimum"):
        BoTorchTerm(Beale, 2, (-6.0, -5.0))  # neither an optimum inside nor in BoTorch's domain
    with pytest.raises(ValueError, match=r"term on 3 dims in \(-3.0, 3.0\), stage has 2"):
        SyntheticStage("s", ("x1", "x2"), (0.0, 5.0), term, ((math.cos, 1.0, 1.0),) * 2)


# ------------------------------------------------------------------ layouts

NEW_LAYOUTS = ["front4", "back5", "flat4", "costly3"]


def _random_configs(layout: Layout, n: int, seed: int) -> list[dict[str, dict[str, float]]]:
    space = SearchSpace.from_tune(synthetic_space(layout), stage_order=layout.stage_names)
    return [space.from_unit(x) for x in space.sample(n, seed=seed)]


def test_paper_layout_keeps_the_historical_tables():
    paper = get_layout("paper")
    assert paper is LAYOUTS["paper"]
    assert (STAGES, STAGE_KEYS, STAGE_BOUNDS) == (
        ("stage1", "stage2", "stage3"),
        (("x1", "x2"), ("x1", "x2", "x3"), ("x1", "x2")),
        ((-2.0, 2.0), (-2.0, 2.0), (0.0, 10.0)),
    )
    assert [[(g.__name__, s, t) for g, s, t in terms] for terms in STAGE_COST_TERMS] == [
        [("_square", 18.0, 12.0), ("sin", 7.0, 26.0)],
        [("sin", 19.0, 39.0), ("sin", 16.0, 39.0), ("sin", 16.0, 20.0)],
        [("cos", 11.0, 11.0), ("cos", 15.0, 36.0)],
    ]
    assert paper.cost_terms == STAGE_COST_TERMS
    assert [(s.term.function, s.term_scale) for s in paper.stages] == [
        (Beale, 1.0),
        (Hartmann, 1.0),
        (Branin, 1.0),
    ]


@pytest.mark.parametrize("name", NEW_LAYOUTS)
def test_new_layout_terms_are_botorch_functions_inside_their_domains(name):
    layout = get_layout(name)
    generator = torch.Generator().manual_seed(1)
    for k, stage in enumerate(layout.stages):
        # BoTorch's class on its default domain, its constants in float32.
        theirs = _botorch(stage.term.function, len(stage.keys), dtype=torch.float32)
        assert theirs.dim == len(stage.keys)
        lo, hi = stage.bounds
        for d_lo, d_hi in theirs._bounds:  # the stage's box lies in BoTorch's domain
            assert d_lo <= lo < hi <= d_hi
        X = lo + (hi - lo) * torch.rand(20, theirs.dim, generator=generator, dtype=torch.double)
        expected = stage.term_scale * theirs.evaluate_true(X)
        got = [stage_term(k, x.tolist(), layout) for x in X]
        assert got == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-6)


def test_front4_objective_and_costs_by_hand():
    config = {
        "stage1": {"x1": 1.5, "x2": -0.5},
        "stage2": {"x1": 3.0, "x2": -7.0, "x3": 0.25},
        "stage3": {"x1": -1.0, "x2": 0.5},
        "stage4": {"x1": 2.0, "x2": -0.1, "x3": 4.0},
    }
    h = [torch.tensor(v, dtype=torch.double) for v in stage_values(config, "front4")]
    rosenbrock, levy = _botorch(Rosenbrock, 2), _botorch(Levy, 3)
    six_hump_camel, ackley = _botorch(SixHumpCamel, 2), _botorch(Ackley, 3)
    expected = (
        -float(rosenbrock.evaluate_true(h[0])) / 20
        - float(levy.evaluate_true(h[1]))
        - float(six_hump_camel.evaluate_true(h[2]))
    ) - float(ackley.evaluate_true(h[3]))
    assert synthetic_objective(config, "front4") == pytest.approx(expected, rel=1e-12)
    # Rosenbrock(1.5, -0.5) = 100 (-0.5 - 2.25)^2 + 0.5^2
    assert stage_term(0, [1.5, -0.5], "front4") == pytest.approx((756.25 + 0.25) / 20)

    def lg(x: float) -> float:
        return 1 / (1 + math.exp(-10 * x))

    c1 = ((15 * 1.5**2 + 9) ** 2 + (40 * lg(-0.5) + 12) ** 2) / (500 * 2)
    c2 = (
        (6 * math.sin(3.0) + 14) ** 2 + (5 * math.cos(-7.0) + 13) ** 2 + (8 * lg(0.25) + 10) ** 2
    ) / (500 * 3)
    c3 = ((6 * math.cos(-1.0) + 12) ** 2 + (3 * 0.5**2 + 11) ** 2) / (500 * 2)
    c4 = (
        (7 * math.sin(2.0) + 14) ** 2 + (9 * lg(-0.1) + 10) ** 2 + (5 * math.cos(4.0) + 13) ** 2
    ) / (500 * 3)
    assert synthetic_stage_costs(config, "front4") == pytest.approx([c1, c2, c3, c4])


def test_back5_objective_is_minus_the_sum_of_scaled_terms():
    config = _random_configs(get_layout("back5"), 1, seed=3)[0]
    h = [torch.tensor(v, dtype=torch.double) for v in stage_values(config, "back5")]
    terms = [Rastrigin, DixonPrice, ThreeHumpCamel, StyblinskiTang, Griewank]
    value = [float(_botorch(cls, len(x)).evaluate_true(x)) for cls, x in zip(terms, h, strict=True)]
    expected = -(value[0] + value[1] / 4 + value[2] + value[3] / 2 + 10 * value[4])
    assert synthetic_objective(config, "back5") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("paper", [2, 3, 2]),
        ("front4", [2, 3, 2, 3]),
        ("back5", [2, 3, 2, 2, 3]),
        ("flat4", [3, 2, 2, 3]),
        ("costly3", [2, 2, 3]),
    ],
)
def test_layout_spaces(name, dims):
    layout = get_layout(name)
    space = SearchSpace.from_tune(synthetic_space(name), stage_order=layout.stage_names)
    assert [len(space.dims_of_stage(k)) for k in range(len(dims))] == dims
    for corner, pick in ((torch.zeros, 0), (torch.ones, 1)):
        config = space.from_unit(corner(space.dim, dtype=torch.double))
        for stage in layout.stages:
            assert all(v == stage.bounds[pick] for v in config[stage.name].values())


@pytest.mark.parametrize(("name", "dominant"), [("front4", 0), ("back5", 4)])
def test_cost_dominance_and_typical_total(name, dominant):
    # Kind (a), deterministic: closed-form costs of seeded torch CPU draws (the same
    # on every machine): shares 0.66 / 0.67 in (0.55, 0.75), totals 3.8 / 4.0 in (3, 5).
    layout = get_layout(name)
    configs = _random_configs(layout, 256, seed=0)
    costs = torch.tensor([synthetic_stage_costs(c, name) for c in configs], dtype=torch.double)
    means = costs.mean(0)
    total = float(means.sum())
    print(f"{name}: mean stage costs {[round(float(m), 3) for m in means]}, total {total:.3f}")
    assert int(means.argmax()) == dominant
    assert 0.55 < float(means[dominant]) / total < 0.75
    assert 3.0 < total < 5.0  # 200 units buy ~40-70 trials
    assert bool((costs > 0).all())
    # The dominant stage's cost varies a lot across configurations (something to exploit).
    assert float(costs[:, dominant].max() / costs[:, dominant].min()) > 10.0


def test_flat4_costs_carry_almost_no_information():
    # Kind (a), deterministic: closed-form costs of seeded draws. By the formula a
    # stage's most and least expensive configurations differ by at most
    # (22.5 / 21.5)^2 = 1.095x, so a cost model can tell configurations apart by little.
    configs = _random_configs(get_layout("flat4"), 256, seed=0)
    costs = torch.tensor([synthetic_stage_costs(c, "flat4") for c in configs], dtype=torch.double)
    means = costs.mean(0)
    assert bool((costs.max(0).values / costs.min(0).values < (22.5 / 21.5) ** 2).all())
    assert bool(((means > 0.95) & (means < 1.0)).all())
    assert 3.8 < float(costs.sum(1).mean()) < 4.0


def test_costly3_best_configurations_are_the_expensive_ones():
    # Kind (a), deterministic: every term is minimal at the origin and every cost
    # term (s cos(h) + t)^2 maximal there; the best tenth of seeded random
    # configurations costs 1.6x the average (6.1 against 3.9).
    layout = get_layout("costly3")
    origin = {s.name: {key: 0.0 for key in s.keys} for s in layout.stages}
    assert synthetic_objective(origin, "costly3") == pytest.approx(0.0, abs=1e-12)
    configs = _random_configs(layout, 2000, seed=0)
    y = torch.tensor([synthetic_objective(c, "costly3") for c in configs], dtype=torch.double)
    total = torch.tensor(
        [sum(synthetic_stage_costs(c, "costly3")) for c in configs], dtype=torch.double
    )
    assert sum(synthetic_stage_costs(origin, "costly3")) > float(total.max())
    best = y.argsort(descending=True)[:200]
    assert float(total[best].mean()) > 1.4 * float(total.mean())


@pytest.mark.parametrize("name", ["paper", *NEW_LAYOUTS])
def test_test_function_terms_have_comparable_scales(name):
    # Kind (a), deterministic: closed-form terms of seeded draws (9 to 38 in (2, 60)).
    layout = get_layout(name)
    values = torch.tensor(
        [
            [stage_term(k, v, layout) for k, v in enumerate(stage_values(c, layout))]
            for c in _random_configs(layout, 256, seed=2)
        ],
        dtype=torch.double,
    )
    spread = values.abs().mean(0)
    print(f"{name}: mean |term| per stage {[round(float(s), 2) for s in spread]}")
    if name != "paper":  # the paper's Hartmann3 is ~0 outside its domain
        assert bool(((spread > 2.0) & (spread < 60.0)).all())


def test_logistic10():
    assert logistic10(0.0) == 0.5
    assert logistic10(0.3) == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert logistic10(-0.3) == pytest.approx(1 - logistic10(0.3))
    assert logistic10(-1000.0) == 0.0 and logistic10(1000.0) == 1.0  # no OverflowError


@pytest.mark.parametrize(
    "call",
    [
        lambda: synthetic_space("nope"),
        lambda: synthetic_objective({}, "nope"),
        lambda: synthetic_stage_costs({}, "nope"),
        lambda: stage_cost(0, [0.0, 0.0], "nope"),
        lambda: get_layout("nope"),
    ],
)
def test_unknown_layout_names_the_value_and_the_known_layouts(call):
    with pytest.raises(
        ValueError, match=r"unknown synthetic layout 'nope'.*'back5', 'costly3', 'flat4', 'front4'"
    ):
        call()


def test_layout_validation():
    branin = BoTorchTerm(Branin, 2, (0.0, 10.0))
    with pytest.raises(ValueError, match="1 cost terms for 2 hyperparameters"):
        SyntheticStage("s", ("x1", "x2"), (0.0, 10.0), branin, ((math.cos, 1.0, 1.0),))
    with pytest.raises(ValueError, match="finite lo < hi"):
        SyntheticStage("s", ("x1",), (1.0, 1.0), branin, ((math.cos, 1.0, 1.0),))
    with pytest.raises(ValueError, match="unique"):
        Layout("twice", (LAYOUTS["paper"].stages[0], LAYOUTS["paper"].stages[0]))
    with pytest.raises(ValueError, match="out of range"):
        stage_cost(3, [0.0, 0.0])
    with pytest.raises(ValueError, match="stage 1 takes 3 values, got 2"):
        stage_term(1, [0.0, 0.0], "front4")
    # A custom layout works by object, but not under a built-in name.
    custom = Layout("tiny", LAYOUTS["front4"].stages[:2])
    config = _random_configs(custom, 1, seed=0)[0]
    assert synthetic_stage_costs(config, custom) == [
        stage_cost(k, values, "front4") for k, values in enumerate(stage_values(config, custom))
    ]
    with pytest.raises(ValueError, match="give it another name"):
        get_layout(Layout("paper", LAYOUTS["front4"].stages))


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


def test_eeipu_completes_more_iterations_than_ei_within_the_budget():
    # Kind (a), by margin. A trajectory hangs on GP fits and L-BFGS optima, so a
    # machine that rounds differently may follow another one; each seed is such a
    # draw. At this budget (100 units), over seeds 0-8, EEIPU ran 5 to 12 (mean
    # 8.1, sd 2.4) more BO iterations than EI on the same seed: one seed alone
    # would flip about once in 3,000 draws, the sum over three seeds (a margin of
    # about six sd) practically never. The budget and reuse checks are structural
    # (a trial costs at most ~16.3 units; EI would need two trials with
    # bit-identical stage-1 values to load a prefix).
    budget = 100.0
    eeipu_iterations = ei_iterations = 0
    for seed in (0, 1, 2):
        eeipu = simulate("eeipu", seed, budget)
        ei = simulate("ei", seed, budget)
        for name, res in (("EEIPU", eeipu), ("EI", ei)):
            print(
                f"seed {seed} {name}: {res.bo_iterations} BO iterations after warm-up, "
                f"best objective {res.best:.3f}, {res.memoized_trials} trials reused a prefix, "
                f"spent {res.budget_spent:.3f}"
            )
            assert res.budget_spent == pytest.approx(res.charged, rel=1e-12)
            assert budget <= res.budget_spent < budget + 20.0  # stops after the one that crosses
        assert eeipu.memoized_trials > 0 and ei.memoized_trials == 0
        eeipu_iterations += eeipu.bo_iterations
        ei_iterations += ei.bo_iterations
    assert eeipu_iterations > ei_iterations
