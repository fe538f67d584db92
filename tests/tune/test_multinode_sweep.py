"""EEIPU sweeps on a real multi-node Ray cluster: trials spread over GPU worker
nodes, reuse each other's prefixes across nodes, and survive a node's death.

The cluster (``ray.cluster_utils.Cluster``: one raylet per node, each with its
own object store, all on this machine) mirrors ``cluster/aws-gpu.yaml``: a
head node that runs the driver (Tune's controller and the searcher) and no
trials, and two worker nodes with one (declared) GPU each; trials ask for
``{"cpu": 1, "gpu": 1}``, so they can run only on the worker nodes. The prefix
cache is S3 on a loopback moto server, with the Ray object-store layer in
front of it in the first test. The head node checks node health every 0.5 s
(Ray's default would take ~30 s to declare a killed node dead).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray import tune

from eeipu_ray import Pipeline
from eeipu_ray.cache import PrefixCache
from eeipu_ray.search import EngineOptions
from eeipu_ray.search.records import TrialStatus
from eeipu_ray.tune import EEIPUSearcher
from tests.tune.toy_pipeline import make_pipeline, nested, unique_name

pytestmark = pytest.mark.slow

FAST = EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20)


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[dict[str, Any]]:
    """A head node (1 CPU, no GPU) and two worker nodes (1 CPU, 1 GPU each)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 150 * 1024**2,
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                # A dead node is noticed within ~10 s; a live one on a loaded
                # machine is not taken for dead after a few late heartbeats.
                "health_check_period_ms": 1000,
                "health_check_failure_threshold": 10,
            },
        },
    )
    try:
        workers = [
            cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=150 * 1024**2)
            for _ in range(2)
        ]
        cluster.wait_for_nodes(timeout=600)
        ray.init(address=cluster.address, namespace="eeipu_ray", logging_level="WARNING")
        yield {
            "cluster": cluster,
            "head": cluster.head_node.node_id,
            "workers": workers,
            "worker_ids": [w.node_id for w in workers],
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def _searcher(pipeline: Pipeline, cache: PrefixCache, budget: float) -> EEIPUSearcher:
    return EEIPUSearcher(
        pipeline,
        metric="score",
        mode="max",
        budget=budget,
        cache=cache,
        max_concurrent=2,
        options=replace(FAST, n_warmup=3, seed=1),
    )


def _tuner(
    pipeline: Pipeline,
    cache: PrefixCache,
    searcher: EEIPUSearcher,
    storage: Path,
    name: str,
    num_samples: int,
    max_failures: int = 0,
) -> tune.Tuner:
    trainable = tune.with_resources(
        pipeline.as_trainable(cache=cache, metric="score"), {"cpu": 1, "gpu": 1}
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=num_samples, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
        ),
    )


def _stage_nodes(record_dir: Path) -> dict[str, dict[str, str]]:
    """``{trial_id: {stage: node_id}}`` of the stages trials executed (the last
    attempt's, for a retried trial)."""
    out: dict[str, dict[str, str]] = {}
    for path in record_dir.glob("*.json"):
        doc = json.loads(path.read_text())
        out.setdefault(doc["trial_id"], {})[doc["stage"]] = doc["node_id"]
    return out


def _reference_score(pipeline_name: str, config: Mapping[str, Any], **kwargs: Any) -> float:
    plain = make_pipeline(pipeline_name, sleep_s=0.0, **kwargs)
    return float(plain.run(nested(config), cache=None).output["score"])


def test_sweep_spreads_over_gpu_nodes_and_reuses_prefixes_across_them(
    gpu_cluster: dict[str, Any],
    tmp_path: Path,
    s3_server: dict[str, Any],
    s3_bucket: str,
) -> None:
    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    name = unique_name("mn-sweep")
    layer = unique_name("mn-layer")
    cache = PrefixCache(
        s3_bucket + "/sweep", object_store=layer, storage_options=s3_server["storage_options"]
    )
    record_dir = tmp_path / "records"
    # One data seed and one degree: every trial needs the same stage-1-2 prefix, so
    # each trial after the first loads the entry the first finisher wrote, and a
    # cross-node load needs only that the other node ran one of the eight later
    # trials, not that a placement happened to fall one way (kind (a), by margin).
    pipeline = make_pipeline(name, record_dir=str(record_dir), seeds=(1,), degrees=(1,))
    searcher = _searcher(pipeline, cache, budget=1000.0)
    try:
        grid = _tuner(pipeline, cache, searcher, tmp_path / "tune", "sweep", 10).fit()
        assert not grid.errors, grid.errors
        results = [dict(r.metrics) for r in grid]
        assert len(results) == 10
        ran = _stage_nodes(record_dir)
        workers = set(gpu_cluster["worker_ids"])
        # Trials ran only where the GPUs are, and on both GPU nodes.
        nodes_used = {n for stages in ran.values() for n in stages.values()}
        assert nodes_used == workers

        cross_node = 0
        for r in results:
            depth = int(r["memoized_stages"])
            if depth == 0:
                continue
            stage = pipeline.stage_names[depth - 1]
            manifest = cache.manifest(r[f"prefix_key/{stage}"])
            assert manifest is not None
            loader_node = ran[r["trial_id"]]["fit"]  # the stage it ran after loading
            if manifest.producer["node_id"] != loader_node:
                cross_node += 1
                # What it loaded was computed elsewhere: it did not run those stages.
                assert set(ran[r["trial_id"]]) == set(pipeline.stage_names[depth:])
        assert cross_node >= 1, "no trial loaded a prefix written on the other node"
        # The object-store layer (owned by an actor on the head node) served
        # loads; S3 holds every entry, complete and verified.
        stats = cache.l1.stats()
        assert stats["node_id"] == gpu_cluster["head"]
        assert stats["hits"] >= 1
        entries = cache.entries()
        assert entries and all(e.complete for e in entries)
        for entry in entries:
            cache.verify(entry.key)
        for r in results:
            assert r["score"] == pytest.approx(
                _reference_score(name, r["config"]), rel=1e-12, abs=1e-15
            )
    finally:
        ObjectStoreLayer(layer).kill()


def _held_pipeline(name: str, marker_dir: Path, record_dir: Path, hold_on: str) -> Pipeline:
    """The toy pipeline whose last stage (the one every trial runs) leaves a
    marker (its node, its trial, its process) and, on node ``hold_on``, waits
    there until the node is killed under it: the kill lands inside the stage
    however slowly a loaded machine gets there (no timing window to hit)."""
    import ray

    base = make_pipeline(name, record_dir=str(record_dir))
    fit = base.stages[-1]

    def marked(previous: Any, params: Mapping[str, Any]) -> Any:
        node = ray.get_runtime_context().get_node_id()
        trial = tune.get_context().get_trial_id()
        marker_dir.mkdir(parents=True, exist_ok=True)
        (marker_dir / f"{node}.{trial}.{os.getpid()}.{uuid.uuid4().hex[:6]}").touch()
        if node == hold_on:
            time.sleep(1800)  # the test kills this process with its node
        return fit.fn(previous, params)

    return Pipeline(name, [*base.stages[:-1], replace(fit, fn=marked)])


def test_a_worker_node_killed_mid_sweep(
    gpu_cluster: dict[str, Any],
    tmp_path: Path,
    s3_server: dict[str, Any],
    s3_bucket: str,
) -> None:
    """Kill a GPU node while a trial runs a stage on it: Tune retries the trial on
    the other node, the sweep finishes, every trial is charged exactly once, and
    no trial reads a bad cache entry. (This test removes a node: it runs last.)"""
    cluster = gpu_cluster["cluster"]
    victim = gpu_cluster["workers"][0]
    name = unique_name("mn-kill")
    cache = PrefixCache(s3_bucket + "/kill", storage_options=s3_server["storage_options"])
    marker_dir, record_dir = tmp_path / "markers", tmp_path / "records"
    pipeline = _held_pipeline(name, marker_dir, record_dir, hold_on=victim.node_id)
    searcher = _searcher(pipeline, cache, budget=1000.0)
    killed: dict[str, Any] = {}

    def kill_when_a_stage_runs_on_the_victim() -> None:
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            markers = list(marker_dir.glob("*")) if marker_dir.exists() else []
            held = [m for m in markers if m.name.startswith(victim.node_id)]
            # Mid-sweep (another node has run trials too), a trial inside its
            # last stage on the victim, held there: kill the node under it.
            if len(markers) >= 3 and held:
                _, killed["trial"], pid, _ = held[0].name.split(".")
                # A node dies with all its processes at once. Removing the node
                # kills its raylet; its workers notice only later: kill the
                # trial's worker too.
                os.kill(int(pid), signal.SIGKILL)
                cluster.remove_node(victim, allow_graceful=False)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_a_stage_runs_on_the_victim, daemon=True)
    killer.start()
    grid = _tuner(pipeline, cache, searcher, tmp_path / "tune", "kill", 8, max_failures=3).fit()
    killer.join(timeout=60)
    assert "trial" in killed, "the node was never killed"

    # The sweep finished: every trial succeeded, the killed one on a retry.
    assert not grid.errors, grid.errors
    results = {r.metrics["trial_id"]: dict(r.metrics) for r in grid}
    assert len(results) == 8 and killed["trial"] in results
    survivor = gpu_cluster["worker_ids"][1]
    # Its last attempt ran the last stage on the surviving node (earlier stages
    # may have been stored by the attempt that died, and loaded).
    assert _stage_nodes(record_dir)[killed["trial"]]["fit"] == survivor
    attempts = [m for m in marker_dir.glob(f"*.{killed['trial']}.*")]
    assert {m.name.split(".")[0] for m in attempts} == {victim.node_id, survivor}

    # Budget accounting: the searcher saw each trial once (a retried trial is
    # not reported until its last attempt) and charged exactly what the final
    # results say they spent.
    restored = _searcher(pipeline, cache, budget=1000.0)
    restored.restore_from_dir(str(tmp_path / "tune" / "kill"))
    records = {r.trial_id: r for r in restored.engine.records}
    assert set(records) == set(results)
    assert all(r.status is TrialStatus.COMPLETED for r in records.values())
    for trial_id, r in results.items():
        assert records[trial_id].charged_cost == pytest.approx(r["total_cost"], rel=1e-12)
    assert restored.budget_spent == pytest.approx(
        math.fsum(r["total_cost"] for r in results.values()), rel=1e-12
    )

    # No corrupted entry was read: every score is what the pipeline computes
    # without a cache, and every entry left in the bucket is complete and valid.
    for r in results.values():
        assert r["score"] == pytest.approx(_reference_score(name, r["config"]), rel=1e-12)
    entries = cache.entries()
    assert entries and all(e.complete for e in entries)
    for entry in entries:
        cache.verify(entry.key)
    assert np.isfinite([r["score"] for r in results.values()]).all()
