"""The search-space encoder: Ray Tune domains <-> unit cube."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ray import tune

from eeipu_ray.search.errors import SearchSpaceError
from eeipu_ray.search.space import SearchSpace

# (id, domain, python type, every value the domain can produce (or a sample),
#  expected cube coordinate of some values)
DOMAINS = [
    ("uniform", tune.uniform(-2.0, 6.0), float, [-2.0, 0.0, 2.0, 6.0], {-2.0: 0.0, 2.0: 0.5}),
    ("loguniform", tune.loguniform(1.0, 100.0), float, [1.0, 10.0, 100.0], {10.0: 0.5}),
    (
        "quniform",
        tune.quniform(0.0, 1.0, 0.25),
        float,
        [0.0, 0.25, 0.5, 0.75, 1.0],
        {0.0: 0.1, 0.5: 0.5, 1.0: 0.9},
    ),
    ("qloguniform", tune.qloguniform(1e-3, 1.0, 1e-3), float, [0.001, 0.01, 0.5, 1.0], {}),
    ("randint", tune.randint(0, 4), int, [0, 1, 2, 3], {0: 0.125, 3: 0.875}),
    ("randint_one", tune.randint(3, 4), int, [3], {3: 0.5}),
    ("qrandint", tune.qrandint(0, 10, 5), int, [0, 5, 10], {0: 1 / 6, 5: 0.5, 10: 5 / 6}),
    ("qrandint_q1", tune.qrandint(0, 3), int, [0, 1, 2], {1: 0.5}),
    ("lograndint", tune.lograndint(1, 10), int, list(range(1, 10)), {}),
    ("qlograndint", tune.qlograndint(2, 64, 2), int, [2, 4, 32, 64], {}),
    (
        "choice",
        tune.choice(["a", "b", "c"]),
        str,
        ["a", "b", "c"],
        {"a": 1 / 6, "b": 0.5, "c": 5 / 6},
    ),
    ("choice_one", tune.choice([7]), int, [7], {7: 0.5}),
    ("uniform_zero_width", tune.uniform(1.5, 1.5), float, [1.5], {1.5: 0.5}),
]


def _one(domain) -> SearchSpace:
    return SearchSpace.from_tune({"s": {"k": domain}})


@pytest.mark.parametrize(
    ("name", "domain", "typ", "values", "coords"), DOMAINS, ids=[d[0] for d in DOMAINS]
)
def test_round_trip_every_value(name, domain, typ, values, coords):
    space = _one(domain)
    assert space.dim == 1
    for value in values:
        x = space.to_unit({"s": {"k": value}})
        assert 0.0 <= float(x[0]) <= 1.0
        back = space.from_unit(x)["s"]["k"]
        assert type(back) is typ
        if typ is float:
            assert back == pytest.approx(value, rel=1e-12, abs=1e-12)
        else:
            assert back == value
    for value, coord in coords.items():
        assert float(space.to_unit({"s": {"k": value}})[0]) == pytest.approx(coord)


@pytest.mark.parametrize(
    ("name", "domain", "typ", "values", "coords"), DOMAINS, ids=[d[0] for d in DOMAINS]
)
def test_values_ray_samples_round_trip(name, domain, typ, values, coords):
    """What Ray's own sampler produces is inside the cube and decodes to itself."""
    space = _one(domain)
    sampled = domain.sample(size=300, random_state=np.random.default_rng(0))
    for sample in sampled:
        value = sample.item() if hasattr(sample, "item") else sample
        back = space.from_unit(space.to_unit({"s": {"k": value}}))["s"]["k"]
        if typ is float:
            assert back == pytest.approx(value, rel=1e-9, abs=1e-12)
        else:
            assert back == value


@pytest.mark.parametrize(
    ("name", "domain", "typ", "values", "coords"), DOMAINS, ids=[d[0] for d in DOMAINS]
)
def test_uniform_cube_points_cover_exactly_the_values(name, domain, typ, values, coords):
    """Decoding a fine grid of the cube yields values of the domain only, and for
    finite domains every value (integers padded by half a step: equal shares)."""
    space = _one(domain)
    grid = torch.linspace(0, 1, 2001, dtype=torch.double)
    decoded = [space.from_unit(torch.tensor([u]))["s"]["k"] for u in grid]
    if name in ("randint", "qrandint", "qrandint_q1", "choice", "quniform"):
        counts = {v: decoded.count(v) for v in values}
        assert set(decoded) == set(values)
        share = 2001 / len(values)
        assert all(abs(c - share) <= 2 for c in counts.values()), counts
    if name in ("lograndint", "qlograndint"):
        lo, hi = min(values), max(values)
        assert all(lo <= v <= hi for v in decoded)
        assert {lo, hi} <= set(decoded)


NESTED = {
    "prep": {
        "n": tune.randint(1, 10),
        "q": tune.qrandint(0, 10, 2),
        "lq": tune.qloguniform(1e-3, 1.0, 1e-3),
        "seed": 123,
        "name": "fixed",
    },
    "train": {
        "lr": tune.loguniform(1e-4, 1e-1),
        "opt": tune.choice(["sgd", "adam", ("tuple", 1)]),
        "layers": tune.lograndint(1, 64),
        "drop": tune.quniform(0.0, 0.5, 0.1),
    },
    "eval": {"batch": tune.choice([32, 64]), "w": tune.uniform(-1, 1)},
}


def test_structure_and_constants():
    space = SearchSpace.from_tune(NESTED)
    assert space.stage_names == ["prep", "train", "eval"]
    assert space.dim == 9
    assert space.dims_of_stage(0) == [0, 1, 2]
    assert space.dims_of_stage(1) == [3, 4, 5, 6]
    assert space.dims_of_prefix(2) == list(range(7))
    assert space.stage_of_dim.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert space.categorical_dims == [4, 7]
    assert space.is_categorical.tolist() == [i in (4, 7) for i in range(9)]
    config = space.from_unit(torch.full((9,), 0.5, dtype=torch.double))
    assert list(config) == ["prep", "train", "eval"]
    assert list(config["prep"]) == ["n", "q", "lq", "seed", "name"]  # the space's key order
    assert config["prep"]["seed"] == 123 and config["prep"]["name"] == "fixed"


def test_stage_order_reorders_and_is_checked():
    space = SearchSpace.from_tune(NESTED, stage_order=["eval", "prep", "train"])
    assert space.stage_names == ["eval", "prep", "train"]
    assert space.dims_of_stage(0) == [0, 1]
    with pytest.raises(SearchSpaceError, match="stage_order"):
        SearchSpace.from_tune(NESTED, stage_order=["prep", "train"])


def test_flat_space_is_one_stage():
    space = SearchSpace.from_tune({"lr": tune.loguniform(1e-4, 1e-1), "epochs": 3})
    assert not space.nested and space.n_stages == 1 and space.dim == 1
    config = space.from_unit(torch.tensor([0.5]))
    assert config["epochs"] == 3 and isinstance(config["lr"], float)
    assert space.to_unit(config).tolist() == pytest.approx([0.5])


def test_to_unit_accepts_flat_keys_and_ignores_extras():
    space = SearchSpace.from_tune({"a": {"x": tune.uniform(0, 1)}, "b": {"y": tune.uniform(0, 2)}})
    x = space.to_unit({"a/x": 0.25, "b": {"y": 1.0}, "other": 5})
    assert x.tolist() == pytest.approx([0.25, 0.5])


def test_to_unit_errors_name_the_key():
    space = SearchSpace.from_tune(NESTED)
    config = space.from_unit(torch.full((9,), 0.5, dtype=torch.double))
    del config["train"]["lr"]
    with pytest.raises(SearchSpaceError, match="train/lr"):
        space.to_unit(config)
    config = space.from_unit(torch.full((9,), 0.5, dtype=torch.double))
    config["train"]["opt"] = "rmsprop"
    with pytest.raises(SearchSpaceError, match="train/opt"):
        space.to_unit(config)
    config["train"]["opt"] = "sgd"
    config["eval"]["w"] = "high"
    with pytest.raises(SearchSpaceError, match="eval/w"):
        space.to_unit(config)


def test_out_of_bounds_values_clip_to_the_cube():
    space = SearchSpace.from_tune({"s": {"u": tune.uniform(0, 1), "i": tune.randint(0, 5)}})
    assert space.to_unit({"s": {"u": 7.0, "i": -3}}).tolist() == pytest.approx([1.0, 0.1])


@pytest.mark.parametrize(
    ("domain", "match"),
    [
        (tune.grid_search([1, 2]), "grid_search"),
        (tune.sample_from(lambda _: 1), "sample_from"),
        (tune.randn(0, 1), "unbounded"),
        (tune.qrandn(0, 1, 0.1), "unbounded"),
        ({"inner": tune.uniform(0, 1)}, "nested"),
    ],
    ids=["grid_search", "sample_from", "randn", "qrandn", "nested"],
)
def test_rejected_domains_name_the_key(domain, match):
    with pytest.raises(SearchSpaceError, match=match) as info:
        SearchSpace.from_tune({"train": {"bad": domain, "ok": tune.uniform(0, 1)}})
    assert "train/bad" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_flat_grid_search_rejected_with_its_key():
    with pytest.raises(SearchSpaceError, match="'bad'"):
        SearchSpace.from_tune({"bad": tune.grid_search([1, 2]), "lr": tune.uniform(0, 1)})


def _check_config(space: SearchSpace, config: dict) -> None:
    nested = NESTED
    for stage, sub in nested.items():
        for key, domain in sub.items():
            value = config[stage][key]
            if not hasattr(domain, "sample"):
                assert value == domain
                continue
            if key in ("opt", "batch"):
                assert any(value is c for c in domain.categories)
            elif key in ("n", "q", "layers"):
                assert type(value) is int
                assert domain.lower <= value <= domain.upper
            else:
                assert type(value) is float
                assert domain.lower <= value <= domain.upper


def test_random_cube_points_decode_inside_bounds_and_reencode_idempotently():
    space = SearchSpace.from_tune(NESTED)
    X = space.sample(1000, seed=3)
    assert X.shape == (1000, 9) and X.dtype == torch.double
    for x in X:
        config = space.from_unit(x)
        _check_config(space, config)
        x1 = space.to_unit(config)
        config1 = space.from_unit(x1)
        assert space.to_unit(config1).tolist() == pytest.approx(x1.tolist(), abs=1e-12)
        for stage in config:
            for key, value in config[stage].items():
                if isinstance(value, float):
                    assert config1[stage][key] == pytest.approx(value, rel=1e-12, abs=1e-15)
                else:
                    assert config1[stage][key] == value
    # Categorical choices come back as the very objects of the space.
    tup = NESTED["train"]["opt"].categories[2]
    config = space.from_unit(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.99, 0.5, 0.5, 0.5, 0.5]))
    assert config["train"]["opt"] is tup


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=9, max_size=9))
def test_hypothesis_decode_encode_is_a_projection(coords):
    space = SearchSpace.from_tune(NESTED)
    x = torch.tensor(coords, dtype=torch.double)
    x1 = space.to_unit(space.from_unit(x))
    assert ((x1 >= 0) & (x1 <= 1)).all()
    x2 = space.to_unit(space.from_unit(x1))
    assert torch.allclose(x1, x2, atol=1e-12)
    # snap agrees with the projection on grid / categorical coordinates
    snapped = space.snap(x1.unsqueeze(0))[0]
    assert torch.allclose(snapped, x1, atol=1e-9)


def test_snap_maps_a_cell_to_its_center():
    space = SearchSpace.from_tune(
        {"s": {"i": tune.randint(0, 4), "c": tune.choice("ab"), "u": tune.uniform(0, 1)}}
    )
    X = torch.tensor([[0.01, 0.9, 0.3], [0.24, 0.1, 0.7]], dtype=torch.double)
    expected = torch.tensor([[0.125, 0.75, 0.3], [0.125, 0.25, 0.7]], dtype=torch.double)
    assert torch.allclose(space.snap(X), expected)


def test_sobol_and_sample_are_reproducible():
    space = SearchSpace.from_tune(NESTED)
    assert torch.equal(space.sample(5, seed=1), space.sample(5, seed=1))
    assert torch.equal(space.sobol(4, seed=2)[2:], space.sobol(2, seed=2, skip=2))


def test_signature_changes_with_the_space():
    a = SearchSpace.from_tune({"s": {"k": tune.uniform(0, 1)}})
    b = SearchSpace.from_tune({"s": {"k": tune.uniform(0, 2)}})
    assert a.signature() != b.signature()
    assert a.signature() == SearchSpace.from_tune({"s": {"k": tune.uniform(0, 1)}}).signature()


def test_log_domain_needs_positive_value():
    space = _one(tune.loguniform(1e-3, 1.0))
    with pytest.raises(SearchSpaceError, match="s/k"):
        space.to_unit({"s": {"k": 0.0}})
    assert math.isclose(float(space.to_unit({"s": {"k": 1e-3}})[0]), 0.0, abs_tol=1e-12)


@pytest.mark.parametrize(("lower", "upper"), [(1e-3, 1e2), (1e-5, 1.0), (0.3, 7.7)])
def test_log_float_decodes_within_declared_bounds(lower, upper):
    # exp(log(upper)) can round one ulp above upper; a library that checks its
    # bounds strictly (an optimizer's learning rate) would then refuse the value.
    space = SearchSpace.from_tune({"lr": tune.loguniform(lower, upper)})
    for u in (0.0, 1.0, 1.0 - 1e-17):
        value = space.from_unit(torch.tensor([u], dtype=torch.double))["lr"]
        assert lower <= value <= upper
    assert space.from_unit(torch.tensor([1.0], dtype=torch.double))["lr"] == upper
    assert space.from_unit(torch.tensor([0.0], dtype=torch.double))["lr"] == pytest.approx(lower)
