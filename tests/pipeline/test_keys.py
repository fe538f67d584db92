"""Prefix keys: deterministic, exact, order-insensitive, stable across processes."""

from __future__ import annotations

import enum
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray import tune

from eeipu_ray.errors import PrefixKeyError
from eeipu_ray.pipeline import Pipeline, Stage, canonicalize, chain_key, check_key, root_key

HEX64 = re.compile(r"[0-9a-f]{64}")
REPO = Path(__file__).resolve().parents[2]


def fn(inputs, params):
    return inputs


def pipeline(name: str = "toy", versions: tuple[str, str, str] = ("1", "1", "1")) -> Pipeline:
    return Pipeline(
        name,
        [
            Stage("prep", fn, {"n": tune.randint(1, 10), "opts": {}}, version=versions[0]),
            Stage("train", fn, {"lr": tune.uniform(0, 1)}, version=versions[1]),
            Stage("eval", fn, {"k": tune.choice([1, 2])}, version=versions[2]),
        ],
    )


CONFIG = {
    "prep": {"n": 3, "opts": {"b": [1, 2.5, None], "a": {"y": True, "x": "s"}}},
    "train": {"lr": 0.1},
    "eval": {"k": 2},
}


def key1(value) -> str:
    """Key of a one-stage prefix whose single hyperparameter is ``value``."""
    return chain_key(root_key("p"), 1, "s", "1", {"v": value})


# ---------------------------------------------------------------- basics
def test_keys_are_64_lowercase_hex_and_deterministic():
    keys = pipeline().prefix_keys(CONFIG)
    assert len(keys) == 3
    assert all(HEX64.fullmatch(k) for k in keys)
    assert keys == pipeline().prefix_keys(CONFIG)
    assert HEX64.fullmatch(root_key("toy"))


def test_insensitive_to_dict_order_including_nested():
    reordered = {
        "eval": {"k": 2},
        "train": {"lr": 0.1},
        "prep": {"opts": {"a": {"x": "s", "y": True}, "b": [1, 2.5, None]}, "n": 3},
    }
    assert pipeline().prefix_keys(reordered) == pipeline().prefix_keys(CONFIG)
    assert key1({"a": 1, "b": {"c": 2, "d": 3}}) == key1({"b": {"d": 3, "c": 2}, "a": 1})


def test_list_order_matters():
    assert key1([1, 2]) != key1([2, 1])


def test_floats_are_exact():
    assert 0.1 + 0.2 != 0.3
    assert key1(0.1 + 0.2) != key1(0.3)
    assert key1(-0.0) != key1(0.0)
    assert key1(1.0) != key1(1.0 + 2**-52)  # adjacent doubles
    assert key1(float("inf")) != key1(float("-inf"))
    assert key1(float("inf")) == key1(float("inf"))


def test_type_tagged_scalars_differ():
    keys = {key1(1), key1(1.0), key1(True), key1("1"), key1(None), key1([1]), key1({"1": 1})}
    assert len(keys) == 7
    assert key1(0) != key1(False)
    assert key1("") != key1(None)


def test_tuple_and_list_are_the_same_sequence():
    # Ray Tune and JSON do not keep tuples apart from lists.
    assert key1((1, 2)) == key1([1, 2])


@pytest.mark.parametrize(
    "np_value, py_value",
    [
        (np.int64(3), 3),
        (np.int32(-7), -7),
        (np.uint8(200), 200),
        (np.float64(0.1), 0.1),
        (np.float32(0.5), 0.5),
        (np.bool_(True), True),
        (np.str_("adam"), "adam"),
        (np.array(2.5), 2.5),
    ],
)
def test_numpy_scalars_equal_python_scalars(np_value, py_value):
    assert key1(np_value) == key1(py_value)
    assert key1([np_value]) == key1([py_value])
    assert canonicalize(np_value) == canonicalize(py_value)


def test_int_subclasses_key_as_their_value():
    class Color(enum.IntEnum):
        RED = 4

    assert key1(Color.RED) == key1(4)


def test_nan_raises_naming_stage_and_key():
    with pytest.raises(PrefixKeyError) as info:
        chain_key(root_key("p"), 1, "train", "1", {"lr": float("nan")})
    msg = str(info.value)
    assert "'train'" in msg and "'lr'" in msg and "NaN" in msg
    with pytest.raises(PrefixKeyError, match=r"'train'.*'opt'.*NaN"):
        chain_key(root_key("p"), 1, "train", "1", {"opt": {"beta": [0.9, np.nan]}})


@pytest.mark.parametrize(
    "value",
    [b"bytes", {1, 2}, object(), np.arange(3), {1: "int key"}, Path("/tmp"), 1j],
    ids=["bytes", "set", "object", "ndarray", "int-dict-key", "path", "complex"],
)
def test_unsupported_types_raise_naming_stage_and_key(value):
    with pytest.raises(PrefixKeyError) as info:
        chain_key(root_key("p"), 2, "prep", "1", {"bad": value})
    msg = str(info.value)
    assert "'prep'" in msg and "'bad'" in msg


def test_pipeline_prefix_keys_reports_stage_and_key():
    cfg = {**CONFIG, "train": {"lr": float("nan")}}
    with pytest.raises(PrefixKeyError, match=r"'train'.*'lr'"):
        pipeline().prefix_keys(cfg)


def test_non_string_hyperparameter_name_raises():
    with pytest.raises(PrefixKeyError, match=r"'prep'"):
        chain_key(root_key("p"), 1, "prep", "1", {1: 1})


# ------------------------------------------------------------- chaining
def test_version_bump_changes_that_stage_and_later_only():
    base = pipeline().prefix_keys(CONFIG)
    bumped = pipeline(versions=("1", "2", "1")).prefix_keys(CONFIG)
    assert bumped[0] == base[0]
    assert bumped[1] != base[1]
    assert bumped[2] != base[2]


def test_param_change_changes_that_stage_and_later_only():
    base = pipeline().prefix_keys(CONFIG)
    changed = pipeline().prefix_keys({**CONFIG, "train": {"lr": 0.2}})
    assert changed[0] == base[0] and changed[1] != base[1] and changed[2] != base[2]
    last = pipeline().prefix_keys({**CONFIG, "eval": {"k": 1}})
    assert last[:2] == base[:2] and last[2] != base[2]


def test_pipeline_name_is_part_of_every_key():
    a = pipeline("alpha").prefix_keys(CONFIG)
    b = pipeline("beta").prefix_keys(CONFIG)
    assert all(x != y for x, y in zip(a, b, strict=True))
    assert root_key("alpha") != root_key("beta")


def test_stage_name_and_index_are_part_of_the_key():
    root = root_key("p")
    assert chain_key(root, 1, "a", "1", {}) != chain_key(root, 1, "b", "1", {})
    assert chain_key(root, 1, "a", "1", {}) != chain_key(root, 2, "a", "1", {})


def test_chain_key_checks_parent():
    with pytest.raises(PrefixKeyError):
        chain_key("../etc", 1, "a", "1", {})


# ------------------------------------------------------------ check_key
@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a/b",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "a" * 64 + "\n",
        "/" + "a" * 63,
        "g" * 64,
        "",
        None,
        b"a" * 64,
    ],
)
def test_check_key_rejects(bad):
    with pytest.raises(PrefixKeyError):
        check_key(bad)


def test_check_key_accepts_real_keys():
    for key in pipeline().prefix_keys(CONFIG):
        assert check_key(key) == key


# -------------------------------------------------------- cross-process
_CHILD = textwrap.dedent(
    """
    import json, sys
    from eeipu_ray.pipeline import Pipeline, Stage

    def fn(inputs, params):
        return inputs

    order = sys.argv[1]
    # insertion orders differ between the two children (and from the parent)
    if order == "forward":
        cfg = {"prep": {"n": 3, "opts": {"b": [1, 2.5, None], "a": {"y": True, "x": "s"}}},
               "train": {"lr": 0.1}, "eval": {"k": 2}}
    else:
        cfg = {"eval": {"k": 2}, "train": {"lr": 0.1},
               "prep": {"opts": {"a": {"x": "s", "y": True}, "b": [1, 2.5, None]}, "n": 3}}
    p = Pipeline("toy", [
        Stage("prep", fn, {"n": 0, "opts": {}}),
        Stage("train", fn, {"lr": 0.0}),
        Stage("eval", fn, {"k": 0}),
    ])
    print(json.dumps(p.prefix_keys(cfg)))
    """
)


def _keys_in_child(hashseed: str, order: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, order],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keys_identical_across_processes_and_hash_seeds():
    first = _keys_in_child("1", "forward")
    second = _keys_in_child("4242", "reversed")
    assert first == second
    assert first == pipeline().prefix_keys(CONFIG)


# ------------------------------------------------------------ properties
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(alphabet=st.sampled_from("ab/.\\ü\x00-_"), max_size=8)
    | st.sampled_from(["../", "../../etc/passwd", "/abs/path", "a/b"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
hp_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True)


def _shuffled(value, rng: random.Random):
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@settings(max_examples=150, deadline=None)
@given(params=st.dictionaries(hp_names, json_values, max_size=5), seed=st.integers(0, 2**32))
def test_property_key_ignores_dict_order_and_hides_values(params, seed):
    root = root_key("prop")
    key = chain_key(root, 1, "stage", "1", params)
    assert key == chain_key(root, 1, "stage", "1", _shuffled(params, random.Random(seed)))
    assert HEX64.fullmatch(key)
    assert check_key(key) == key
    for s in _strings(params):
        if "/" in s:
            assert s not in key
