"""Storage faults: the prefix cache's storage fails, and nothing is lost.

Real storage throughout: the moto S3 server on loopback behind a TCP proxy
that refuses, drops or delays connections (:mod:`tests.cache.fault_proxy`),
a local directory whose writes hit a file size limit (``RLIMIT_FSIZE``, the
same ``EFBIG`` a full quota gives, without root), and a local cache several
processes fill past its byte budget at once.

What every test shows: a failing store ends in the cache's own error, within
a bounded time, naming the cache (credentials masked) and the entry; nothing
of a failed write is visible as an entry; once the storage heals, the cache
works again and every entry in it verifies.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import random
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eeipu_ray.cache import CacheUnreachableError, PrefixCache
from eeipu_ray.errors import CacheStorageError
from tests.cache.fault_proxy import FaultProxy, fault_proxy
from tests.cache.test_prefix_cache import entry_for, value_for

SECRET = "testing-secret-key"  # the s3_server fixture's credentials
ACCESS_KEY = "testing-access-key"
#: Generous: each failing call below is bounded by a few seconds of retries.
MAX_FAILURE_S = 30.0
#: Fast bounded retries for the tests: 2 s3fs attempts x 2 botocore attempts,
#: standard (exponential, jittered) backoff, 1 s connect / 2 s read timeouts.
FAST_RETRIES: dict[str, Any] = {
    "retries": 2,
    "config_kwargs": {
        "connect_timeout": 1,
        "read_timeout": 2,
        "retries": {"mode": "standard", "max_attempts": 1},
    },
}


@pytest.fixture
def proxy(s3_server: dict[str, Any]) -> Iterator[FaultProxy]:
    with fault_proxy(s3_server["endpoint_url"]) as running:
        yield running


def _options(s3_server: dict[str, Any], proxy: FaultProxy, **overrides: Any) -> dict[str, Any]:
    """Storage options of a cache that reaches moto only through ``proxy``."""
    return {**s3_server["storage_options"], **FAST_RETRIES, "endpoint_url": proxy.url, **overrides}


def _check_message(exc: BaseException, cache_url: str, key: str) -> None:
    text = str(exc)
    assert cache_url in text, text  # names the cache ...
    assert key[:12] in text, text  # ... and the entry
    assert SECRET not in text and ACCESS_KEY not in text, text  # never the credentials


# ------------------------------------------------------ 1. endpoint failing
@pytest.mark.parametrize("mode", ["reset", "drop"])
def test_failing_endpoint_ends_in_a_bounded_clear_error(
    s3_server: dict[str, Any], s3_bucket: str, proxy: FaultProxy, mode: str
) -> None:
    url = f"{s3_bucket}/faults"
    cache = PrefixCache(url, storage_options=_options(s3_server, proxy), unreachable_cooldown=0)
    kept, kept_meta = entry_for(0)
    assert cache.store(kept, value_for(0), kept_meta).published

    proxy.set_mode(mode)  # also breaks the connections the client holds open
    proxy.reset_counters()
    start = time.monotonic()
    with pytest.raises(CacheUnreachableError) as info:
        cache.load(kept)
    assert time.monotonic() - start < MAX_FAILURE_S
    assert isinstance(info.value, CacheStorageError) and isinstance(info.value, OSError)
    _check_message(info.value, url, kept)
    assert "unreachable" in str(info.value) and "backoff" in str(info.value)
    assert proxy.connections > 1, "the client must retry before it gives up"

    lost, lost_meta = entry_for(1)
    proxy.reset_counters()
    start = time.monotonic()
    with pytest.raises(CacheUnreachableError) as info:
        cache.store(lost, value_for(1), lost_meta)
    assert time.monotonic() - start < MAX_FAILURE_S
    _check_message(info.value, url, lost)
    assert "stage 'prep'" in str(info.value)
    assert proxy.connections > 1

    proxy.set_mode("pass")
    hit = cache.load(kept)  # the entry written before the outage is intact
    assert hit is not None
    np.testing.assert_array_equal(hit.value, value_for(0))
    assert cache.load(lost) is None
    assert lost not in {e.key for e in cache.entries()}
    cache.verify(kept)


def test_write_cut_off_before_its_manifest_leaves_no_entry(
    s3_server: dict[str, Any], s3_bucket: str, proxy: FaultProxy
) -> None:
    """The data objects land, every attempt at the manifest's PUT is reset:
    the write fails clearly, the data stays invisible, ``gc()`` removes it."""
    url = f"{s3_bucket}/cut-off"
    cache = PrefixCache(url, storage_options=_options(s3_server, proxy), unreachable_cooldown=0)
    key, meta = entry_for(2)
    proxy.reset_on = re.compile(rb"^PUT \S*/manifest\.json")
    with pytest.raises(CacheUnreachableError) as info:
        cache.store(key, value_for(2), meta)
    _check_message(info.value, url, key)
    assert proxy.reset_requests > 1, "the manifest's PUT must be retried"

    proxy.reset_on = None
    assert cache.load(key) is None and not cache.contains(key)
    (orphan,) = [e for e in cache.entries() if e.key == key]
    assert not orphan.complete and orphan.bytes > 0  # the data is there, no manifest
    assert cache.stats()["entries"] == 0
    removed = cache.gc(older_than=0)
    assert removed and all(f"/entries/{key}/d-" in path for path in removed)
    assert key not in {e.key for e in cache.entries()}

    assert cache.store(key, value_for(2), meta).published  # healed: writes work again
    assert cache.verify(key).key == key


def test_unreachable_store_fails_at_once_during_the_cooldown(
    s3_server: dict[str, Any], s3_bucket: str, proxy: FaultProxy
) -> None:
    """A trial pays the retries once, not once per stage: after one call found
    the store unreachable, the next ones fail at once; a fresh copy of the
    cache (as the next trial unpickles it) asks the store again."""
    url = f"{s3_bucket}/cooldown"
    cache = PrefixCache(url, storage_options=_options(s3_server, proxy), unreachable_cooldown=60)
    key, meta = entry_for(3)
    assert cache.store(key, value_for(3), meta).published
    proxy.set_mode("reset")
    with pytest.raises(CacheUnreachableError):
        cache.load(key)
    proxy.reset_counters()
    other, other_meta = entry_for(4)
    start = time.monotonic()
    with pytest.raises(CacheUnreachableError, match="calls fail at once") as info:
        cache.store(other, value_for(4), other_meta)
    assert time.monotonic() - start < 0.5 and proxy.connections == 0
    _check_message(info.value, url, other)

    proxy.set_mode("pass")
    fresh = pickle.loads(pickle.dumps(cache))
    hit = fresh.load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, value_for(3))


# ----------------------------------------------------------- 2. slow endpoint
def test_slow_endpoint_within_the_read_timeout_works(
    s3_server: dict[str, Any], s3_bucket: str, proxy: FaultProxy
) -> None:
    cache = PrefixCache(f"{s3_bucket}/slow", storage_options=_options(s3_server, proxy))
    proxy.set_mode("delay", delay_s=0.2)  # per connection and per request; timeout 2 s
    key, meta = entry_for(5)
    assert cache.store(key, value_for(5), meta).published
    hit = cache.load(key)
    assert hit is not None
    np.testing.assert_array_equal(hit.value, value_for(5))
    assert proxy.requests > 0


@pytest.mark.parametrize("mode", ["delay", "blackhole"])
def test_endpoint_slower_than_the_read_timeout_fails_bounded(
    s3_server: dict[str, Any], s3_bucket: str, proxy: FaultProxy, mode: str
) -> None:
    url = f"{s3_bucket}/too-slow"
    options = _options(
        s3_server,
        proxy,
        config_kwargs={
            "connect_timeout": 1,
            "read_timeout": 1,
            "retries": {"mode": "standard", "max_attempts": 1},
        },
    )
    cache = PrefixCache(url, storage_options=options, unreachable_cooldown=0)
    key, meta = entry_for(6)
    assert cache.store(key, value_for(6), meta).published
    proxy.set_mode(mode, delay_s=5.0)  # "blackhole" never answers at all
    proxy.reset_counters()
    start = time.monotonic()
    with pytest.raises(CacheUnreachableError, match=r"(?i)timeout") as info:
        cache.load(key)
    elapsed = time.monotonic() - start
    # 4 attempts of 1 s read timeout each, plus the backoff between them.
    assert 2.0 <= elapsed < MAX_FAILURE_S
    _check_message(info.value, url, key)
    assert "read 1 s" in str(info.value)  # says which bounds it ran under
    assert proxy.connections > 1
    proxy.set_mode("pass")
    assert cache.load(key) is not None


# --------------------------------------------- 3. the cache dies mid-sweep
#: Driver-side state of the outage callback, by proxy port: Tune pickles (and
#: may copy) its callbacks, which therefore carry the port only.
_PROXIES: dict[int, FaultProxy] = {}
_MODE_AT_START: dict[int, dict[int, str]] = {}


def _outage_callback(port: int, down_after: int, up_after: int) -> Any:
    """A Tune callback (run in the driver) that takes the S3 endpoint down
    after trial ``down_after`` completes and heals it after trial ``up_after``,
    and records the endpoint's state each trial started in."""
    from ray.tune import Callback

    # Cloudpickle copies a local class by value, with the globals its methods
    # name; module-level functions go by reference and find the live registries.
    class Outage(Callback):
        def on_trial_start(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
            _record_start(port, trial.trial_id)

        def on_trial_complete(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
            _switch_after(port, trial.trial_id, down_after, up_after)

    return Outage()


def _record_start(port: int, trial_id: str) -> None:
    _MODE_AT_START.setdefault(port, {})[_trial_number(trial_id)] = _PROXIES[port].mode


def _switch_after(port: int, trial_id: str, down_after: int, up_after: int) -> None:
    number = _trial_number(trial_id)
    if number == down_after:
        _PROXIES[port].set_mode("reset")
    elif number == up_after:
        _PROXIES[port].set_mode("pass")


def _trial_number(trial_id: str) -> int:
    return int(trial_id.rsplit("_", 1)[-1])


@pytest.mark.slow
def test_sweep_whose_s3_cache_dies_mid_sweep(
    ray_local: Any,
    tmp_path: Path,
    s3_server: dict[str, Any],
    s3_bucket: str,
    proxy: FaultProxy,
) -> None:
    """Trials 2 and 3 run while the endpoint refuses every connection: the
    memoized runner takes each failed load for a miss and each failed store
    for a lost memo, so they compute every stage and succeed. Nothing they
    tried to write is visible; after healing, later trials reuse exactly what
    was stored before the outage or after it, and every score equals the
    uncached run's."""
    from ray import tune

    from tests.tune.toy_pipeline import STAGES, make_pipeline, unique_name

    pipeline = make_pipeline(unique_name("storage-outage"), sleep_s=0.1)
    cache = PrefixCache(
        f"{s3_bucket}/sweep", storage_options=_options(s3_server, proxy), unreachable_cooldown=30
    )
    # (seed, degree) per trial, in order; the outage covers trials 2 and 3.
    plan = [(1, 1), (1, 1), (2, 1), (1, 2), (2, 1), (1, 2), (2, 1)]
    down = {2, 3}
    expected_memo = [0, 2, 0, 0, 0, 1, 2]
    points = [
        {"data": {"seed": s}, "features": {"degree": d}, "fit": {"alpha": 1.0 + i}}
        for i, (s, d) in enumerate(plan)
    ]
    _PROXIES[proxy.port] = proxy
    try:
        tuner = tune.Tuner(
            pipeline.as_trainable(cache=cache, metric="score", progress=False, meter=None),
            param_space=pipeline.search_space,
            tune_config=tune.TuneConfig(
                metric="score",
                mode="max",
                num_samples=len(plan),
                # A fresh trial process each time, as on a cluster: the
                # cool-down of one trial's cache copy does not reach the next.
                reuse_actors=False,
                # One trial at a time (Tune ignores max_concurrent_trials for
                # a generator), in the planned order.
                search_alg=tune.search.BasicVariantGenerator(
                    points_to_evaluate=points, max_concurrent=1
                ),
            ),
            run_config=tune.RunConfig(
                name=unique_name("outage"),
                storage_path=str(tmp_path / "tune"),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_outage_callback(proxy.port, down_after=1, up_after=3)],
            ),
        )
        grid = tuner.fit()
    finally:
        _PROXIES.pop(proxy.port, None)
        proxy.set_mode("pass")
    modes = _MODE_AT_START.pop(proxy.port, {})
    assert modes == {i: "reset" if i in down else "pass" for i in range(len(plan))}
    # Whatever the cache did, no trial failed: the runner computed without it.
    assert not grid.errors, grid.errors
    results = sorted((dict(r.metrics) for r in grid), key=lambda m: _trial_number(m["trial_id"]))
    assert len(results) == len(plan)
    for i, result in enumerate(results):
        config = result["config"]
        where = f"trial {i} {config}"
        assert result["memoized_stages"] == expected_memo[i], where
        for stage in STAGES[expected_memo[i] : 2]:  # stages it computed and would store
            stored = result[f"cache_bytes/{stage}"] > 0
            assert stored == (i not in down), (where, stage)
        if i in down:  # a failed cache costs the retries once, then fails at once
            assert result["time_total_s"] < MAX_FAILURE_S, where
        reference = pipeline.run(config, cache=None).output["score"]
        assert result["score"] == pytest.approx(reference, rel=1e-12, abs=1e-15), where

    stored_keys = {
        results[i][f"prefix_key/{stage}"]
        for i in range(len(plan))
        if i not in down
        for stage in STAGES[:2]
    }
    healed = PrefixCache(f"{s3_bucket}/sweep", storage_options=s3_server["storage_options"])
    entries = healed.entries()
    assert all(e.complete for e in entries), "no partial entry after the outage"
    assert {e.key for e in entries} == stored_keys
    for key in stored_keys:
        healed.verify(key)


# ------------------------------------------------------ 4. local disk full
_DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    import numpy as np
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.errors import CacheStorageError
    from tests.cache.test_prefix_cache import entry_for

    # Past the limit a write gets EFBIG (the signal would kill the process).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    cache = PrefixCache(sys.argv[1])
    key, meta = entry_for(7)
    value = np.arange(64 * 1024, dtype=np.float64)  # 512 KiB
    resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, hard))
    out = {"key": key}
    try:
        cache.store(key, value, meta)
        out["error"] = None
    except CacheStorageError as exc:
        out["error"], out["type"] = str(exc), type(exc).__name__
    out["contains"] = cache.contains(key)
    out["loaded"] = cache.load(key) is not None
    out["entries"] = [[e.key, e.complete, e.bytes] for e in cache.entries()]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    out["published"] = cache.store(key, value, meta).published
    hit = cache.load(key)
    out["equal"] = hit is not None and bool(np.array_equal(hit.value, value))
    cache.verify(key)
    print(json.dumps(out))
    """
)


def test_disk_full_fails_the_store_clearly_and_leaves_no_entry(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    key = out["key"]
    assert out["type"] == "CacheStorageError", out
    assert key[:12] in out["error"] and "stage 'prep'" in out["error"], out
    assert str(root) in out["error"] and "File too large" in out["error"], out
    assert "no room left" in out["error"], out
    assert not out["contains"] and not out["loaded"]
    assert out["entries"] == [], "a failed write must leave nothing behind"
    assert out["published"] and out["equal"]
    leftovers = [p for p in root.rglob("*") if p.is_file() and "tmp" in p.name]
    assert leftovers == []


# ------------------------------------------- 5. over the byte budget, loaded
ENTRY_VALUES = 2000  # float64: 16 kB a part
N_WORKERS = 4
PER_WORKER = 20
PINNED = (0, 1, 2)
FIRST_WORKER_ENTRY = 100


def _fill(root: str, budget: int, worker: int, seed: int) -> dict[str, Any]:
    """One writer process: store entries into a cache over its budget, and
    read back random ones (a hit must hold exactly what was stored)."""
    rng = random.Random(seed)
    cache = PrefixCache(root, byte_budget=budget, touch_interval=0.0)
    first = FIRST_WORKER_ENTRY + worker * PER_WORKER
    mine = list(range(first, first + PER_WORKER))
    hits = misses = 0
    try:
        for n, i in enumerate(mine):
            key, meta = entry_for(i)
            cache.store(key, value_for(i, ENTRY_VALUES), meta)
            for j in rng.sample([*PINNED, *mine[: n + 1]], 2):
                hit = cache.load(entry_for(j)[0])
                if hit is None:
                    misses += 1
                    continue
                hits += 1
                if not np.array_equal(hit.value, value_for(j, ENTRY_VALUES)):
                    return {"error": f"entry {j} read back wrong"}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
        return {"error": repr(exc)}
    return {"error": None, "hits": hits, "misses": misses}


def _watch(root: str, done: str) -> dict[str, Any]:
    """A reader process: list the cache while the writers fill and evict it.
    Once it held an entry it never looks empty (at least the last stored entry
    and the pinned ones stay), and never over budget by more than the writes
    in flight."""
    cache = PrefixCache(root)
    listings = empty = 0
    seen = False
    deadline = time.monotonic() + 60
    try:
        while not Path(done).exists() and time.monotonic() < deadline:
            complete = [e for e in cache.entries() if e.complete]
            listings += 1
            seen = seen or bool(complete)
            empty += seen and not complete
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
        return {"error": repr(exc)}
    return {"error": None, "listings": listings, "empty": empty}


@pytest.mark.slow
def test_cache_over_its_byte_budget_under_load(tmp_path: Path) -> None:
    root = str(tmp_path / "cache")
    probe = PrefixCache(root)
    pinned_keys = []
    for i in PINNED:
        key, meta = entry_for(i)
        probe.store(key, value_for(i, ENTRY_VALUES), meta)
        probe.pin(key)
        pinned_keys.append(key)
    entry_bytes = max(e.bytes for e in probe.entries())
    budget = 10 * entry_bytes  # room for the 3 pinned and 7 more of 80 written

    done = tmp_path / "writers-done"
    context = multiprocessing.get_context("spawn")  # no fork of a threaded pytest
    with context.Pool(N_WORKERS + 1) as pool:
        watcher = pool.apply_async(_watch, (root, str(done)))
        reports = pool.starmap(
            _fill, [(root, budget, w, 1000 + w) for w in range(N_WORKERS)], chunksize=1
        )
        done.touch()
        watched = watcher.get(timeout=600)
    assert [r["error"] for r in reports] == [None] * N_WORKERS, reports
    assert sum(r["hits"] for r in reports) > 0
    # A listing racing the evictions skips what vanishes; it never comes back empty.
    assert watched["error"] is None and watched["listings"] > 0, watched
    assert watched["empty"] == 0, watched

    cache = PrefixCache(root, byte_budget=budget)
    entries = [e for e in cache.entries() if e.complete]
    # Every store enforced the budget after publishing; the last listing saw
    # every entry, so the cache ends within its budget without another pass.
    assert sum(e.bytes for e in entries) <= budget
    assert cache.evict() == []
    assert cache.pinned() == set(pinned_keys)
    assert set(pinned_keys) <= {e.key for e in entries}, "pinned prefixes must survive"
    for entry in entries:
        cache.verify(entry.key)
    # Writers that lost a key to eviction left no partial entries behind.
    assert all(e.complete for e in cache.entries())
    assert cache.gc(older_than=0) == []
