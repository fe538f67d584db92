"""The synthetic pipelines of ``eeipu_ray.search.synthetic`` as real :class:`Pipeline` objects.

One pipeline per layout (see ``eeipu_ray.search.synthetic.LAYOUTS``):
``"paper"`` (the default; three stages, objective
``-Beale(h1) - Hartmann3(h2) - Branin(h3)``, maximize, as in the
EEIPU paper's reference code),
``"front4"`` (four stages, the first dominates the cost), ``"back5"``
(five stages, the last dominates the cost), ``"flat4"`` (four stages of
near-uniform cost) and ``"costly3"`` (the best configurations are the most
expensive). Each stage declares its cost
instead of the clock (``Stage(cost=...)``) and a load cost of 0.1 per cached
stage, as the reference implementation does, so a 200-unit budget runs in
seconds. With ``time_scale > 0`` every stage also sleeps
``time_scale * cost`` seconds (simulated durations for parallel runs).

Stage outputs are small JSON values (the partial objective so far), stored
in the prefix cache like any real stage output; the last stage returns
``{"score": objective}``.

Example:
    >>> pipeline = build_pipeline(layout="back5")
    >>> pipeline.name, pipeline.stage_names[-1]
    ('synthetic-back5', 'stage5')
"""

from __future__ import annotations

import functools
import time
from typing import Any

from eeipu_ray.pipeline import Pipeline, Stage
from eeipu_ray.search.synthetic import Layout, get_layout, stage_cost, stage_term, synthetic_space

LOAD_COST = 0.1


def _values(layout: Layout, k: int, params: dict[str, Any]) -> list[float]:
    return [float(params[key]) for key in layout.stages[k].keys]


def _run_stage(
    layout: Layout, k: int, time_scale: float, previous: Any, params: dict[str, Any]
) -> Any:
    values = _values(layout, k, params)
    if time_scale > 0:
        time.sleep(time_scale * stage_cost(k, values, layout))
    partial = float(previous or 0.0) - stage_term(k, values, layout)
    return {"score": partial} if k == len(layout.stages) - 1 else partial


def _declared_cost(layout: Layout, k: int, params: dict[str, Any]) -> float:
    return stage_cost(k, _values(layout, k, params), layout)


def _make_stage(layout: Layout, k: int, time_scale: float) -> Stage:
    name = layout.stages[k].name
    # Module-level functions under functools.partial (and a Layout of module-level
    # test and cost functions): the pipeline pickles plainly.
    return Stage(
        name,
        functools.partial(_run_stage, layout, k, time_scale),
        synthetic_space(layout)[name],
        cost=functools.partial(_declared_cost, layout, k),
        load_cost=LOAD_COST,
    )


def build_pipeline(time_scale: float = 0.0, layout: str | Layout = "paper") -> Pipeline:
    """The synthetic pipeline of ``layout``; ``time_scale`` seconds of sleep per cost unit.

    Named ``"synthetic"`` for the paper layout and ``"synthetic-<layout>"`` otherwise.

    Raises:
        ValueError: ``layout`` names no known layout.
    """
    resolved = get_layout(layout)
    name = "synthetic" if resolved.name == "paper" else f"synthetic-{resolved.name}"
    return Pipeline(
        name, [_make_stage(resolved, k, time_scale) for k in range(len(resolved.stages))]
    )
