"""A trial process SIGKILLed in the middle of writing a cache entry.

Stage 2 of the pipeline returns a large array. In the first trial a watcher
thread, started by that stage, waits until the entry's data is being written
(local: a data file under ``entries/<key>/d-*/`` that is still short of its
full size; S3: a multipart upload in progress under ``entries/<key>/d-*/``)
while no manifest exists yet, and SIGKILLs its own process: no ``finally``, no
cleanup runs. The entry must then be invisible (no manifest; ``load`` misses),
and the next trial, a new Ray Tune trial, must load stage 1, recompute stage 2
and get the right answer, after which the entry verifies.
"""

from __future__ import annotations

import glob
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import PrefixCache
from tests.tune.toy_pipeline import tune_run_config, unique_name

pytestmark = pytest.mark.slow

CONFIG = {"base": {"seed": 3}, "big": {"scale": 2}, "score": {"w": 0.25}}


def _local_write_in_progress(root: str, full_size: int) -> Callable[[], bool]:
    def check() -> bool:
        for path in glob.glob(f"{root}/entries/*/d-*/data"):
            entry = path.split("/d-", 1)[0]
            if os.path.exists(f"{entry}/manifest.json"):
                continue
            try:
                if 0 < os.path.getsize(path) < full_size:
                    return True
            except FileNotFoundError:
                continue
        return False

    return check


def _s3_upload_in_progress(bucket: str, options: Mapping[str, Any]) -> Callable[[], bool]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id=options["key"],
        aws_secret_access_key=options["secret"],
        region_name="us-east-1",
    )

    def check() -> bool:
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return any("/d-" in u["Key"] for u in uploads)

    return check


def _kill_self_when(in_progress: Callable[[], bool], timeout_s: float = 600.0) -> None:
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if in_progress():
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True, name="kill-during-write").start()


def _pipeline(name: str, n_bytes: int, kill_flag: str, watch: tuple) -> Pipeline:
    def base(_: Any, params: Mapping[str, Any]) -> np.ndarray:
        return np.random.default_rng(int(params["seed"])).normal(size=64)

    def big(prev: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        if os.path.exists(kill_flag):  # only the first trial dies
            os.unlink(kill_flag)
            kind, *args = watch
            checker = (
                _local_write_in_progress(*args)
                if kind == "local"
                else _s3_upload_in_progress(*args)
            )
            _kill_self_when(checker)
        n = n_bytes // 8
        out = np.arange(n, dtype=np.float64) * float(params["scale"])
        out[: len(prev)] += prev
        return out

    def score(prev: np.ndarray, params: Mapping[str, Any]) -> dict[str, float]:
        return {"score": float(params["w"]) * float(prev[::1000].sum() + prev[-64:].sum())}

    return Pipeline(
        name,
        [
            Stage("base", base, {"seed": tune.choice([3, 4])}),
            Stage("big", big, {"scale": tune.choice([2, 3])}),
            Stage("score", score, {"w": tune.uniform(0, 1)}),
        ],
    )


def _fit(pipeline: Pipeline, cache: PrefixCache, storage: Path) -> Any:
    return tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        param_space=CONFIG,
        tune_config=tune.TuneConfig(metric="score", mode="max"),
        run_config=tune_run_config(storage, f"kill-{uuid.uuid4().hex[:6]}"),
    ).fit()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_during_cache_write(
    ray_local: Any, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    kill_flag = tmp_path / "kill-next-trial"
    kill_flag.touch()
    if backend == "local":
        n_bytes = 200 * 2**20
        root = str(tmp_path / "cache")
        cache = PrefixCache(root)
        watch: tuple = ("local", root, n_bytes + 128)
    else:
        n_bytes = 80 * 2**20  # above s3fs' 50 MiB block: written as a multipart upload
        s3_server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        options = s3_server["storage_options"]
        cache = PrefixCache(bucket + "/kill", storage_options=options)
        watch = ("s3", bucket.removeprefix("s3://"), options)
    pipeline = _pipeline(unique_name(f"kill-{backend}"), n_bytes, str(kill_flag), watch)
    key_base, key_big, _ = pipeline.prefix_keys(CONFIG)

    # 1. The trial dies while writing stage 2's entry.
    grid = _fit(pipeline, cache, tmp_path / "tune")
    assert not kill_flag.exists(), "the trial never reached stage 2"
    assert len(grid.errors) == 1, "the trial was not killed"
    assert "died" in repr(grid.errors[0]).lower() or "actor" in repr(grid.errors[0]).lower()

    # Stage 1's entry was complete before; stage 2's is invisible.
    cache.verify(key_base)
    assert cache.durable.read_manifest(key_big) is None
    assert not cache.contains(key_big)
    assert cache.load(key_big) is None
    assert cache.manifest(key_big) is None
    partial = [e for e in cache.entries() if e.key == key_big]
    if backend == "local":
        # Proof that the kill came mid-write: the killed writer's data is there, short.
        (data_file,) = glob.glob(f"{root}/entries/{key_big}/d-*/data")
        assert 0 < os.path.getsize(data_file) < n_bytes
        assert partial and not partial[0].complete
    else:
        # The killed writer's multipart upload was never completed (nor aborted):
        # S3 holds no object for it, only the abandoned upload.
        assert _s3_upload_in_progress(*watch[1:])()
        assert not partial

    # 2. The next trial loads stage 1, recomputes stage 2, and is right.
    grid = _fit(pipeline, cache, tmp_path / "tune")
    assert not grid.errors, grid.errors
    (result,) = [dict(r.metrics) for r in grid]
    assert result["memoized_stages"] == 1
    assert [result[f"cache_hit/{s}"] for s in ("base", "big", "score")] == [1, 0, 0]
    assert result["prefix_key/big"] == key_big
    reference = pipeline.run(CONFIG, cache=None).output["score"]
    assert result["score"] == pytest.approx(reference, rel=1e-12)

    manifest = cache.verify(key_big)
    assert manifest.total_bytes >= n_bytes
    assert manifest.producer["trial_id"] == result["trial_id"]
    # The killed writer's leftovers are garbage to collect, not part of the entry.
    removed = cache.gc(older_than=0)
    if backend == "local":
        assert any("/d-" in path for path in removed)
        assert glob.glob(f"{root}/entries/{key_big}/d-*") == [
            f"{root}/entries/{key_big}/{manifest.data_dir}"
        ]
    cache.verify(key_big)
    hit = cache.load(key_big)
    assert hit is not None
    base_stage, big_stage, _ = pipeline.stages
    expected = big_stage.fn(base_stage.fn(None, CONFIG["base"]), CONFIG["big"])
    np.testing.assert_array_equal(hit.value, expected)
