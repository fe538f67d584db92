"""Ray Tune sweeps of a 3-stage pipeline reuse cached prefixes, on every cache layer.

Trials run one at a time (``max_concurrent_trials=1``), so which trial finds
which prefix cached is known from the order the trials ran in, and every
result can be checked exactly: how many stages were loaded, what each stage
cost, and that the score equals recomputing the same config without a cache.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from eeipu_ray import Pipeline
from eeipu_ray.cache import PrefixCache
from tests.tune.toy_pipeline import (
    SLEEP_S,
    STAGES,
    expected_memoized,
    make_pipeline,
    nested,
    trial_index,
    tune_run_config,
    unique_name,
)

pytestmark = pytest.mark.slow

NUM_SAMPLES = 6  # 2 seeds x 2 degrees = 4 stage-2 prefixes: 6 trials must repeat some
MAX_LOAD_S = 2.0  # "small": loading a ~30 kB entry, with room for a busy machine


@pytest.fixture
def object_store_name(ray_local: Any) -> Iterator[str]:
    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    name = unique_name("sweep-layer")
    yield name
    ObjectStoreLayer(name).kill()


def _sweep(
    trainable: Any,
    pipeline: Pipeline,
    storage: Path,
    *,
    num_samples: int = NUM_SAMPLES,
    reuse_actors: bool = True,
) -> list[dict[str, Any]]:
    tuner = tune.Tuner(
        trainable,
        param_space=pipeline.search_space,
        tune_config=tune.TuneConfig(
            metric="score",
            mode="max",
            num_samples=num_samples,
            max_concurrent_trials=1,
            reuse_actors=reuse_actors,
        ),
        run_config=tune_run_config(storage, f"sweep-{uuid.uuid4().hex[:6]}"),
    )
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    assert grid.num_terminated == num_samples
    return sorted((dict(r.metrics) for r in grid), key=lambda m: trial_index(m["trial_id"]))


def check_sweep(pipeline: Pipeline, results: list[Mapping[str, Any]]) -> list[int]:
    """Assert the memoization and cost accounting of sequential trials; returns
    each trial's ``memoized_stages``."""
    configs = [nested(r["config"]) for r in results]
    expected = expected_memoized(configs)
    assert any(m == 2 for m in expected), "the space must repeat a stage-2 prefix"
    for result, config, memo in zip(results, configs, expected, strict=True):
        where = f"trial {result['trial_id']} {config}"
        assert result["memoized_stages"] == memo, where
        for i, stage in enumerate(STAGES, start=1):
            assert result[f"cache_hit/{stage}"] == int(i <= memo), (where, stage)
        # Stage 1 always reports what computing it costs: at least the sleep,
        # whether this trial computed it or loaded it.
        assert result["compute_costs/data"] >= SLEEP_S, where
        if memo == 0:
            assert result["stage_costs/data"] >= SLEEP_S, where
            assert all(result[f"load_seconds/{s}"] == 0 for s in STAGES), where
        else:
            deepest = STAGES[memo - 1]
            load = result[f"load_seconds/{deepest}"]
            # Kind (a), by margin: a ~30 kB load takes milliseconds; MAX_LOAD_S is 2 s.
            assert 0 < load < MAX_LOAD_S, where
            # What the trial spent on a loaded prefix is the load, charged to the
            # deepest loaded stage; the stages before it cost this trial nothing.
            assert result[f"stage_costs/{deepest}"] == pytest.approx(load), where
            for s in STAGES[: memo - 1]:
                assert result[f"stage_costs/{s}"] == 0, (where, s)
                assert result[f"load_seconds/{s}"] == 0, (where, s)
            assert result["cache_bytes/" + deepest] > 0, where
            # (Whether the load beat the 0.3 s compute is the machine's business: the
            # charge is the load, checked above, and the compute is what was recorded.)
        assert result["total_cost"] == pytest.approx(
            sum(result[f"stage_costs/{s}"] for s in STAGES)
        ), where
        # The data the later stages saw was right: same score as without a cache.
        reference = pipeline.run(config, cache=None).output["score"]
        assert result["score"] == pytest.approx(reference, rel=1e-12, abs=1e-15), where
    return expected


def check_entries_verify(cache: PrefixCache, results: list[Mapping[str, Any]]) -> None:
    """Every stored prefix (stages 1 and 2, never the last stage) has one valid entry."""
    keys = {r[f"prefix_key/{s}"] for r in results for s in STAGES[:2]}
    for key in keys:
        manifest = cache.verify(key)
        assert manifest.meta.compute_seconds[0] >= SLEEP_S
    last = {r["prefix_key/fit"] for r in results}
    assert not any(cache.contains(k) for k in last), "the last stage must not be stored"
    assert {e.key for e in cache.entries() if e.complete} == keys


# ------------------------------------------------------------------- layers
def test_sweep_local_directory(ray_local: Any, tmp_path: Path) -> None:
    pipeline = make_pipeline(unique_name("sweep-local"))
    cache = PrefixCache(str(tmp_path / "cache"))
    results = _sweep(
        pipeline.as_trainable(cache=cache, metric="score"), pipeline, tmp_path / "tune"
    )
    check_sweep(pipeline, results)
    check_entries_verify(cache, results)


def test_sweep_s3(
    ray_local: Any, tmp_path: Path, s3_server: dict[str, Any], s3_bucket: str
) -> None:
    pipeline = make_pipeline(unique_name("sweep-s3"))
    cache = PrefixCache(s3_bucket + "/sweep", storage_options=s3_server["storage_options"])
    results = _sweep(
        pipeline.as_trainable(cache=cache, metric="score"), pipeline, tmp_path / "tune"
    )
    check_sweep(pipeline, results)
    check_entries_verify(cache, results)
    assert not (tmp_path / "cache").exists()


def test_sweep_object_store_only_with_resources(
    ray_local: Any, tmp_path: Path, object_store_name: str
) -> None:
    """No durable layer at all; each trial in its own worker process (no actor
    reuse), so loaded entries outlived the process that stored them."""
    pipeline = make_pipeline(unique_name("sweep-os"), seeds=(1,), degrees=(1, 2))
    cache = PrefixCache(object_store=object_store_name)
    assert cache.durable is None
    trainable = tune.with_resources(pipeline.as_trainable(cache=cache, metric="score"), {"cpu": 1})
    results = _sweep(trainable, pipeline, tmp_path / "tune", num_samples=3, reuse_actors=False)
    memo = check_sweep(pipeline, results)
    assert len({r["pid"] for r in results}) == len(results), "trials shared a process"

    stats = cache.l1.stats()
    assert stats["hits"] == sum(m > 0 for m in memo)
    stored = {r[f"prefix_key/{s}"] for r in results for s in STAGES[:2]}
    assert stats["entries"] == len(stored)
    assert set(cache.l1.keys()) == stored


def test_sweep_object_store_in_front_of_local_directory(
    ray_local: Any, tmp_path: Path, object_store_name: str
) -> None:
    pipeline = make_pipeline(unique_name("sweep-os-dir"))
    cache = PrefixCache(str(tmp_path / "cache"), object_store=object_store_name)
    results = _sweep(
        pipeline.as_trainable(cache=cache, metric="score"), pipeline, tmp_path / "tune"
    )
    memo = check_sweep(pipeline, results)
    check_entries_verify(cache, results)
    # Every load was served by the object store, in front of the directory.
    assert cache.l1.stats()["hits"] == sum(m > 0 for m in memo)

    # A fresh object-store layer (e.g. after a cluster restart) is refilled from
    # the directory: the durable layer alone still serves the sweep's prefixes.
    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    ObjectStoreLayer(object_store_name).kill()
    again = PrefixCache(str(tmp_path / "cache"), object_store=object_store_name)
    key = results[-1]["prefix_key/features"]
    hit = again.load(key)
    assert hit is not None and hit.layer == "durable"
    assert again.load(key).layer == "object_store"


def test_tune_run_local_directory(ray_local: Any, tmp_path: Path) -> None:
    """The same through the ``tune.run`` entry point."""
    pipeline = make_pipeline(unique_name("sweep-run"))
    cache = PrefixCache(str(tmp_path / "cache"))
    analysis = tune.run(
        pipeline.as_trainable(cache=cache, metric="score"),
        config=pipeline.search_space,
        num_samples=NUM_SAMPLES,
        metric="score",
        mode="max",
        max_concurrent_trials=1,
        reuse_actors=True,
        storage_path=str(tmp_path / "tune"),
        name="tune-run",
        verbose=0,
    )
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    results = sorted(
        ({**t.last_result, "config": t.config} for t in analysis.trials),
        key=lambda m: trial_index(m["trial_id"]),
    )
    check_sweep(pipeline, results)
    check_entries_verify(cache, results)
    best = max(results, key=lambda r: r["score"])
    assert analysis.best_config == best["config"]


def test_trials_run_in_their_own_working_directory(
    ray_local: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative cache path is pinned to the driver's directory, not each trial's."""
    monkeypatch.chdir(tmp_path)
    pipeline = make_pipeline(unique_name("sweep-rel"), seeds=(1,), degrees=(1,))
    cache = PrefixCache("relative-cache")
    results = _sweep(
        pipeline.as_trainable(cache=cache, metric="score"),
        pipeline,
        tmp_path / "tune",
        num_samples=2,
    )
    assert [r["memoized_stages"] for r in results] == [0, 2]
    assert os.path.isdir(tmp_path / "relative-cache" / "entries")


# -------------------------------------------------------------- concurrency
def _data_dirs(cache: PrefixCache, key: str) -> list[str]:
    durable = cache.durable
    assert durable is not None
    names = [
        p.rstrip("/").rsplit("/", 1)[-1]
        for p in durable.fs.ls(f"{durable.root}/entries/{key}", detail=False)
    ]
    return sorted(n for n in names if n.startswith("d-") or n.endswith(".tmp"))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_trials_racing_on_a_missing_prefix(
    ray_local: Any, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two trials need the same missing stages 1-2 at the same time. No locks:
    both compute them and both publish; one entry per prefix survives intact, both
    trials score correctly, and a third trial loads the survivor."""
    name = unique_name(f"race-{backend}")
    pipeline = make_pipeline(name, sleep_s=0.5, barrier=(str(tmp_path / "barrier"), 2))
    reference_pipeline = make_pipeline(name, sleep_s=0.0)  # same stages, no barrier
    if backend == "local":
        cache = PrefixCache(str(tmp_path / "cache"))
    else:
        s3_server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        cache = PrefixCache(bucket + "/race", storage_options=s3_server["storage_options"])
    trainable = tune.with_resources(pipeline.as_trainable(cache=cache, metric="score"), {"cpu": 1})
    shared = {"data": {"seed": 7}, "features": {"degree": 2}}
    grid = tune.Tuner(
        trainable,
        param_space={**shared, "fit": {"alpha": tune.grid_search([0.5, 3.0])}},
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=2),
        run_config=tune_run_config(tmp_path / "tune", "race"),
    ).fit()
    assert not grid.errors, grid.errors
    results = [dict(r.metrics) for r in grid]
    assert len(results) == 2
    for result in results:
        config = nested(result["config"])
        reference = reference_pipeline.run(config, cache=None).output["score"]
        assert result["score"] == pytest.approx(reference, rel=1e-12, abs=1e-15)
        # The barrier held both trials inside stage 1: both had missed the cache.
        assert result["memoized_stages"] == 0
        assert [result[f"cache_hit/{s}"] for s in STAGES] == [0, 0, 0]
        assert result["compute_costs/data"] >= 0.5
    trial_ids = {r["trial_id"] for r in results}

    keys = [results[0][f"prefix_key/{s}"] for s in STAGES[:2]]
    assert keys == [results[1][f"prefix_key/{s}"] for s in STAGES[:2]]
    if backend == "s3":
        # The losing S3 writer may leave unreferenced data; gc is what removes it.
        cache.gc(older_than=0)
    assert {e.key for e in cache.entries() if e.complete} == set(keys)
    for key in keys:
        manifest = cache.verify(key)
        assert manifest.producer["trial_id"] in trial_ids
        assert _data_dirs(cache, key) == [manifest.data_dir], "a loser's data was left behind"

    third = tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        param_space={**shared, "fit": {"alpha": 1.0}},
        tune_config=tune.TuneConfig(metric="score", mode="max"),
        run_config=tune_run_config(tmp_path / "tune", "race-third"),
    ).fit()
    assert not third.errors, third.errors
    (result,) = [dict(r.metrics) for r in third]
    assert result["memoized_stages"] == 2
    assert [result[f"cache_hit/{s}"] for s in STAGES] == [1, 1, 0]
    assert result["compute_costs/data"] >= 0.5
    config = {**shared, "fit": {"alpha": 1.0}}
    assert result["score"] == pytest.approx(
        reference_pipeline.run(config).output["score"], rel=1e-12, abs=1e-15
    )
