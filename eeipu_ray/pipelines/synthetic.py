"""The paper-compatible synthetic pipeline as a real :class:`Pipeline`.

Three stages with 2, 3 and 2 hyperparameters; objective
``-Beale(h1) - Hartmann3(h2) - Branin(h3)`` (maximize) and declared stage
costs, as in ``eeipu_ray.search.synthetic`` (see DESIGN.md). Each stage
declares its cost instead of the clock (``Stage(cost=...)``) and a load cost
of 0.1 per cached stage, as the reference implementation does, so a
200-unit budget runs in seconds. With ``time_scale > 0`` every stage also
sleeps ``time_scale * cost`` seconds (simulated durations for parallel runs).

Stage outputs are small JSON values (the partial objective so far), stored
in the prefix cache like any real stage output.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from eeipu_ray.pipeline import Pipeline, Stage
from eeipu_ray.search.synthetic import (
    STAGE_KEYS,
    STAGES,
    beale,
    branin,
    hartmann3,
    stage_cost,
    synthetic_space,
)

LOAD_COST = 0.1


def _values(params: dict[str, Any], k: int) -> list[float]:
    return [float(params[key]) for key in STAGE_KEYS[k]]


def _run_stage(k: int, time_scale: float, previous: Any, params: dict[str, Any]) -> Any:
    import torch

    values = _values(params, k)
    if time_scale > 0:
        time.sleep(time_scale * stage_cost(k, values))
    term = (beale, hartmann3, branin)[k]
    partial = float(previous or 0.0) - float(term(torch.tensor(values, dtype=torch.double)))
    return {"score": partial} if k == len(STAGES) - 1 else partial


def _declared_cost(k: int, params: dict[str, Any]) -> float:
    return stage_cost(k, _values(params, k))


def _make_stage(k: int, time_scale: float) -> Stage:
    # Module-level functions under functools.partial: the pipeline pickles plainly.
    return Stage(
        STAGES[k],
        functools.partial(_run_stage, k, time_scale),
        synthetic_space()[STAGES[k]],
        cost=functools.partial(_declared_cost, k),
        load_cost=LOAD_COST,
    )


def build_pipeline(time_scale: float = 0.0) -> Pipeline:
    """The synthetic pipeline; ``time_scale`` seconds of sleep per cost unit."""
    return Pipeline("synthetic", [_make_stage(k, time_scale) for k in range(len(STAGES))])
