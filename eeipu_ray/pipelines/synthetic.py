r"""Synthetic multi-stage pipelines, one per layout, with declared stage costs.

A *layout* (:class:`Layout`) is a chain of stages ``stage1, stage2, ...``.
Stage ``k`` owns two or three hyperparameters ``x1, x2[, x3]``, each drawn
uniformly from the stage's interval ``[lo, hi]``; it subtracts ``w_k f_k(h_k)``
from the objective, ``f_k`` a BoTorch test function built on the stage's box,
and declares the compute cost
``c_k(h_k) = sum_i (s_i g_i(h_{k,i}) + t_i)^2 / (500 d_k)``, one term
``(g, s, t)`` per hyperparameter (``g``: ``x^2``, ``sin``, ``cos`` or
:func:`logistic10`). The objective, to maximize, is ``-sum_k w_k f_k(h_k)``.

The layouts (:data:`LAYOUTS`); their stages, cost terms and measured means are
tabled in ``docs/benchmarks.md`` ("Synthetic layouts"):

* ``"paper"`` (the default): Beale, Hartmann3 and Branin, the costs of the
  EEIPU paper's reference code;
* ``"front4"``: four stages, the first dominates the cost;
* ``"back5"``: five stages, the last dominates the cost;
* ``"flat4"``: four stages of near-uniform cost;
* ``"costly3"``: three stages whose best configurations are the most expensive.

:func:`build_pipeline` makes a layout a :class:`~eeipu_ray.pipeline.Pipeline`
(``eeipu-ray run synthetic -o layout=front4``). Each stage declares its cost
instead of the clock (``Stage(cost=...)``) and a load cost of 0.1 per cached
stage, as the reference implementation does, so a 200-unit budget runs in
seconds; with ``time_scale > 0`` every stage also sleeps ``time_scale * cost``
seconds (simulated durations for parallel runs). A stage's output is the
partial objective so far, stored in the prefix cache like any real stage
output; the last stage returns ``{"score": objective}``.

Example:
    >>> pipeline = build_pipeline(layout="back5")
    >>> pipeline.name, pipeline.stage_names[-1]
    ('synthetic-back5', 'stage5')
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from eeipu_ray.pipeline import Pipeline, Stage
from eeipu_ray.pipelines._synthetic_layouts import (
    LAYOUTS,
    STAGE_BOUNDS,
    STAGE_COST_TERMS,
    STAGE_KEYS,
    STAGES,
    BoTorchTerm,
    CostTerm,
    Layout,
    SyntheticStage,
    logistic10,
)

__all__ = [
    "LAYOUTS",
    "LOAD_COST",
    "STAGES",
    "STAGE_BOUNDS",
    "STAGE_COST_TERMS",
    "STAGE_KEYS",
    "BoTorchTerm",
    "CostTerm",
    "Layout",
    "SyntheticStage",
    "build_pipeline",
    "get_layout",
    "logistic10",
    "stage_cost",
    "stage_term",
    "stage_values",
    "synthetic_objective",
    "synthetic_space",
    "synthetic_stage_costs",
]

LOAD_COST = 0.1


# ------------------------------------------------------------ public functions


def get_layout(layout: str | Layout) -> Layout:
    """The :class:`Layout` named ``layout`` (a :class:`Layout` is returned as is).

    Example:
        >>> layout = get_layout("front4")
        >>> layout.stage_names, layout.stage_keys[1]
        (('stage1', 'stage2', 'stage3', 'stage4'), ('x1', 'x2', 'x3'))

    Raises:
        ValueError: ``layout`` names no layout in :data:`LAYOUTS`, or is a custom
            :class:`Layout` under a built-in name (pipelines are keyed by name).
    """
    if isinstance(layout, Layout):
        if layout.name in LAYOUTS and LAYOUTS[layout.name] != layout:
            raise ValueError(
                f"custom layout named {layout.name!r} differs from the built-in layout of that "
                "name; give it another name"
            )
        return layout
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown synthetic layout {layout!r}; known layouts: {sorted(LAYOUTS)}"
        ) from None


def synthetic_space(layout: str | Layout = "paper") -> dict[str, dict[str, Any]]:
    """The nested Ray Tune search space of a synthetic layout."""
    from ray import tune

    return {
        s.name: {key: tune.uniform(*s.bounds) for key in s.keys} for s in get_layout(layout).stages
    }


def stage_values(
    config: Mapping[str, Mapping[str, Any]], layout: str | Layout = "paper"
) -> list[list[float]]:
    """Each stage's hyperparameters as floats, in key order."""
    return [[float(config[s.name][key]) for key in s.keys] for s in get_layout(layout).stages]


def stage_term(k: int, values: Sequence[float], layout: str | Layout = "paper") -> float:
    """``w_k f_k(h_k)``: what stage ``k`` (0-based) subtracts from the objective.

    Raises:
        ValueError: ``k`` names no stage, or ``values`` has the wrong length.
            Values outside the stage's box are evaluated by the same formula.
    """
    stage = _stage(k, values, layout)
    value = stage.term(torch.tensor([float(v) for v in values], dtype=torch.double))
    return stage.term_scale * float(value)  # exact for the unscaled terms (w_k = 1)


def synthetic_objective(
    config: Mapping[str, Mapping[str, Any]], layout: str | Layout = "paper"
) -> float:
    """``-sum_k w_k f_k(h_k)`` (to maximize); paper: ``-Beale - Hartmann3 - Branin``.

    Example:
        >>> config = {"stage1": {"x1": 0.0, "x2": 0.0},
        ...           "stage2": {"x1": 0.0, "x2": 0.0, "x3": 0.0},
        ...           "stage3": {"x1": 3.0, "x2": 3.0}}
        >>> round(synthetic_objective(config), 3)
        -15.004
        >>> layout = get_layout("front4")
        >>> ones = {s.name: {key: 1.0 for key in s.keys} for s in layout.stages}
        >>> round(synthetic_objective(ones, "front4"), 3)  # Rosenbrock, Levy: 0 at (1, ..., 1)
        -6.859
    """
    resolved = get_layout(layout)
    objective = 0.0
    # Subtract stage by stage, as the pipeline's stages do: the same float result.
    for k, values in enumerate(stage_values(config, resolved)):
        objective -= stage_term(k, values, resolved)
    return objective


def synthetic_stage_costs(
    config: Mapping[str, Mapping[str, Any]], layout: str | Layout = "paper"
) -> list[float]:
    """``[c_1, ..., c_K]``: the declared compute cost of each stage.

    Example:
        >>> config = {"stage1": {"x1": 0.0, "x2": 0.0},
        ...           "stage2": {"x1": 0.0, "x2": 0.0, "x3": 0.0},
        ...           "stage3": {"x1": 3.0, "x2": 3.0}}
        >>> [round(c, 3) for c in synthetic_stage_costs(config)]
        [0.82, 2.295, 0.447]
        >>> layout = get_layout("front4")
        >>> ones = {s.name: {key: 1.0 for key in s.keys} for s in layout.stages}
        >>> [round(c, 3) for c in synthetic_stage_costs(ones, "front4")]
        [3.28, 0.622, 0.428, 0.669]
    """
    resolved = get_layout(layout)
    return [
        stage_cost(k, values, resolved) for k, values in enumerate(stage_values(config, resolved))
    ]


def stage_cost(k: int, values: Sequence[float], layout: str | Layout = "paper") -> float:
    """``c_k(h_k) = sum_i (s_i g_i(h_i) + t_i)^2 / (500 d_k)`` for stage ``k`` (0-based)."""
    terms = _stage(k, values, layout).cost_terms
    total = math.fsum(
        (s * g(float(h)) + t) ** 2 for (g, s, t), h in zip(terms, values, strict=True)
    )
    return total / (500.0 * len(terms))


def _stage(k: int, values: Sequence[float], layout: str | Layout) -> SyntheticStage:
    stages = get_layout(layout).stages
    if not 0 <= k < len(stages):
        raise ValueError(f"stage index {k} out of range for {len(stages)} stages (0-based)")
    stage = stages[k]
    if len(values) != len(stage.keys):
        raise ValueError(f"stage {k} takes {len(stage.keys)} values, got {len(values)}")
    return stage


# ---------------------------------------------------------------- pipeline


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
    # Module-level functions under functools.partial, and a Layout of BoTorchTerms
    # (pickled by value) and module-level cost functions: the pipeline pickles plainly.
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
