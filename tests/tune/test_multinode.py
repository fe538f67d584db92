"""A prefix stored by a trial on one Ray node is loaded by a trial on another.

A real two-node cluster (``ray.cluster_utils.Cluster``: two raylets, each with
its own object store, on this machine). Trial A is pinned to the head node and
writes the prefixes; trial B, pinned to the worker node, needs the same
prefix and must load it, through the object-store layer (the object crosses
from the head node's store) and through S3.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from eeipu_ray.cache import PrefixCache
from tests.cli.helpers import run_cli
from tests.tune.toy_pipeline import (
    STAGES,
    make_pipeline,
    nested,
    tune_run_config,
    unique_name,
)

pytestmark = pytest.mark.slow

SHARED = {"data": {"seed": 5}, "features": {"degree": 2}}


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, str]]:
    """A head node (1 CPU, resource ``head_node``) and a worker node (1 CPU,
    resource ``worker_node``); yields their node ids."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # e.g. another module's ``ray_local``
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"head_node": 1}, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, resources={"worker_node": 1})
        cluster.wait_for_nodes(timeout=600)
        ray.init(address=cluster.address, namespace="eeipu_ray", logging_level="WARNING")
        nodes = {}
        for node in ray.nodes():
            if not node["Alive"]:
                continue
            for role in ("head_node", "worker_node"):
                if role in node["Resources"]:
                    nodes[role] = node["NodeID"]
        assert set(nodes) == {"head_node", "worker_node"}, ray.nodes()
        assert nodes["head_node"] != nodes["worker_node"]
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run_on(
    node_resource: str, pipeline: Any, cache: PrefixCache, alpha: float, storage: Path
) -> dict[str, Any]:
    trainable = tune.with_resources(
        pipeline.as_trainable(cache=cache, metric="score"), {"cpu": 1, node_resource: 1}
    )
    grid = tune.Tuner(
        trainable,
        param_space={**SHARED, "fit": {"alpha": alpha}},
        tune_config=tune.TuneConfig(metric="score", mode="max"),
        run_config=tune_run_config(storage, f"on-{node_resource}"),
    ).fit()
    assert not grid.errors, grid.errors
    (result,) = [dict(r.metrics) for r in grid]
    return result


def _ran_on(record_dir: Path, trial_id: str) -> dict[str, str]:
    """``{stage: node_id}`` for the stages the trial executed."""
    out = {}
    for path in record_dir.glob(f"{trial_id}.*.json"):
        doc = json.loads(path.read_text())
        out[doc["stage"]] = doc["node_id"]
    return out


def _check_a_then_b(
    two_nodes: dict[str, str], cache: PrefixCache, tmp_path: Path, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    record_dir = tmp_path / "records"
    pipeline = make_pipeline(name, record_dir=str(record_dir))
    a = _run_on("head_node", pipeline, cache, 0.5, tmp_path / "tune")
    b = _run_on("worker_node", pipeline, cache, 4.0, tmp_path / "tune")

    head, worker = two_nodes["head_node"], two_nodes["worker_node"]
    assert _ran_on(record_dir, a["trial_id"]) == dict.fromkeys(STAGES, head)
    # B executed only the last stage, on the other node; stages 1-2 were loaded.
    assert _ran_on(record_dir, b["trial_id"]) == {"fit": worker}
    assert a["memoized_stages"] == 0
    assert b["memoized_stages"] == 2
    assert [b[f"cache_hit/{s}"] for s in STAGES] == [1, 1, 0]
    assert b["compute_costs/data"] == pytest.approx(a["compute_costs/data"])
    assert b["load_seconds/features"] > 0
    assert b["prefix_key/features"] == a["prefix_key/features"]

    # The entry remembers who produced it: trial A, on the head node.
    manifest = cache.manifest(a["prefix_key/features"])
    assert manifest is not None
    assert manifest.producer["trial_id"] == a["trial_id"]
    assert manifest.producer["node_id"] == head

    plain = make_pipeline(name)
    for result in (a, b):
        reference = plain.run(nested(result["config"]), cache=None).output["score"]
        assert result["score"] == pytest.approx(reference, rel=1e-12, abs=1e-15)
    return a, b


def test_object_store_layer_across_nodes(two_nodes: dict[str, str], tmp_path: Path) -> None:
    import ray

    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    layer_name = unique_name("multinode-layer")
    cache = PrefixCache(object_store=layer_name)

    @ray.remote(num_cpus=0, resources={"worker_node": 0.01})
    def first_use_on_worker_node(cache: PrefixCache) -> tuple[str, dict[str, Any]]:
        return ray.get_runtime_context().get_node_id(), cache.l1.stats()

    try:
        # First used (so created) from the worker node, the actor still goes to the
        # head node, which outlives worker nodes.
        user_node, stats = ray.get(first_use_on_worker_node.remote(cache), timeout=1200)
        assert user_node == two_nodes["worker_node"]
        assert stats["node_id"] == two_nodes["head_node"]
        _check_a_then_b(two_nodes, cache, tmp_path, unique_name("multinode-os"))
        stats = cache.l1.stats()
        # The objects' owner is on the head node; B read them on the worker node.
        assert stats["node_id"] == two_nodes["head_node"]
        assert stats["hits"] == 1 and stats["entries"] == 2
    finally:
        ObjectStoreLayer(layer_name).kill()


def test_s3_across_nodes(
    two_nodes: dict[str, str], tmp_path: Path, s3_server: dict[str, Any], s3_bucket: str
) -> None:
    cache = PrefixCache(s3_bucket + "/multinode", storage_options=s3_server["storage_options"])
    a, _ = _check_a_then_b(two_nodes, cache, tmp_path, unique_name("multinode-s3"))
    for stage in STAGES[:2]:
        cache.verify(a[f"prefix_key/{stage}"])


def test_the_command_without_address_starts_a_cluster_of_its_own(
    two_nodes: dict[str, str], tmp_path: Path
) -> None:
    """A running cluster records its address for ``ray.init()`` to find (as ``ray
    start`` does); ``eeipu-ray run`` without ``--address`` still starts a local
    cluster of its own, as its help says, instead of joining that one."""
    proc = run_cli(
        "run",
        "synthetic",
        *("--searcher", "random", "--num-samples", "1", "--num-cpus", "1"),
        *("--cache", str(tmp_path / "cache"), "--name", "own", "--no-report"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "own" / "summary.json").read_text())
    assert summary["trials"] == 1 and summary["errors"] == 0
