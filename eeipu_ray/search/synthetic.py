r"""Synthetic multi-stage pipelines: objectives and declared stage costs, by layout.

A *layout* (:class:`Layout`) names its stages ``stage1, stage2, ...``; stage
``k`` owns hyperparameters ``x1, x2[, x3]`` drawn uniformly from one interval
``[lo, hi]``, an objective term ``w_k f_k(h_k)`` (a BoTorch test function
``f_k``, scaled by ``w_k``) and a declared compute cost

.. math::
    c_k(h_k) = \frac{1}{500\, d_k} \sum_{i=1}^{d_k} (s_i\, g_i(h_{k,i}) + t_i)^2

with ``(g, s, t)`` per dimension and ``g`` one of ``x^2``, ``sin``, ``cos``
and :func:`logistic10` ``(x) = 1 / (1 + exp(-10 x))``. The objective (maximize) is

.. math::
    f(h) = -\sum_k w_k f_k(h_k).

The test functions' formulas are written out in torch (BoTorch's
``evaluate_true`` refuses inputs outside its domains, which the paper layout
uses) and tested against BoTorch inside its domains.

Layouts (:data:`LAYOUTS`). "mean" is the mean over 100,000 uniformly random
configurations (seed 0); "trials" is 200 units over the mean total, the
trials a 200-unit budget buys at random without memoization (BO buys more
where it finds cheap regions and reuses prefixes).

``"paper"`` (the EEIPU reference implementation's). 3 stages:

=====  ===  =======  =========  ===========================================  ====
stage  d_k  bounds   term       cost terms ``(g, s, t)``                     mean
=====  ===  =======  =========  ===========================================  ====
1      2    [-2, 2]  Beale      (x^2, 18, 12), (sin, 7, 26)                  2.46
2      3    [-2, 2]  Hartmann3  (sin, 19, 39), (sin, 16, 39), (sin, 16, 20)  2.64
3      2    [0, 10]  Branin     (cos, 11, 11), (cos, 15, 36)                 1.52
=====  ===  =======  =========  ===========================================  ====

Mean total 6.63 (30 trials). Term means 33 (Beale), -0.05 (Hartmann3: nearly
0 outside its domain ``[0, 1]^3``, so stage 2 hardly matters to the
objective, as in the paper) and 27 (Branin).

``"front4"``: 4 stages; the first dominates the cost (67% of the mean total;
median per-trial share 67%):

=====  ===  =========  =============  ========================================  ====
stage  d_k  bounds     term           cost terms ``(g, s, t)``                  mean
=====  ===  =========  =============  ========================================  ====
1      2    [-2, 2]    Rosenbrock/20  (x^2, 15, 9), (logistic10, 40, 12)        2.55
2      3    [-10, 10]  Levy           (sin, 6, 14), (cos, 5, 13),               0.40
                                      (logistic10, 8, 10)
3      2    [-2, 2]    SixHumpCamel   (cos, 6, 12), (x^2, 3, 11)                0.46
4      3    [-5, 5]    Ackley         (sin, 7, 14), (logistic10, 9, 10),        0.41
                                      (cos, 5, 13)
=====  ===  =========  =============  ========================================  ====

Mean total 3.82 (52 trials; totals range 0.8 to 9.3, stage 1 alone 0.2 to
7.5). Rosenbrock is scaled by 1/20: unscaled its mean on ``[-2, 2]^2`` is
455, scaled 23. Term means: 23, 30 (Levy), 9 (SixHumpCamel), 10 (Ackley).

``"back5"``: 5 stages; the last dominates the cost (65% of the mean total;
median per-trial share 65%):

=====  ===  =============  ================  =================================  ====
stage  d_k  bounds         term              cost terms ``(g, s, t)``           mean
=====  ===  =============  ================  =================================  ====
1      2    [-5.12, 5.12]  Rastrigin         (cos, 5, 12), (logistic10, 6, 11)  0.34
2      3    [-2, 2]        DixonPrice/4      (x^2, 2, 10), (sin, 6, 12),        0.35
                                             (logistic10, 5, 11)
3      2    [-3, 3]        ThreeHumpCamel    (cos, 4, 12), (x^2, 1, 10)         0.33
4      2    [-5, 5]        StyblinskiTang/2  (sin, 5, 12), (logistic10, 6, 10)  0.33
5      3    [-10, 10]      10 Griewank       (sin, 30, 31),                     2.56
                                             (logistic10, 40, 12),
                                             (cos, 25, 28)
=====  ===  =============  ================  =================================  ====

Mean total 3.91 (51 trials; totals range 0.9 to 8.0, stage 5 alone 0.1 to
6.2). Scaled terms: DixonPrice by 1/4 (mean 73 -> 18), StyblinskiTang by 1/2
(range [-78, 234] -> [-39, 117], mean -4), Griewank by 10 (it lies in
[0, 2] on ``[-10, 10]^3``; scaled mean 10). Rastrigin's mean is 37,
ThreeHumpCamel's 9.

``"flat4"``: 4 stages of near-uniform cost: every cost term is ``(s g(h) +
22)^2`` with ``s`` at most 0.5, so each stage costs 0.97 (totals 3.84 to 4.02,
mean 3.92; 51 trials): the costs tell a method almost nothing, and only
memoization saves budget. Terms: 10 Hartmann3 on ``[0, 1]^3``, Branin on
``[0, 10]^2``, SixHumpCamel on ``[-2, 2]^2``, Levy on ``[-10, 10]^3``.

``"costly3"``: 3 stages whose best configurations are the expensive ones:
every cost term is ``(s cos(h) + t)^2`` on ``[-3, 3]``, largest at 0, where
every term is minimal (ThreeHumpCamel and Ackley on ``[-3, 3]^2``, cost terms
``(cos, 12, 12)``; 20 Griewank on ``[-3, 3]^3``, ``(cos, 30, 31)``, 77% of the
mean total 3.85). The optimum costs 9.7, the best tenth of random
configurations 6.1 on average.

Every bound of ``"front4"``, ``"back5"``, ``"flat4"`` and ``"costly3"`` lies
inside BoTorch's domain of its test function.

Example:
    >>> config = {"stage1": {"x1": 0.0, "x2": 0.0},
    ...           "stage2": {"x1": 0.0, "x2": 0.0, "x3": 0.0},
    ...           "stage3": {"x1": 3.0, "x2": 3.0}}
    >>> round(synthetic_objective(config), 3)
    -15.004
    >>> [round(c, 3) for c in synthetic_stage_costs(config)]
    [0.82, 2.295, 0.447]
    >>> layout = get_layout("front4")
    >>> layout.stage_names, layout.stage_keys[1]
    (('stage1', 'stage2', 'stage3', 'stage4'), ('x1', 'x2', 'x3'))
    >>> ones = {s.name: {key: 1.0 for key in s.keys} for s in layout.stages}
    >>> round(synthetic_objective(ones, "front4"), 3)  # Rosenbrock, Levy: 0 at (1, ..., 1)
    -6.859
    >>> [round(c, 3) for c in synthetic_stage_costs(ones, "front4")]
    [3.28, 0.622, 0.428, 0.669]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

CostTerm = tuple[Callable[[float], float], float, float]
"""``(g, s, t)``: one dimension's cost term ``(s * g(h) + t)^2``."""


# ------------------------------------------------------------------ layouts


@dataclass(frozen=True)
class SyntheticStage:
    """One stage of a synthetic layout.

    Args:
        name: Stage name (also the pipeline stage's name).
        keys: Hyperparameter names, ``d_k`` of them.
        bounds: ``(lo, hi)`` of every hyperparameter of the stage.
        term: Test function ``f_k``; ``... x d_k`` tensor -> ``...`` tensor.
        cost_terms: One :data:`CostTerm` ``(g, s, t)`` per hyperparameter.
        term_scale: ``w_k``; the objective subtracts ``w_k * f_k(h_k)``.
    """

    name: str
    keys: tuple[str, ...]
    bounds: tuple[float, float]
    term: Callable[[Tensor], Tensor]
    cost_terms: tuple[CostTerm, ...]
    term_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.keys or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"stage {self.name!r}: keys {self.keys!r} must be non-empty, unique")
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"stage {self.name!r}: bounds {self.bounds!r} need finite lo < hi")
        if len(self.cost_terms) != len(self.keys):
            raise ValueError(
                f"stage {self.name!r}: {len(self.cost_terms)} cost terms for "
                f"{len(self.keys)} hyperparameters; give one (g, s, t) per hyperparameter"
            )
        if not (math.isfinite(self.term_scale) and self.term_scale > 0):
            raise ValueError(f"stage {self.name!r}: term_scale {self.term_scale!r} must be > 0")


@dataclass(frozen=True)
class Layout:
    """A synthetic pipeline: its stages, in order.

    Example:
        >>> LAYOUTS["back5"].stage_names[-1], LAYOUTS["back5"].stage_bounds[-1]
        ('stage5', (-10.0, 10.0))
    """

    name: str
    stages: tuple[SyntheticStage, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"layout {self.name!r}: stage names {names} must be non-empty, unique")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def stage_keys(self) -> tuple[tuple[str, ...], ...]:
        return tuple(s.keys for s in self.stages)

    @property
    def stage_bounds(self) -> tuple[tuple[float, float], ...]:
        return tuple(s.bounds for s in self.stages)

    @property
    def cost_terms(self) -> tuple[tuple[CostTerm, ...], ...]:
        return tuple(s.cost_terms for s in self.stages)


def get_layout(layout: str | Layout) -> Layout:
    """The :class:`Layout` named ``layout`` (a :class:`Layout` is returned as is).

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


# ------------------------------------------------------------ public functions


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
    """``w_k f_k(h_k)``: what stage ``k`` (0-based) subtracts from the objective."""
    stage = _stage(k, values, layout)
    value = stage.term(torch.tensor([float(v) for v in values], dtype=torch.double))
    return stage.term_scale * float(value)  # exact for the unscaled terms (w_k = 1)


def synthetic_objective(
    config: Mapping[str, Mapping[str, Any]], layout: str | Layout = "paper"
) -> float:
    """``-sum_k w_k f_k(h_k)`` (to maximize); paper: ``-Beale - Hartmann3 - Branin``."""
    resolved = get_layout(layout)
    objective = 0.0
    # Subtract stage by stage, as the pipeline's stages do: the same float result.
    for k, values in enumerate(stage_values(config, resolved)):
        objective -= stage_term(k, values, resolved)
    return objective


def synthetic_stage_costs(
    config: Mapping[str, Mapping[str, Any]], layout: str | Layout = "paper"
) -> list[float]:
    """``[c_1, ..., c_K]``: the declared compute cost of each stage."""
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


def logistic10(x: float) -> float:
    """``1 / (1 + exp(-10 x))``, a smooth step at 0 (no overflow for large ``|x|``)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-10.0 * x))
    e = math.exp(10.0 * x)
    return e / (1.0 + e)


# ------------------------------------------------------------- test functions
# BoTorch's formulas; each takes ``... x d`` and returns ``...``.


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


def rosenbrock(x: Tensor) -> Tensor:
    """Rosenbrock, ``sum_i 100 (x_{i+1} - x_i^2)^2 + (x_i - 1)^2``; ``... x d`` -> ``...``."""
    head, tail = x[..., :-1], x[..., 1:]
    return (100.0 * (tail - head**2) ** 2 + (head - 1.0) ** 2).sum(-1)


def levy(x: Tensor) -> Tensor:
    """Levy function, with ``w = 1 + (x - 1) / 4``; ``... x d`` -> ``...``."""
    w = 1.0 + (x - 1.0) / 4.0
    first = torch.sin(math.pi * w[..., 0]) ** 2
    middle = (w[..., :-1] - 1.0) ** 2 * (1.0 + 10.0 * torch.sin(math.pi * w[..., :-1] + 1.0) ** 2)
    last = (w[..., -1] - 1.0) ** 2 * (1.0 + torch.sin(2.0 * math.pi * w[..., -1]) ** 2)
    return first + middle.sum(-1) + last


def ackley(x: Tensor) -> Tensor:
    """Ackley function (``a = 20, b = 0.2, c = 2 pi``); ``... x d`` -> ``...``."""
    rms = torch.sqrt((x**2).mean(-1))
    return (
        -20.0 * torch.exp(-0.2 * rms)
        - torch.exp(torch.cos(2.0 * math.pi * x).mean(-1))
        + 20.0
        + math.e
    )


def six_hump_camel(x: Tensor) -> Tensor:
    """Six-hump camel function; ``... x 2`` -> ``...``."""
    x1, x2 = x[..., 0], x[..., 1]
    return (4.0 - 2.1 * x1**2 + x1**4 / 3.0) * x1**2 + x1 * x2 + (4.0 * x2**2 - 4.0) * x2**2


def rastrigin(x: Tensor) -> Tensor:
    """Rastrigin, ``10 d + sum_i x_i^2 - 10 cos(2 pi x_i)``; ``... x d`` -> ``...``."""
    return 10.0 * x.shape[-1] + (x**2 - 10.0 * torch.cos(2.0 * math.pi * x)).sum(-1)


def dixon_price(x: Tensor) -> Tensor:
    """Dixon-Price, ``(x_1 - 1)^2 + sum_{i>=2} i (2 x_i^2 - x_{i-1})^2``; ``... x d`` -> ``...``."""
    i = torch.arange(2, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    return (x[..., 0] - 1.0) ** 2 + (i * (2.0 * x[..., 1:] ** 2 - x[..., :-1]) ** 2).sum(-1)


def three_hump_camel(x: Tensor) -> Tensor:
    """Three-hump camel function; ``... x 2`` -> ``...``."""
    x1, x2 = x[..., 0], x[..., 1]
    return 2.0 * x1**2 - 1.05 * x1**4 + x1**6 / 6.0 + x1 * x2 + x2**2


def styblinski_tang(x: Tensor) -> Tensor:
    """Styblinski-Tang, ``sum_i (x_i^4 - 16 x_i^2 + 5 x_i) / 2``; ``... x d`` -> ``...``."""
    return 0.5 * (x**4 - 16.0 * x**2 + 5.0 * x).sum(-1)


def griewank(x: Tensor) -> Tensor:
    """Griewank, ``1 + sum_i x_i^2 / 4000 - prod_i cos(x_i / sqrt(i))``; ``... x d`` -> ``...``."""
    i = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    return (x**2 / 4000.0).sum(-1) - torch.cos(x / torch.sqrt(i)).prod(-1) + 1.0


# ------------------------------------------------------------ layout tables


def _square(v: float) -> float:
    return v * v


_K2 = ("x1", "x2")
_K3 = ("x1", "x2", "x3")

LAYOUTS: dict[str, Layout] = {
    "paper": Layout(
        "paper",
        (
            SyntheticStage(
                "stage1", _K2, (-2.0, 2.0), beale, ((_square, 18.0, 12.0), (math.sin, 7.0, 26.0))
            ),
            SyntheticStage(
                "stage2",
                _K3,
                (-2.0, 2.0),
                hartmann3,
                ((math.sin, 19.0, 39.0), (math.sin, 16.0, 39.0), (math.sin, 16.0, 20.0)),
            ),
            SyntheticStage(
                "stage3", _K2, (0.0, 10.0), branin, ((math.cos, 11.0, 11.0), (math.cos, 15.0, 36.0))
            ),
        ),
    ),
    "front4": Layout(
        "front4",
        (
            SyntheticStage(
                "stage1",
                _K2,
                (-2.0, 2.0),
                rosenbrock,
                ((_square, 15.0, 9.0), (logistic10, 40.0, 12.0)),
                term_scale=1.0 / 20.0,
            ),
            SyntheticStage(
                "stage2",
                _K3,
                (-10.0, 10.0),
                levy,
                ((math.sin, 6.0, 14.0), (math.cos, 5.0, 13.0), (logistic10, 8.0, 10.0)),
            ),
            SyntheticStage(
                "stage3",
                _K2,
                (-2.0, 2.0),
                six_hump_camel,
                ((math.cos, 6.0, 12.0), (_square, 3.0, 11.0)),
            ),
            SyntheticStage(
                "stage4",
                _K3,
                (-5.0, 5.0),
                ackley,
                ((math.sin, 7.0, 14.0), (logistic10, 9.0, 10.0), (math.cos, 5.0, 13.0)),
            ),
        ),
    ),
    "back5": Layout(
        "back5",
        (
            SyntheticStage(
                "stage1",
                _K2,
                (-5.12, 5.12),
                rastrigin,
                ((math.cos, 5.0, 12.0), (logistic10, 6.0, 11.0)),
            ),
            SyntheticStage(
                "stage2",
                _K3,
                (-2.0, 2.0),
                dixon_price,
                ((_square, 2.0, 10.0), (math.sin, 6.0, 12.0), (logistic10, 5.0, 11.0)),
                term_scale=1.0 / 4.0,
            ),
            SyntheticStage(
                "stage3",
                _K2,
                (-3.0, 3.0),
                three_hump_camel,
                ((math.cos, 4.0, 12.0), (_square, 1.0, 10.0)),
            ),
            SyntheticStage(
                "stage4",
                _K2,
                (-5.0, 5.0),
                styblinski_tang,
                ((math.sin, 5.0, 12.0), (logistic10, 6.0, 10.0)),
                term_scale=1.0 / 2.0,
            ),
            SyntheticStage(
                "stage5",
                _K3,
                (-10.0, 10.0),
                griewank,
                ((math.sin, 30.0, 31.0), (logistic10, 40.0, 12.0), (math.cos, 25.0, 28.0)),
                term_scale=10.0,
            ),
        ),
    ),
    "flat4": Layout(
        "flat4",
        (
            SyntheticStage(
                "stage1", _K3, (0.0, 1.0), hartmann3, ((math.sin, 0.5, 22.0),) * 3, term_scale=10.0
            ),
            SyntheticStage("stage2", _K2, (0.0, 10.0), branin, ((math.cos, 0.5, 22.0),) * 2),
            SyntheticStage("stage3", _K2, (-2.0, 2.0), six_hump_camel, ((_square, 0.1, 22.0),) * 2),
            SyntheticStage("stage4", _K3, (-10.0, 10.0), levy, ((logistic10, 0.5, 22.0),) * 3),
        ),
    ),
    "costly3": Layout(
        "costly3",
        (
            SyntheticStage(
                "stage1", _K2, (-3.0, 3.0), three_hump_camel, ((math.cos, 12.0, 12.0),) * 2
            ),
            SyntheticStage("stage2", _K2, (-3.0, 3.0), ackley, ((math.cos, 12.0, 12.0),) * 2),
            SyntheticStage(
                "stage3", _K3, (-3.0, 3.0), griewank, ((math.cos, 30.0, 31.0),) * 3, term_scale=20.0
            ),
        ),
    ),
}
"""The built-in layouts by name: ``"paper"`` (the default), ``"front4"``, ``"back5"``,
``"flat4"`` and ``"costly3"``."""

# The paper layout's tables under their historical names.
STAGES: tuple[str, ...] = LAYOUTS["paper"].stage_names
STAGE_KEYS: tuple[tuple[str, ...], ...] = LAYOUTS["paper"].stage_keys
STAGE_BOUNDS: tuple[tuple[float, float], ...] = LAYOUTS["paper"].stage_bounds
STAGE_COST_TERMS: tuple[tuple[CostTerm, ...], ...] = LAYOUTS["paper"].cost_terms
"""Paper layout, per stage, per dimension: ``(g, s, t)`` of the cost term ``(s * g(h) + t)^2``."""


def _stage(k: int, values: Sequence[float], layout: str | Layout) -> SyntheticStage:
    stages = get_layout(layout).stages
    if not 0 <= k < len(stages):
        raise ValueError(f"stage index {k} out of range for {len(stages)} stages (0-based)")
    stage = stages[k]
    if len(values) != len(stage.keys):
        raise ValueError(f"stage {k} takes {len(stage.keys)} values, got {len(values)}")
    return stage
