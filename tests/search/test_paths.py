"""PathLayout: nested search spaces as flat "a/b" keys and back."""

from __future__ import annotations

from typing import Any

import pytest
from ray import tune

from eeipu_ray.search import SearchSpace, SearchSpaceError
from eeipu_ray.search.paths import PathLayout

LR = tune.loguniform(1e-4, 1e-1)
DEPTH = tune.randint(1, 5)


@pytest.mark.parametrize(
    ("space", "flat_keys"),
    [
        ({"x": LR}, ["x"]),
        ({"a/b": LR}, ["a/b"]),  # a flat key with "/" stays one key
        ({"model": {"lr": LR}, "bs": 8}, ["model/lr", "bs"]),
        ({"m": {"n": {"o": {"p": DEPTH}}}, "c": {"k": 1}}, ["m/n/o/p", "c/k"]),
        ({"empty": {}, "g": {"grid_search": [1, 2]}}, ["empty", "g"]),  # leaves
    ],
)
def test_flat_keys_follow_the_paths_in_order(space: dict[str, Any], flat_keys: list[str]) -> None:
    layout = PathLayout.of(space)
    assert list(layout.flat_space) == flat_keys
    assert layout.is_flat == all(len(p) == 1 for p in layout.paths.values())


def test_nest_restores_the_shape_constants_and_key_order() -> None:
    space = {"z": {"lr": LR, "const": [1, 2]}, "a": DEPTH, "deep": {"x": {"y": "keep"}}}
    layout = PathLayout.of(space)
    flat = {"z/lr": 0.01, "z/const": [1, 2], "a": 3, "deep/x/y": "keep"}
    nested = layout.nest(flat)
    assert nested == {"z": {"lr": 0.01, "const": [1, 2]}, "a": 3, "deep": {"x": {"y": "keep"}}}
    assert list(nested) == ["z", "a", "deep"]
    nested["z"]["const"].append(3)  # a copy: the flat config is not shared
    assert flat["z/const"] == [1, 2]


def test_flatten_reads_nested_flat_and_mixed_configs() -> None:
    layout = PathLayout.of({"model": {"lr": LR, "depth": DEPTH}, "bs": 8})
    want = {"model/lr": 0.1, "model/depth": 2, "bs": 8}
    assert layout.flatten({"model": {"lr": 0.1, "depth": 2}, "bs": 8}) == want
    assert layout.flatten(want) == want
    assert layout.flatten({"model": {"lr": 0.1}, "model/depth": 2, "bs": 8, "extra": 1}) == want
    assert layout.flatten({"bs": 8}) == {"bs": 8}  # missing entries are left to the encoder


def test_the_encoder_round_trips_a_flattened_space() -> None:
    space = {"model": {"lr": LR, "layers": {"depth": DEPTH}}, "opt": tune.choice(["a", "b"])}
    layout = PathLayout.of(space)
    encoder = SearchSpace.from_tune(layout.flat_space)
    for x in encoder.sobol(8, seed=1):
        config = layout.nest(encoder.from_unit(x))
        assert set(config) == {"model", "opt"} and type(config["model"]["layers"]["depth"]) is int
        again = encoder.from_unit(encoder.to_unit(layout.flatten(config)))
        assert layout.nest(again) == config


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"a/b": 1, "a": {"b": LR}}, "both flatten to 'a/b'"),
        ({"a": {1: LR}}, "key 1 under 'a' must be a non-empty string"),
        ({"": LR}, "key '' under the top level"),
        ([("x", LR)], "must be a mapping"),
    ],
)
def test_bad_spaces_are_named(space: Any, message: str) -> None:
    with pytest.raises(SearchSpaceError, match=message):
        PathLayout.of(space)
