"""The Ray object-store cache layer on a real local Ray cluster.

The layer's actor is named and detached: each test uses its own name and kills
the actor at the end so nothing leaks into other tests.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eeipu_ray.cache import EntryMeta, PrefixCache

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _entry(tag: str, i: int = 0) -> tuple[str, EntryMeta]:
    meta = EntryMeta(
        pipeline=f"layer-{tag}",
        stage_names=["s"],
        stage_versions=["1"],
        params=[{"i": i}],
        compute_seconds=[0.5],
    )
    return meta.expected_key(), meta


def _array(i: int, nbytes: int = 4096) -> np.ndarray:
    return (np.arange(nbytes // 8, dtype=np.float64) * (i + 1)).reshape(-1, 8)


@pytest.fixture
def layer_name(ray_local: Any) -> Iterator[str]:
    """A unique object-store layer name; its actor is killed after the test."""
    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    name = f"test-layer-{uuid.uuid4().hex[:10]}"
    yield name
    ObjectStoreLayer(name).kill()


def _wait_gone(pid: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} is still alive after {timeout_s}s")


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["RAY_AUTH_MODE"] = "disabled"
    return env


# --------------------------------------------------------------- ownership
def test_entry_outlives_the_task_that_stored_it(ray_local: Any, layer_name: str) -> None:
    ray = ray_local
    key, meta = _entry(layer_name)

    @ray.remote(max_calls=1)  # the worker process exits after this task
    def store_and_exit(name: str) -> int:
        cache = PrefixCache(object_store=name)
        assert cache.store(key, _array(1), meta).published
        return os.getpid()

    @ray.remote
    def load_elsewhere(name: str) -> tuple[float, str, int]:
        hit = PrefixCache(object_store=name).load(key)
        assert hit is not None
        return float(hit.value.sum()), hit.layer, os.getpid()

    writer_pid = ray.get(store_and_exit.remote(layer_name), timeout=600)
    _wait_gone(writer_pid)

    hit = PrefixCache(object_store=layer_name).load(key)
    assert hit is not None and hit.layer == "object_store"
    np.testing.assert_array_equal(hit.value, _array(1))
    assert list(hit.manifest.meta.compute_seconds) == [0.5]

    total, layer, reader_pid = ray.get(load_elsewhere.remote(layer_name), timeout=600)
    assert (total, layer) == (float(_array(1).sum()), "object_store")
    assert reader_pid != writer_pid


def test_entry_outlives_a_killed_actor_that_stored_it(ray_local: Any, layer_name: str) -> None:
    ray = ray_local
    key, meta = _entry(layer_name)

    @ray.remote
    class Writer:
        def store(self, name: str) -> int:
            assert PrefixCache(object_store=name).store(key, _array(2), meta).published
            return os.getpid()

    writer = Writer.remote()
    writer_pid = ray.get(writer.store.remote(layer_name), timeout=600)
    ray.kill(writer, no_restart=True)
    _wait_gone(writer_pid)

    hit = PrefixCache(object_store=layer_name).load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, _array(2))


def test_another_job_in_another_namespace_shares_the_layer(ray_local: Any, layer_name: str) -> None:
    """A second driver (its own job and namespace) finds the actor by name, reads
    what this driver stored, and what it stores outlives its exit."""
    ray = ray_local
    key_driver, meta_driver = _entry(layer_name, 1)
    key_other, _ = _entry(layer_name, 2)
    PrefixCache(object_store=layer_name).store(key_driver, _array(1), meta_driver)

    script = textwrap.dedent(f"""
        import numpy as np, ray
        from eeipu_ray.cache import EntryMeta, PrefixCache
        ray.init(address={ray.get_runtime_context().gcs_address!r}, namespace="someone-else",
                 log_to_driver=False, logging_level="ERROR")
        cache = PrefixCache(object_store={layer_name!r})
        hit = cache.load({key_driver!r})
        assert hit is not None and hit.layer == "object_store", hit
        assert float(hit.value.sum()) == {float(_array(1).sum())!r}
        meta = EntryMeta(pipeline="layer-{layer_name}", stage_names=["s"], stage_versions=["1"],
                         params=[{{"i": 2}}], compute_seconds=[0.5])
        arr = (np.arange(512, dtype=np.float64) * 3).reshape(-1, 8)
        assert cache.store({key_other!r}, arr, meta).published
        print("OTHER-JOB-OK", ray.get_runtime_context().namespace)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OTHER-JOB-OK someone-else" in proc.stdout

    hit = PrefixCache(object_store=layer_name).load(key_other)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, (np.arange(512, dtype=np.float64) * 3).reshape(-1, 8))


def test_process_spawned_by_a_worker_joins_the_same_cluster(
    ray_local: Any, layer_name: str
) -> None:
    """A stage's subprocess (Ray not initialized there) must join the trial's
    cluster, not start a new one with an empty cache."""
    ray = ray_local
    key, meta = _entry(layer_name)
    PrefixCache(object_store=layer_name).store(key, _array(4), meta)
    script = textwrap.dedent(f"""
        import ray
        from eeipu_ray.cache import PrefixCache
        hit = PrefixCache(object_store={layer_name!r}).load({key!r})
        assert hit is not None, "miss: the child joined another cluster"
        print("CHILD", ray.get_runtime_context().gcs_address, float(hit.value.sum()))
    """)

    # A runtime env of its own: a fresh worker process, which no earlier task touched.
    @ray.remote(runtime_env={"env_vars": {"EEIPU_TEST_WORKER": uuid.uuid4().hex}})
    def spawn_child(name: str, pythonpath: str) -> str:
        assert "RAY_ADDRESS" not in os.environ
        assert PrefixCache(object_store=name).load(key) is not None  # connects the layer
        proc = subprocess.run(  # inherits this worker's environment, as a stage's would
            [sys.executable, "-c", script],
            check=False,
            env={**os.environ, "PYTHONPATH": pythonpath},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = ray.get(spawn_child.remote(layer_name, _subprocess_env()["PYTHONPATH"]), timeout=1200)
    expected = f"CHILD {ray.get_runtime_context().gcs_address} {float(_array(4).sum())}"
    assert expected in out


# ------------------------------------------------------- budget, pins, stats
def test_lru_byte_budget_evicts_least_recently_used(layer_name: str) -> None:
    cache = PrefixCache(object_store=layer_name, object_store_budget=10_000)
    (ka, ma), (kb, mb), (kc, mc) = (_entry(layer_name, i) for i in range(3))
    assert cache.store(ka, _array(0), ma).published  # ~4.2 kB each: two fit
    assert cache.store(kb, _array(1), mb).published
    assert cache.load(ka) is not None  # a is now more recent than b
    assert cache.store(kc, _array(2), mc).published

    assert cache.contains(ka) and cache.contains(kc)
    assert not cache.contains(kb)
    assert cache.load(kb) is None
    stats = cache.l1.stats()
    assert stats["entries"] == 2 and 0 < stats["bytes"] <= 10_000
    assert stats["byte_budget"] == 10_000

    # An entry larger than the whole budget is not stored at all.
    kbig, mbig = _entry(layer_name, 99)
    assert not cache.store(kbig, _array(0, nbytes=20_480), mbig).published
    assert not cache.contains(kbig)
    assert cache.contains(ka) and cache.contains(kc)


def test_pins_survive_eviction(layer_name: str) -> None:
    cache = PrefixCache(object_store=layer_name, object_store_budget=10_000)
    entries = [_entry(layer_name, i) for i in range(5)]
    cache.pin(entries[0][0])
    for i, (key, meta) in enumerate(entries):
        cache.store(key, _array(i), meta)
    assert cache.contains(entries[0][0]), "the pinned entry was evicted"
    assert cache.contains(entries[4][0])
    assert [cache.contains(k) for k, _ in entries[1:4]] == [False, False, False]
    assert cache.pinned() == {entries[0][0]}
    assert cache.l1.stats()["pinned"] == 1

    cache.unpin(entries[0][0])
    assert cache.pinned() == set()
    cache.store(*entries[1][:1], _array(1), entries[1][1])
    cache.store(*entries[2][:1], _array(2), entries[2][1])
    assert not cache.contains(entries[0][0]), "an unpinned old entry must be evictable"


def test_stats_hits_misses_and_delete(layer_name: str) -> None:
    cache = PrefixCache(object_store=layer_name)
    key, meta = _entry(layer_name)
    missing, _ = _entry(layer_name, 1)
    cache.store(key, _array(0), meta)
    assert cache.load(key) is not None
    assert cache.load(key) is not None
    assert cache.load(missing) is None
    stats = cache.stats()["object_store"]
    assert (stats["entries"], stats["hits"], stats["misses"]) == (1, 2, 1)
    assert stats["bytes"] == cache.manifest(key).total_bytes

    cache.delete(key)
    assert not cache.contains(key)
    assert cache.load(key) is None
    assert cache.l1.stats()["entries"] == 0


# ---------------------------------------------------------------- failures
def _corrupt_in_actor(cache: PrefixCache, key: str) -> None:
    """Replace the object-store copy with same-sized, different bytes, through the actor."""
    ray = pytest.importorskip("ray")
    layer = cache.l1
    manifest = layer.manifest(key)
    assert manifest is not None
    bad = {f.name: np.full(f.size, 7, dtype=np.uint8) for f in manifest.files}
    layer.delete(key)
    assert ray.get(layer.actor.put.remote(key, manifest.to_json(), bad), timeout=600)


def test_corrupted_object_store_entry_is_dropped_as_a_miss(layer_name: str) -> None:
    cache = PrefixCache(object_store=layer_name)
    key, meta = _entry(layer_name)
    cache.store(key, _array(5), meta)
    _corrupt_in_actor(cache, key)
    assert cache.contains(key)

    assert cache.load(key) is None
    assert not cache.contains(key), "the corrupted entry must be removed"


def test_corrupted_object_store_entry_falls_back_to_durable(
    layer_name: str, tmp_path: Path
) -> None:
    cache = PrefixCache(str(tmp_path), object_store=layer_name)
    key, meta = _entry(layer_name)
    cache.store(key, _array(6), meta)
    _corrupt_in_actor(cache, key)

    hit = cache.load(key)
    assert hit is not None and hit.layer == "durable"
    np.testing.assert_array_equal(hit.value, _array(6))
    cache.verify(key)
    # The durable copy was promoted again: the next load is served by the object store.
    hit = cache.load(key)
    assert hit is not None and hit.layer == "object_store"
    np.testing.assert_array_equal(hit.value, _array(6))


def test_killed_actor_is_a_miss_then_recreated(layer_name: str, tmp_path: Path) -> None:
    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    cache = PrefixCache(str(tmp_path), object_store=layer_name)
    key, meta = _entry(layer_name)
    cache.store(key, _array(7), meta)
    assert ObjectStoreLayer(layer_name).kill()  # another client kills it

    # This client's handle is dead: the durable copy serves the read, and the
    # layer comes back as a fresh actor holding the promoted entry.
    hit = cache.load(key)
    assert hit is not None and hit.layer == "durable"
    np.testing.assert_array_equal(hit.value, _array(7))
    assert cache.l1.stats()["entries"] == 1

    only_l1 = PrefixCache(object_store=layer_name)
    assert ObjectStoreLayer(layer_name).kill()
    assert only_l1.load(key) is None
    key2, meta2 = _entry(layer_name, 2)
    assert only_l1.store(key2, _array(2), meta2).published
    assert only_l1.load(key2) is not None


def test_object_lost_between_lookup_and_fetch_is_a_miss(layer_name: str) -> None:
    """The actor (owner of the object) dies after handing out the reference: the
    fetch raises OwnerDiedError, which the layer turns into a miss."""
    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    ray = pytest.importorskip("ray")

    class DiesAfterLookup(ObjectStoreLayer):
        def _best_effort(self, method: str, *args: Any, **kwargs: Any) -> Any:
            found = super()._best_effort(method, *args, **kwargs)
            if method == "get" and found is not None:
                ObjectStoreLayer(self.name).kill()
                _wait_lost(ray, found[1][0])
            return found

    key, meta = _entry(layer_name)
    big = _array(8, nbytes=1 << 20)  # in the shared-memory store, not inlined in replies
    assert PrefixCache(object_store=layer_name).store(key, big, meta).published
    layer = DiesAfterLookup(layer_name)
    assert layer.get(key) is None
    assert not layer.contains(key)


def _wait_lost(ray: Any, ref: Any, timeout_s: float = 300.0) -> None:
    """Wait until Ray notices that ``ref``'s owner died (it takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = ray.get(ref, timeout=30)
        except ray.exceptions.ObjectLostError:
            return
        del value  # holding it would keep the local copy alive
        time.sleep(0.1)
    raise AssertionError(f"object still readable {timeout_s}s after its owner was killed")


# ---------------------------------------------------------------- pickling
def test_actor_handle_is_never_pickled(layer_name: str, tmp_path: Path) -> None:
    import ray.cloudpickle

    from tests.tune.toy_pipeline import make_pipeline

    cache = PrefixCache(str(tmp_path), object_store=layer_name)
    key, meta = _entry(layer_name)
    cache.store(key, _array(0), meta)
    assert cache.l1._actor is not None  # connected in this process

    for blob in (
        pickle.dumps(cache),
        pickle.dumps(cache.l1),
        ray.cloudpickle.dumps(make_pipeline(layer_name).as_trainable(cache=cache)),
    ):
        assert b"ActorHandle" not in blob and b"_deserialization_helper" not in blob
    copy = pickle.loads(pickle.dumps(cache.l1))
    assert copy._actor is None and copy.name == layer_name
    assert copy.get(key) is not None  # finds the actor again by name


def test_layer_survives_a_ray_restart_in_the_same_driver(ray_local: Any) -> None:
    """After ``ray.shutdown(); ray.init()`` the old handle is dead and the old
    address gone: the same cache object must use the new cluster (empty)."""
    ray = ray_local
    from eeipu_ray.cache.ray_store import ObjectStoreLayer

    name = f"test-layer-{uuid.uuid4().hex[:10]}"
    cache = PrefixCache(object_store=name)
    key, meta = _entry(name)
    cache.store(key, _array(0), meta)
    old_address = ray.get_runtime_context().gcs_address
    ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="eeipu_ray",
        logging_level="WARNING",
    )
    try:
        assert ray.get_runtime_context().gcs_address != old_address
        assert cache.load(key) is None  # a new cluster: a new, empty layer
        assert cache.store(key, _array(1), meta).published
        np.testing.assert_array_equal(cache.load(key).value, _array(1))
    finally:
        ObjectStoreLayer(name).kill()
