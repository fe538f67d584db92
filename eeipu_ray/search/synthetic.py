r"""The paper-compatible synthetic 3-stage pipeline (objective and stage costs).

Stages ``stage1``, ``stage2``, ``stage3`` own 2, 3 and 2 hyperparameters
``x1, x2[, x3]``; bounds ``[-2, 2]`` for stages 1 and 2, ``[0, 10]`` for stage 3.

Objective (maximize):

.. math::
    f(h) = -\mathrm{Beale}(h_1) - \mathrm{Hartmann3}(h_2) - \mathrm{Branin}(h_3)

with the BoTorch test functions' formulas, evaluated outside their usual
domains where the bounds say so (BoTorch's ``evaluate_true`` would refuse
those inputs, so the formulas are written out here and tested against BoTorch
inside its domains).

Cost of stage ``k`` with ``d_k`` dimensions:

.. math::
    c_k(h_k) = \frac{1}{500\, d_k} \sum_{i=1}^{d_k} (s_i\, g_i(h_{k,i}) + t_i)^2

with ``(g, s, t)`` per dimension from :data:`STAGE_COST_TERMS`.

Example:
    >>> config = {"stage1": {"x1": 0.0, "x2": 0.0},
    ...           "stage2": {"x1": 0.0, "x2": 0.0, "x3": 0.0},
    ...           "stage3": {"x1": 3.0, "x2": 3.0}}
    >>> round(synthetic_objective(config), 3)
    -15.004
    >>> [round(c, 3) for c in synthetic_stage_costs(config)]
    [0.82, 2.295, 0.447]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

STAGES: tuple[str, ...] = ("stage1", "stage2", "stage3")
STAGE_KEYS: tuple[tuple[str, ...], ...] = (("x1", "x2"), ("x1", "x2", "x3"), ("x1", "x2"))
STAGE_BOUNDS: tuple[tuple[float, float], ...] = ((-2.0, 2.0), (-2.0, 2.0), (0.0, 10.0))


def _square(v: float) -> float:
    return v * v


STAGE_COST_TERMS: tuple[tuple[tuple[Callable[[float], float], float, float], ...], ...] = (
    ((_square, 18.0, 12.0), (math.sin, 7.0, 26.0)),
    ((math.sin, 19.0, 39.0), (math.sin, 16.0, 39.0), (math.sin, 16.0, 20.0)),
    ((math.cos, 11.0, 11.0), (math.cos, 15.0, 36.0)),
)
"""Per stage, per dimension: ``(g, s, t)`` of the cost term ``(s * g(h) + t)^2``."""


def synthetic_space() -> dict[str, dict[str, Any]]:
    """The nested Ray Tune search space of the synthetic pipeline."""
    from ray import tune

    return {
        stage: {key: tune.uniform(lo, hi) for key in keys}
        for stage, keys, (lo, hi) in zip(STAGES, STAGE_KEYS, STAGE_BOUNDS, strict=True)
    }


def stage_values(config: Mapping[str, Mapping[str, Any]]) -> list[list[float]]:
    """Each stage's hyperparameters as floats, in key order."""
    return [
        [float(config[stage][key]) for key in keys]
        for stage, keys in zip(STAGES, STAGE_KEYS, strict=True)
    ]


def synthetic_objective(config: Mapping[str, Mapping[str, Any]]) -> float:
    """``-Beale(h1) - Hartmann3(h2) - Branin(h3)`` (to maximize)."""
    h1, h2, h3 = (torch.tensor(v, dtype=torch.double) for v in stage_values(config))
    return float(-beale(h1) - hartmann3(h2) - branin(h3))


def synthetic_stage_costs(config: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """``[c_1, c_2, c_3]``: the declared compute cost of each stage."""
    return [stage_cost(k, values) for k, values in enumerate(stage_values(config))]


def stage_cost(k: int, values: Sequence[float]) -> float:
    """``c_k(h_k) = sum_i (s_i g_i(h_i) + t_i)^2 / (500 d_k)`` for stage ``k`` (0-based)."""
    terms = STAGE_COST_TERMS[k]
    if len(values) != len(terms):
        raise ValueError(f"stage {k} takes {len(terms)} values, got {len(values)}")
    total = math.fsum(
        (s * g(float(h)) + t) ** 2 for (g, s, t), h in zip(terms, values, strict=True)
    )
    return total / (500.0 * len(terms))


def beale(x: Tensor) -> Tensor:
    """Beale function (BoTorch's formula); ``x``: ``... x 2``, returns ``...``."""
    x1, x2 = x[..., 0], x[..., 1]
    return (
        (1.5 - x1 + x1 * x2) ** 2 + (2.25 - x1 + x1 * x2**2) ** 2 + (2.625 - x1 + x1 * x2**3) ** 2
    )


_H3_ALPHA = torch.tensor([1.0, 1.2, 3.0, 3.2], dtype=torch.double)
_H3_A = torch.tensor(
    [[3.0, 10.0, 30.0], [0.1, 10.0, 35.0], [3.0, 10.0, 30.0], [0.1, 10.0, 35.0]],
    dtype=torch.double,
)
_H3_P = 1e-4 * torch.tensor(
    [
        [3689.0, 1170.0, 2673.0],
        [4699.0, 4387.0, 7470.0],
        [1091.0, 8732.0, 5547.0],
        [381.0, 5743.0, 8828.0],
    ],
    dtype=torch.double,
)


def hartmann3(x: Tensor) -> Tensor:
    """3-d Hartmann function (BoTorch's formula); ``x``: ``... x 3``, returns ``...``."""
    inner = (_H3_A.to(x) * (x.unsqueeze(-2) - _H3_P.to(x)) ** 2).sum(-1)
    return -(_H3_ALPHA.to(x) * torch.exp(-inner)).sum(-1)


def branin(x: Tensor) -> Tensor:
    """Branin function (BoTorch's formula); ``x``: ``... x 2``, returns ``...``."""
    x1, x2 = x[..., 0], x[..., 1]
    t1 = x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6
    t2 = 10 * (1 - 1 / (8 * math.pi)) * torch.cos(x1)
    return t1**2 + t2 + 10
