"""Driver for the Tuner.restore test: ``start`` runs a sweep (to be killed),
``resume`` restores it with ``Tuner.restore`` and finishes it.

Usage: python restore_driver.py start|resume STORAGE_DIR CACHE_DIR

``start`` pauses its loop while STORAGE_DIR/pause exists (the test kills it then).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import replace

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # checkpoint experiment state eagerly

import ray
from ray import tune

from eeipu_ray.cache import PrefixCache
from eeipu_ray.pipelines.synthetic import build_pipeline
from eeipu_ray.search import EngineOptions
from eeipu_ray.tune.searcher import EEIPUSearcher

BUDGET = 30.0
# ``start`` runs the four Sobol warm-up trials (24.9 cost units: fixed points, costs in
# closed form), then holds the next ones until the test kills the driver: the kill
# always finds budget left, however fast or slow the machine.
HOLD_AFTER = 4
TIME_SCALE = 0.15  # seconds of sleep per cost unit: a trial takes ~0.5-1 s


def _held(trainable, marker_dir: str):
    """``trainable``, except that the trials after the first ``HOLD_AFTER`` wait
    (up to ten minutes) for the test to kill the driver."""

    def run(config):
        os.makedirs(marker_dir, exist_ok=True)
        open(os.path.join(marker_dir, uuid.uuid4().hex), "x").close()
        if len(os.listdir(marker_dir)) > HOLD_AFTER:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(0.5)
        return trainable(config)

    run.__name__ = run.__qualname__ = trainable.__name__  # Tuner.restore checks the name
    return run


class PauseOnMarker(tune.Callback):
    """Once ``marker`` exists, the driver's loop waits at the end of its step
    until the test kills it: Tune writes no more experiment state (a copy it
    launched finishes), so the kill cannot cut a state file short."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_step_end(self, iteration, trials, **info):
        while os.path.exists(self.marker):
            time.sleep(0.2)


def main() -> None:
    mode, storage, cache_dir = sys.argv[1:4]
    pipeline = build_pipeline(time_scale=TIME_SCALE)
    cache = PrefixCache(cache_dir)
    trainable = pipeline.as_trainable(cache=cache, metric="score")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    if mode == "start":
        searcher = EEIPUSearcher(
            pipeline,
            metric="score",
            mode="max",
            budget=BUDGET,
            cache=cache,
            options=replace(
                EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20), n_warmup=4
            ),
        )
        tuner = tune.Tuner(
            _held(trainable, os.path.join(storage, "started")),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True),
            run_config=tune.RunConfig(
                storage_path=storage,
                name="exp",
                verbose=0,
                callbacks=[PauseOnMarker(os.path.join(storage, "pause"))],
            ),
        )
    else:
        tuner = tune.Tuner.restore(
            os.path.join(storage, "exp"), trainable=trainable, resume_errored=True
        )
    grid = tuner.fit()
    print(json.dumps({"trials": len(grid), "errors": sum(1 for r in grid if r.error)}))


if __name__ == "__main__":
    main()
