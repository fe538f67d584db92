"""The built-in CNN pipeline, run tiny against a real local PrefixCache."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from eeipu_ray.cache import PrefixCache
from eeipu_ray.pipeline import Pipeline
from eeipu_ray.pipelines import cnn, load_pipeline
from eeipu_ray.search.space import SearchSpace

TINY = {"n_samples": 400, "image_size": 8, "max_epochs": 3}
CONFIG = {
    "data": {"copies": 1, "max_shift": 1, "noise": 0.1, "normalize": "standard"},
    "train": {"lr": 2e-2, "weight_decay": 1e-4, "epochs": 3, "width": 8},
    "evaluate": {"tta": "none", "temperature": 1.0},
}


@pytest.fixture
def pipeline() -> Pipeline:
    return load_pipeline("cnn", **TINY)


@pytest.fixture
def cache(tmp_path) -> PrefixCache:
    return PrefixCache(str(tmp_path / "cache"))


def with_evaluate(**evaluate) -> dict:
    config = copy.deepcopy(CONFIG)
    config["evaluate"].update(evaluate)
    return config


def test_builtin_registration_stage_order_and_pickling(pipeline):
    assert pipeline.name == "cnn"
    # Ray ships the pipeline to its workers: module-level stage functions pickle.
    clone = pickle.loads(pickle.dumps(pipeline))
    assert clone.prefix_keys(CONFIG) == pipeline.prefix_keys(CONFIG)
    assert pipeline.stage_names == ["data", "train", "evaluate"]


def test_trains_above_chance_and_reports_every_epoch(pipeline):
    # Kind (a), by margin: seeded training measured at 0.80 accuracy (30 of 100
    # validation images above 0.5), nll 0.70 and losses 2.29 -> 1.27; rounding-level
    # changes (1e-7 on the initial weights, 1 or 2 threads) left all three unchanged.
    reports: list[dict] = []
    out = pipeline.run(CONFIG, reporter=reports.append).output
    assert set(out) == {"score", "nll"}
    assert 0.5 < out["score"] <= 1.0  # ten classes: chance is 0.1
    assert 0.0 < out["nll"] < math.log(10)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert all(r["stage"] == "train" for r in reports)
    losses = [r["loss"] for r in reports]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_new_evaluate_hyperparameters_reuse_the_trained_model(pipeline, cache):
    first = pipeline.run(CONFIG, cache)
    assert first.memoized_stages == 0
    config = with_evaluate(tta="shifts", temperature=0.5)
    second = pipeline.run(config, cache)
    assert second.memoized_stages == 2
    assert [s.status for s in second.stages] == ["loaded", "loaded", "executed"]
    recomputed = pipeline.run(config)  # no cache: trains again
    assert second.output == recomputed.output
    assert second.output != first.output  # test-time augmentation changes the result


def test_stage_outputs_are_stored_as_tensors(pipeline, cache):
    pipeline.run(CONFIG, cache)
    data_key, train_key, _ = pipeline.prefix_keys(CONFIG)
    assert cache.manifest(data_key).codec == "torch"  # a dict of tensors: one safetensors file
    assert cache.manifest(train_key).codec == "composite"  # state dict + width + val split
    trained = cache.load(train_key).value
    assert trained["width"] == CONFIG["train"]["width"]
    assert all(isinstance(v, torch.Tensor) for v in trained["state_dict"].values())
    model = cnn.ConvNet(trained["width"])
    model.load_state_dict(trained["state_dict"])  # strict: every key present
    assert trained["x_val"].shape[1:] == (1, TINY["image_size"], TINY["image_size"])


def test_same_config_gives_the_same_result(pipeline):
    assert pipeline.run(CONFIG).output == pipeline.run(CONFIG).output


def test_training_leaves_the_global_rng_alone(pipeline):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pipeline.run(CONFIG)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("options", [{}, TINY], ids=["default", "tiny"])
def test_search_space_encodes_and_sampled_configs_fit(options):
    pipeline = cnn.build_pipeline(**options)
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    assert space.n_stages == 3
    assert [len(space.dims_of_stage(k)) for k in range(3)] == [4, 4, 2]
    for x in space.sample(8, seed=0):
        config = space.from_unit(x)
        assert len(pipeline.prefix_keys(config)) == 3  # split_config accepts it
        assert 1 <= config["train"]["epochs"] < pipeline.search_space["train"]["epochs"].upper


def test_a_sampled_config_runs(pipeline):
    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    config = space.from_unit(space.sample(1, seed=1)[0])
    assert 0.0 <= pipeline.run(config).output["score"] <= 1.0


@pytest.mark.parametrize("normalize", ["minmax", "standard", "per_image"])
def test_data_stage_augments_train_only(normalize):
    params = {**CONFIG["data"], "normalize": normalize, "copies": 2, "n_samples": 400}
    data = cnn._data(None, {**params, "image_size": 8, "seed": 0})
    n_val = len(data["y_val"])
    assert len(data["y_train"]) == 3 * (400 - n_val)  # originals + two copies
    assert data["x_train"].shape[1:] == data["x_val"].shape[1:] == (1, 8, 8)
    assert data["x_train"].dtype == torch.float32 and data["y_train"].dtype == torch.int64
    if normalize == "per_image":
        np.testing.assert_allclose(data["x_val"].mean(dim=(1, 2, 3)).numpy(), 0.0, atol=1e-5)


def test_shift_helpers_move_pixels():
    image = np.zeros((4, 4), dtype=np.float32)
    image[1, 2] = 1.0
    moved = cnn._shift(image, 1, -1)
    assert moved[2, 1] == 1.0 and moved.sum() == 1.0
    assert cnn._shift(image, 0, 3).sum() == 0.0  # pushed off the edge
    batch = torch.from_numpy(image)[None, None]
    torch.testing.assert_close(cnn._shift_batch(batch, 1, -1)[0, 0], torch.from_numpy(moved))
    assert cnn._shift_batch(batch, 0, 0) is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_agrees_with_cpu(pipeline):
    on_gpu = pipeline.run(CONFIG, device="cuda:0").output
    on_cpu = pipeline.run(CONFIG).output
    assert 0.5 < on_gpu["score"] <= 1.0
    # Different kernels round differently; a few validation images may flip.
    assert on_gpu["score"] == pytest.approx(on_cpu["score"], abs=0.05)
