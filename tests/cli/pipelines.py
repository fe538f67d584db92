"""Pipelines for the command-line tests, given to ``eeipu-ray run module:object``.

* :func:`held_synthetic`: the synthetic pipeline (paper layout, declared costs),
  whose last stage records every run in ``<hold_dir>/runs/<trial_id>.<uuid>``
  and, from the ``hold_after + 1``-th run on, waits while ``<hold_dir>/hold``
  exists: a sweep finishes its first trials and then holds, however fast or
  slow the machine, until the test has killed the driver.
* :func:`reporting`: two stages; the second reports the metric once per epoch
  (``ctx.report``) before returning it, so that schedulers can stop trials.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ray import tune

from eeipu_ray import Pipeline, Stage
from eeipu_ray.pipelines.synthetic import build_pipeline

HOLD_TIMEOUT_S = 600.0


def held_synthetic(hold_dir: str, hold_after: int = 4) -> Pipeline:
    """The synthetic pipeline with a last stage that holds after ``hold_after`` runs."""
    base = build_pipeline()
    *first, last = base.stages
    held = dataclasses.replace(last, fn=functools.partial(_held, last, hold_dir, hold_after))
    return Pipeline("held-synthetic", [*first, held])


def _held(stage: Stage, hold_dir: str, hold_after: int, inputs: Any, params: Any, ctx: Any) -> Any:
    runs = Path(hold_dir, "runs")
    runs.mkdir(parents=True, exist_ok=True)
    Path(runs, f"{tune.get_context().get_trial_id()}.{uuid.uuid4().hex}").touch()
    if len(os.listdir(runs)) > hold_after:
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while Path(hold_dir, "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    return stage.call(inputs, params, ctx)


def runs_per_trial(hold_dir: str | os.PathLike[str]) -> dict[str, int]:
    """How many times each trial ran :func:`held_synthetic`'s last stage."""
    counts: dict[str, int] = {}
    runs = Path(hold_dir, "runs")
    for path in runs.iterdir() if runs.is_dir() else ():
        trial_id = path.name.split(".")[0]
        counts[trial_id] = counts.get(trial_id, 0) + 1
    return counts


def reporting(epochs: int = 9) -> Pipeline:
    """``data`` (a constant offset) -> ``train``: reports ``score = q * epoch / epochs``
    each epoch, then returns it; a larger ``q`` is better at every epoch."""
    return Pipeline(
        "reporting",
        [
            Stage("data", _data, {"offset": tune.choice([0.0, 0.5])}),
            Stage("train", functools.partial(_train, epochs), {"q": tune.uniform(0.0, 1.0)}),
        ],
    )


def _data(_: Any, params: dict[str, Any]) -> float:
    return float(params["offset"])


def _train(epochs: int, offset: float, params: dict[str, Any], ctx: Any) -> dict[str, float]:
    score = offset
    for epoch in range(1, epochs + 1):
        score = offset + params["q"] * epoch / epochs
        ctx.report(score=score, epoch=epoch)
    return {"score": score}
