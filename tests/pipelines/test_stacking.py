"""The built-in stacking pipeline, run tiny against a real local PrefixCache."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from eeipu_ray.cache import PrefixCache
from eeipu_ray.pipeline import Pipeline, StageContext
from eeipu_ray.pipelines import load_pipeline, stacking
from eeipu_ray.search.space import SearchSpace

TINY = {"n_samples": 400, "n_features": 8, "folds": 3, "max_trees": 10}
CONFIG = {
    "data": {"scaling": "quantile", "n_features_kept": 4},
    "base": {
        "forest_trees": 10,
        "forest_min_leaf": 1,
        "boosting_lr": 0.1,
        "boosting_iters": 10,
        "logistic_C": 1.0,
        "knn_k": 15,
    },
    "meta": {"C": 1.0, "meta_input": "log_proba", "passthrough": False},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # HistGradientBoosting's OpenMP threads spin-wait; on a busy 2-core CI box
    # a tiny fit can take seconds instead of milliseconds.
    with threadpool_limits(limits=1):
        yield


@pytest.fixture
def pipeline() -> Pipeline:
    return load_pipeline("stacking", **TINY)


@pytest.fixture
def cache(tmp_path) -> PrefixCache:
    return PrefixCache(str(tmp_path / "cache"))


def with_meta(**meta) -> dict:
    config = copy.deepcopy(CONFIG)
    config["meta"].update(meta)
    return config


def test_builtin_registration_stage_order_and_pickling(pipeline):
    assert pipeline.name == "stacking"
    # Ray ships the pipeline to its workers: module-level stage functions pickle.
    clone = pickle.loads(pickle.dumps(pipeline))
    assert clone.prefix_keys(CONFIG) == pipeline.prefix_keys(CONFIG)
    assert pipeline.stage_names == ["data", "base", "meta"]


def test_scores_beat_chance(pipeline):
    # Kind (a), by margin: seeded learners, measured 0.65 accuracy, 0.81 AUC and
    # 0.69 best base accuracy (15+ of 100 validation rows above each threshold).
    out = pipeline.run(CONFIG).output
    assert set(out) == {"score", "auc", "best_base_accuracy"}
    # Three balanced classes: chance is 1/3 accuracy and 0.5 AUC.
    assert 0.5 < out["score"] <= 1.0
    assert 0.7 < out["auc"] <= 1.0
    assert 0.5 < out["best_base_accuracy"] <= 1.0


def test_two_classes_use_the_binary_auc():
    # Kind (a), by margin: measured 0.74 accuracy and 0.83 AUC against 0.6.
    pipeline = stacking.build_pipeline(**{**TINY, "n_classes": 2})
    out = pipeline.run(CONFIG).output
    assert 0.6 < out["score"] <= 1.0
    assert 0.6 < out["auc"] <= 1.0


def test_base_stage_output_shapes(pipeline, tmp_path):
    data_params, base_params, _ = pipeline.split_config(CONFIG)
    data = pipeline.stages[0].call(None, data_params, StageContext("data", 1, tmp_path))
    n_train, n_val = len(data["y_train"]), len(data["y_val"])
    assert n_train + n_val == TINY["n_samples"]
    assert data["X_train"].shape == (n_train, CONFIG["data"]["n_features_kept"])
    reports: list[dict] = []
    ctx = StageContext("base", 2, tmp_path, _reporter=reports.append)
    base = pipeline.stages[1].call(data, base_params, ctx)
    columns = len(stacking.BASE_LEARNERS) * 3  # one probability per learner and class
    assert base["P_train"].shape == (n_train, columns)
    assert base["P_val"].shape == (n_val, columns)
    # Each learner's probabilities sum to one per row.
    sums = base["P_train"].reshape(n_train, len(stacking.BASE_LEARNERS), 3).sum(axis=2)
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    assert [r["learner"] for r in reports] == list(stacking.BASE_LEARNERS)
    assert base["base_accuracy"].shape == (len(stacking.BASE_LEARNERS),)


def test_new_meta_hyperparameters_reuse_the_cached_base_stage(pipeline, cache):
    first = pipeline.run(CONFIG, cache)
    assert first.memoized_stages == 0
    config = with_meta(C=0.05, meta_input="proba", passthrough=True)
    second = pipeline.run(config, cache)
    assert second.memoized_stages == 2
    assert [s.status for s in second.stages] == ["loaded", "loaded", "executed"]
    # Stored as NumPy arrays in a composite entry: no pickle involved.
    manifest = cache.manifest(pipeline.prefix_keys(config)[1])
    assert manifest is not None and manifest.codec == "composite"
    recomputed = pipeline.run(config)  # no cache: every stage runs
    assert second.output == recomputed.output
    assert second.output != first.output  # the meta hyperparameters matter


def test_same_config_gives_the_same_result(pipeline):
    assert pipeline.run(CONFIG).output == pipeline.run(CONFIG).output


@pytest.mark.parametrize("options", [{}, TINY], ids=["default", "tiny"])
def test_search_space_encodes_and_sampled_configs_fit(options):
    pipeline = stacking.build_pipeline(**options)
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    assert space.n_stages == 3
    assert [len(space.dims_of_stage(k)) for k in range(3)] == [2, 6, 3]
    for x in space.sample(8, seed=0):
        config = space.from_unit(x)
        assert len(pipeline.prefix_keys(config)) == 3  # split_config accepts it


def test_a_sampled_config_runs(pipeline):
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    config = space.from_unit(space.sample(1, seed=1)[0])
    assert 0.0 <= pipeline.run(config).output["score"] <= 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_classes": 1}, "n_classes"),
        ({"n_features": 4}, "too few"),
        ({"max_trees": 1}, "max_trees"),
    ],
)
def test_build_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        stacking.build_pipeline(**options)
