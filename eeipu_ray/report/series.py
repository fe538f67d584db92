"""The series a report plots, derived from an :class:`Experiment` (no plotting here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from eeipu_ray.cooling import cost_cooling  # the engine's own formula, without BoTorch
from eeipu_ray.report.experiment import Experiment

# Acquisitions whose cost term is cooled; EIPS keeps eta = 1, EI and random have none.
_COOLED = ("eeipu", "carbo")


@dataclass(frozen=True)
class BestSoFar:
    """Best objective after each finished trial, against the cost spent so far.

    Attributes:
        cost: Cumulative charged cost after each finished trial (completion order).
        best: Best objective so far (``nan`` before the first completed trial).
        objective: Each trial's own objective (``nan`` for a failed trial).
        memoized: Whether each trial started from a cached prefix.
    """

    cost: list[float]
    best: list[float]
    objective: list[float]
    memoized: list[bool]


@dataclass(frozen=True)
class EtaSeries:
    """The cost-cooling exponent per suggestion.

    Attributes:
        budget_spent: Cost spent when each config was suggested.
        eta: The exponent of each decision.
        phase: ``"warmup"``, ``"bo"``, ... per decision.
        source: ``"decision log"`` or ``"reconstructed"`` (from the budget and
            the trials' costs in completion order: exact for a sequential search).
    """

    budget_spent: list[float]
    eta: list[float]
    phase: list[str]
    source: str


def best_so_far(experiment: Experiment) -> BestSoFar:
    sign = 1.0 if experiment.mode == "max" else -1.0
    cost, best, objective, memoized = [], [], [], []
    spent, current = 0.0, math.nan
    for t in experiment.trials:
        spent += t.charged_cost
        if t.objective is not None and (math.isnan(current) or sign * t.objective > sign * current):
            current = t.objective
        cost.append(spent)
        best.append(current)
        objective.append(math.nan if t.objective is None else t.objective)
        memoized.append(t.memoized_stages > 0)
    return BestSoFar(cost, best, objective, memoized)


def cache_hits_per_stage(experiment: Experiment) -> dict[str, int]:
    """Per stage, how many trials loaded it from the cache."""
    return {
        s: sum(1 for t in experiment.trials if t.cache_hit.get(s)) for s in experiment.stage_names
    }


def eta_series(experiment: Experiment) -> tuple[EtaSeries | None, str]:
    """The cost-cooling exponent over the search, and a sentence saying where it
    comes from (or why it is unavailable, then with ``None``)."""
    searcher = experiment.searcher
    if experiment.decisions:
        log = experiment.decisions
        series = EtaSeries(
            budget_spent=[float(d["budget_spent"]) for d in log],
            eta=[float(d["eta"]) for d in log],
            phase=[str(d["phase"]) for d in log],
            source="decision log",
        )
        return series, "From the searcher's decision log: the exponent each suggestion used."
    if searcher is not None and searcher not in _COOLED:
        return None, (
            f"Not applicable: the {searcher!r} searcher has no cooled cost term "
            "(EI and random search ignore cost, EIPS keeps eta = 1)."
        )
    if experiment.budget is None or experiment.n_warmup is None:
        missing = " and ".join(
            name
            for name, value in (
                ("budget", experiment.budget),
                ("warm-up size", experiment.n_warmup),
            )
            if value is None
        )
        return None, (
            f"Unavailable: the directory has no decision log and its {missing} is not known "
            "(pass --budget and --warmup to reconstruct it)."
        )
    return _reconstruct(experiment, float(experiment.budget), int(experiment.n_warmup)), (
        "Reconstructed (no decision log): eta = (B - spent) / (B - spent after warm-up) with "
        "the trials' costs in completion order; exact for a sequential search."
    )


def _reconstruct(experiment: Experiment, budget: float, n_warmup: int) -> EtaSeries:
    # Suggestion i of a sequential search sees the cost of trials 0..i-1.
    spent_before = [0.0]
    for t in experiment.trials:
        spent_before.append(spent_before[-1] + t.charged_cost)
    n = len(experiment.trials)
    s0 = spent_before[min(n_warmup, n)]
    etas, phases = [], []
    for i in range(n):
        warm = i < n_warmup
        etas.append(1.0 if warm else cost_cooling(budget, spent_before[i], s0))
        phases.append("warmup" if warm else "bo")
    return EtaSeries(spent_before[:n], etas, phases, source="reconstructed")
