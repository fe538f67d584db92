"""A trial process SIGKILLed in the middle of a stage, and in the middle of a
cache read (the SIGKILL in the middle of a cache *write* is
``test_kill_during_write.py``).

The trial kills its own process: no ``finally`` and no cleanup runs, exactly
as when the OOM killer or a preempted node takes a worker. Tune's
``FailureConfig(max_failures=1)`` retries the trial in a fresh process. What
must hold: the retry gets the right answer, every entry in the cache is
complete and verifies, the entry a killed reader was reading is still there,
unchanged, and nothing the killed attempt did makes a later trial read a bad
value.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import PrefixCache
from tests.tune.toy_pipeline import unique_name

pytestmark = pytest.mark.slow

CONFIG = {"base": {"seed": 5}, "big": {"scale": 3}, "score": {"w": 0.5}}
N_BYTES = 96 * 2**20


def _pipeline(name: str, flags: Path, attempts: Path) -> Pipeline:
    """base -> big (a ~100 MB array) -> score. Each stage leaves a marker per
    execution in ``attempts``; ``big`` SIGKILLs its own process halfway
    through the first time it runs while ``flags/kill-in-stage`` exists."""

    def mark(stage: str) -> None:
        attempts.mkdir(parents=True, exist_ok=True)
        (attempts / f"{stage}.{os.getpid()}.{uuid.uuid4().hex[:6]}").touch()

    def base(_: Any, params: Mapping[str, Any]) -> np.ndarray:
        mark("base")
        return np.random.default_rng(int(params["seed"])).normal(size=64)

    def big(prev: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        mark("big")
        out = np.arange(N_BYTES // 8, dtype=np.float64) * float(params["scale"])
        try:
            (flags / "kill-in-stage").unlink()
        except FileNotFoundError:
            pass
        else:  # halfway through the stage: its output exists only in memory
            os.kill(os.getpid(), signal.SIGKILL)
        out[: len(prev)] += prev
        return out

    def score(prev: np.ndarray, params: Mapping[str, Any]) -> dict[str, float]:
        mark("score")
        return {"score": float(params["w"]) * float(prev[::4096].sum() + prev[-64:].sum())}

    return Pipeline(
        name,
        [
            Stage("base", base, {"seed": tune.choice([5, 6])}),
            Stage("big", big, {"scale": tune.choice([3, 4])}),
            Stage("score", score, {"w": tune.uniform(0, 1)}),
        ],
    )


def _kill_while_reading(entry_dir: str, killed: Path) -> None:
    """SIGKILL this process in the middle of reading an entry under ``entry_dir``:
    its data file is memory-mapped (checked in ``/proc/self/maps``) and has just
    been checksummed by the cache's own verification, and the entry is not yet
    decoded or handed to the next stage.

    The kill comes from inside the read path, not from a thread polling the
    maps: under load such a thread could get the GIL only after the read had
    finished and the next stage had run, and the kill would no longer be
    during the read."""
    import eeipu_ray.cache.prefix_cache as prefix_cache

    checksum = prefix_cache.verify_part

    def verify_then_die(record: Any, blob: Any) -> None:
        checksum(record, blob)
        with open("/proc/self/maps") as fh:
            mapped = entry_dir in fh.read()
        if mapped:
            killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    prefix_cache.verify_part = verify_then_die


def _trainable(pipeline: Pipeline, cache: PrefixCache, flags: Path, entry_dir: str) -> Any:
    inner = pipeline.as_trainable(cache=cache, metric="score")

    def run(config: dict[str, Any]) -> None:
        try:
            (flags / "kill-in-read").unlink()
        except FileNotFoundError:
            pass
        else:
            _kill_while_reading(entry_dir, flags / "killed-in-read")
        inner(config)

    run.__name__ = pipeline.name
    return run


def _fit(trainable: Any, storage: Path, config: Mapping[str, Any] = CONFIG) -> Any:
    return tune.Tuner(
        trainable,
        param_space=dict(config),
        tune_config=tune.TuneConfig(metric="score", mode="max"),
        run_config=tune.RunConfig(
            name=f"kill-{uuid.uuid4().hex[:6]}",
            storage_path=str(storage),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    ).fit()


def _markers(attempts: Path, stage: str) -> list[Path]:
    return sorted(attempts.glob(f"{stage}.*"))


def _all_entries_verify(cache: PrefixCache) -> None:
    entries = cache.entries()
    assert entries and all(e.complete for e in entries), entries
    for entry in entries:
        cache.verify(entry.key)


def test_sigkill_during_a_stage(ray_local: Any, tmp_path: Path) -> None:
    flags, attempts = tmp_path / "flags", tmp_path / "attempts"
    flags.mkdir()
    (flags / "kill-in-stage").touch()
    cache = PrefixCache(str(tmp_path / "cache"))
    pipeline = _pipeline(unique_name("kill-stage"), flags, attempts)
    key_base, key_big, _ = pipeline.prefix_keys(CONFIG)
    grid = _fit(_trainable(pipeline, cache, flags, "-"), tmp_path / "tune")

    # The first attempt died inside `big`; the retry finished the trial.
    assert not (flags / "kill-in-stage").exists(), "the stage never ran"
    assert not grid.errors, grid.errors
    assert len(_markers(attempts, "big")) == 2
    assert len({m.name.split(".")[1] for m in _markers(attempts, "big")}) == 2  # two processes
    (result,) = [dict(r.metrics) for r in grid]
    # The retry loaded `base`, which the killed attempt had stored before it
    # died, and recomputed `big` (nothing of it had reached the cache).
    assert len(_markers(attempts, "base")) == 1
    assert [result[f"cache_hit/{s}"] for s in ("base", "big", "score")] == [1, 0, 0]
    reference = pipeline.run(CONFIG, cache=None).output["score"]
    assert result["score"] == pytest.approx(reference, rel=1e-12)

    # One entry per cached stage (the last stage's output is not cached), each
    # complete and valid; the killed stage left no data behind for gc to find.
    assert {e.key for e in cache.entries()} == {key_base, key_big}
    _all_entries_verify(cache)
    assert cache.gc(older_than=0) == []
    hit = cache.load(key_big)
    assert hit is not None
    base_stage, big_stage, _ = pipeline.stages
    expected = big_stage.fn(base_stage.fn(None, CONFIG["base"]), CONFIG["big"])
    np.testing.assert_array_equal(hit.value, expected)


def test_sigkill_during_a_cache_read(ray_local: Any, tmp_path: Path) -> None:
    flags, attempts = tmp_path / "flags", tmp_path / "attempts"
    flags.mkdir()
    root = tmp_path / "cache"
    cache = PrefixCache(str(root))
    pipeline = _pipeline(unique_name("kill-read"), flags, attempts)
    key_base, key_big, _ = pipeline.prefix_keys(CONFIG)
    # The entry the second trial will read; its last stage differs so that it
    # must load `big` (the deepest cached prefix) and run `score`.
    config = {**CONFIG, "score": {"w": 0.75}}
    trainable = _trainable(pipeline, cache, flags, f"/entries/{key_big}/")
    first = _fit(trainable, tmp_path / "tune")
    assert not first.errors, first.errors
    before = cache.verify(key_big)

    # 2. A trial that loads `big` is killed while reading it; its retry loads it.
    (flags / "kill-in-read").touch()
    grid = _fit(trainable, tmp_path / "tune", config)
    assert (flags / "killed-in-read").exists(), "the reader was never killed"
    assert not grid.errors, grid.errors
    (result,) = [dict(r.metrics) for r in grid]
    assert [result[f"cache_hit/{s}"] for s in ("base", "big", "score")] == [1, 1, 0]
    assert result["memoized_stages"] == 2
    # The killed attempt never got to `score`; only the retry ran it (the
    # first trial ran it once with the other weight).
    assert len(_markers(attempts, "score")) == 2
    assert len(_markers(attempts, "big")) == 1  # computed once, by the first trial
    reference = pipeline.run(config, cache=None).output["score"]
    assert result["score"] == pytest.approx(reference, rel=1e-12)

    # The entry the killed reader held is still there, the same entry: a
    # reader never removes or rewrites what it reads.
    after = cache.verify(key_big)
    assert after.data_dir == before.data_dir
    assert after.files == before.files
    assert {e.key for e in cache.entries()} == {key_base, key_big}
    _all_entries_verify(cache)
    assert cache.gc(older_than=0) == []
