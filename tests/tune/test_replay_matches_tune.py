"""benchmarks/energy_replay.py claims to drive the schedulers as Tune's controller
does. Here the same learning curves run once as a real Tune experiment (a
pipeline trainable on a local Ray cluster, one trial at a time) and once in the
replay: ASHA and SM2 must stop the same trials at the same epochs in both.

The curves are deterministic (a formula of the configuration and the epoch),
and so is the "energy" SM2 ranks by (a reported key, ``fake_energy``), so any
difference is a difference in how the schedulers were driven."""

from __future__ import annotations

import importlib.util
import math
import random
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.cache import PrefixCache

_SPEC = importlib.util.spec_from_file_location(
    "energy_replay", Path(__file__).resolve().parents[2] / "benchmarks" / "energy_replay.py"
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

N = 14
KEY = "fake_energy"
ARGS = Namespace(max_epochs=8, grace=1.0, reduction_factor=3.0, energy_weight=0.05)


def curve(cid: int) -> tuple[list[float], float]:
    """``(accuracy after each epoch, energy per epoch)`` of configuration ``cid``."""
    rng = random.Random(cid)
    epochs = rng.randint(2, 8)
    start, rate = rng.uniform(0.1, 0.8), rng.uniform(0.0, 0.08)
    accs = [round(min(0.99, start + rate * k + rng.uniform(-0.03, 0.03)), 6) for k in range(epochs)]
    return accs, rng.choice([0.1, 0.3, 0.9])


def _train(_: Any, hp: dict[str, Any], ctx: Any) -> dict[str, float]:
    accs, per_epoch = curve(hp["cid"])
    for k, acc in enumerate(accs, start=1):
        ctx.report(epoch=k, score=acc, fake_energy=per_epoch * k)
    return {"score": accs[-1]}


def traces() -> list[dict[str, Any]]:
    out = []
    for cid in range(N):
        accs, per_epoch = curve(cid)
        reports = [
            {"epoch": k, "score": a, KEY: per_epoch * k} for k, a in enumerate(accs, start=1)
        ]
        final = {"score": accs[-1], KEY: per_epoch * len(accs)}
        out.append({"config": {"train": {"cid": cid}}, "reports": reports, "final": final})
    return out


def _tune_epochs(scheduler: Any, tmp_path: Path) -> list[int]:
    """Epochs each configuration reached in a real Tune run, in configuration order."""
    pipeline = Pipeline(
        "replay-check", [Stage("train", _train, {"cid": tune.grid_search(list(range(N)))})]
    )
    results = tune.Tuner(
        pipeline.as_trainable(cache=PrefixCache(str(tmp_path / "cache")), metric="score"),
        param_space=pipeline.search_space,
        # metric and mode come from the scheduler, as make_scheduler sets them
        tune_config=tune.TuneConfig(
            scheduler=scheduler, max_concurrent_trials=1, reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
    ).fit()
    assert not results.errors
    order = [r.config["train"]["cid"] for r in sorted(results, key=lambda r: r.path)]
    assert order == list(range(N))  # ran in stream order, one at a time
    reached = {}
    for r in results:
        frame = r.metrics_dataframe
        reached[r.config["train"]["cid"]] = int(frame["epoch"].max())
    return [reached[c] for c in range(N)]


@pytest.mark.parametrize("method", ["asha", "sm2@0.1"])
def test_replay_stops_what_tune_stops(ray_local: Any, tmp_path: Path, method: str) -> None:
    stream = traces()
    replayed = bench.replay(stream, bench.make_scheduler(method, ARGS, KEY), KEY, math.inf)
    replay_epochs = [
        max((p["epoch"] for p in t["trace"]["reports"][: len(t["points"])]), default=0)
        for t in replayed
    ]
    # The replay's final point is the final score, not an epoch: a finished
    # configuration reached all its epochs.
    for i, t in enumerate(replayed):
        if not t["stopped"]:
            assert replay_epochs[i] == len(t["trace"]["reports"])
    tune_epochs = _tune_epochs(bench.make_scheduler(method, ARGS, KEY), tmp_path)
    assert tune_epochs == replay_epochs
    stopped = sum(t["stopped"] for t in replayed)
    assert 0 < stopped < N  # the comparison is not vacuous
