"""The one recognizer of Ray Tune search-space entries (eeipu_ray._domains)."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import pytest
from ray import tune

from eeipu_ray._domains import is_domain, is_grid_search, is_tunable, mentions_domain

DOMAINS = {
    "uniform": tune.uniform(0, 1),
    "quniform": tune.quniform(0, 1, 0.1),
    "loguniform": tune.loguniform(1e-4, 1e-1),
    "qloguniform": tune.qloguniform(1e-4, 1e-1, 1e-4),
    "randint": tune.randint(0, 9),
    "qrandint": tune.qrandint(0, 9, 3),
    "lograndint": tune.lograndint(1, 100),
    "randn": tune.randn(0, 1),
    "choice": tune.choice([1, "a", None]),
    "sample_from": tune.sample_from(lambda spec: 1),
}

NON_DOMAINS = {
    "int": 3,
    "float": 0.5,
    "bool": True,
    "string": "uniform",
    "none": None,
    "empty dict": {},
    "dict": {"lower": 0, "upper": 1},
    "list": [1, 2],
    "list of domains": [tune.uniform(0, 1)],
    "tuple": (0, 1),
    "domain class": type(tune.uniform(0, 1)),
    "grid_search with another key": {"grid_search": [1, 2], "x": 1},
}


@pytest.mark.parametrize("value", list(DOMAINS.values()), ids=list(DOMAINS))
def test_tune_domains_are_domains(value):
    assert is_domain(value)
    assert is_tunable(value)
    assert not is_grid_search(value)
    assert mentions_domain(value)


def test_grid_search_is_tunable_but_not_a_domain_object():
    grid = tune.grid_search([1, 2])
    assert is_grid_search(grid)
    assert is_tunable(grid)
    assert mentions_domain(grid)
    assert not is_domain(grid)
    # Any mapping with the single key counts, whatever its type.
    assert is_grid_search(OrderedDict(grid_search=[3]))


@pytest.mark.parametrize("value", list(NON_DOMAINS.values()), ids=list(NON_DOMAINS))
def test_constants_are_not_domains(value):
    assert not is_domain(value)
    assert not is_grid_search(value)
    assert not is_tunable(value)


def test_a_class_named_domain_outside_ray_is_not_a_tune_domain():
    class Domain:
        pass

    class Float(Domain):
        pass

    assert not is_domain(Float())
    assert not mentions_domain({"x": Float()})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"model": {"lr": tune.uniform(0, 1), "seed": 0}}, True),
        ({"a": {"b": {"c": tune.choice([1, 2])}}}, True),
        ({"a": {"b": tune.grid_search([1, 2])}}, True),
        ({"model": {"lr": 0.1, "layers": [1, 2]}, "seed": 0}, False),
        ({}, False),
        ({"grid": {"values": [1, 2]}}, False),
        # Only mappings are searched: Tune resolves no domain inside a list.
        ({"a": [tune.uniform(0, 1)]}, False),
        (None, False),
    ],
)
def test_mentions_domain_searches_nested_mappings(value, expected):
    assert mentions_domain(value) is expected


def test_the_recognizer_never_imports_ray():
    code = (
        "import sys\n"
        "from eeipu_ray._domains import is_domain, is_tunable, mentions_domain\n"
        "assert not is_domain(1.0) and not is_domain({'a': 1})\n"
        "assert is_tunable({'grid_search': [1]})\n"
        "assert mentions_domain({'s': {'x': {'grid_search': [1]}}})\n"
        "assert not mentions_domain({'s': {'x': 1}})\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "import eeipu_ray.pipeline\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_pipeline_search_space_and_reporter_agree():
    from eeipu_ray.pipeline import Pipeline, Stage
    from eeipu_ray.search.space import SearchSpace
    from eeipu_ray.tune.progress import tuned_parameter_columns

    space = {
        "prep": {"n": tune.randint(1, 5), "mode": "fast"},
        "train": {"lr": tune.loguniform(1e-3, 1.0), "opt": tune.choice(["a", "b"]), "k": 2},
    }
    pipeline = Pipeline(
        "agree",
        [
            Stage("prep", lambda _, hp: hp["n"], space["prep"]),
            Stage("train", lambda n, hp: n, space["train"]),
        ],
    )
    tuned = {"prep/n", "train/lr", "train/opt"}
    assert set(tuned_parameter_columns(pipeline.search_space)) == tuned
    assert {d.name for d in SearchSpace.from_tune(pipeline.search_space).dims} == tuned
    # The pipeline asks for exactly the tuned keys and fills in the constants.
    config = {"prep": {"n": 2}, "train": {"lr": 0.1, "opt": "a"}}
    assert pipeline.split_config(config) == [
        {"n": 2, "mode": "fast"},
        {"lr": 0.1, "opt": "a", "k": 2},
    ]
