"""The cost-cooling exponent of the cost-aware acquisitions (CArBO, EEIPU).

A leaf module with no dependencies, so that code which only needs the number
(the report's reconstructed eta series) does not load torch and BoTorch. The
acquisitions use it through :mod:`eeipu_ray.search.acquisition`, which
re-exports :func:`cost_cooling`.
"""

from __future__ import annotations


def cost_cooling(budget: float | None, spent: float, spent_after_warmup: float | None) -> float:
    r"""The cost exponent :math:`\eta = (B - s) / (B - s_0)`, clipped to ``[0, 1]``.

    ``1`` at the first BO step (``s = s_0``, spent after warm-up), ``0`` when the
    budget ``B`` is gone; so late steps chase improvement, not cheapness.

    Args:
        budget: ``B`` in cost units; ``None`` (unlimited) gives 1.
        spent: ``s``, spent so far.
        spent_after_warmup: ``s_0``; ``None`` (still warming up) gives 1.

    Returns:
        ``eta`` in ``[0, 1]``.

    Example:
        >>> cost_cooling(100.0, 20.0, 20.0), cost_cooling(100.0, 60.0, 20.0)
        (1.0, 0.5)
        >>> cost_cooling(None, 60.0, 20.0), cost_cooling(100.0, 120.0, 20.0)
        (1.0, 0.0)
    """
    if budget is None or spent_after_warmup is None:
        return 1.0
    span = budget - spent_after_warmup
    if span <= 0:
        return 0.0
    return float(min(max((budget - spent) / span, 0.0), 1.0))


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties get their
    mean rank); 0 when fewer than 3 pairs or either side is constant.

    Example:
        >>> rank_correlation([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0])
        0.8
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}")
    if len(xs) < 3:
        return 0.0
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx <= 0 or syy <= 0:
        return 0.0
    return float(sxy / (sxx * syy) ** 0.5)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def cost_trust(objectives: list[float], costs: list[float], rule: str) -> float:
    """How far the cost term is trusted, in ``[0, 1]``, from the observations.

    The cost term bets that cheap configurations are as promising as costly
    ones. When the finished trials show the opposite (the objective rises with
    the total compute cost: Spearman's ``rho > 0``), the bet is withdrawn in
    proportion: ``"rank"`` gives ``1 - max(rho, 0)``; ``"test"`` keeps 1 until
    ``z = rho sqrt(n - 1)`` passes 1 and reaches 0 at ``z = 2``; ``"always"``
    gives 1.
    """
    if rule == "always":
        return 1.0
    rho = rank_correlation(objectives, costs)
    if rule == "rank":
        return 1.0 - max(rho, 0.0)
    if rule == "test":
        z = rho * max(len(objectives) - 1, 0) ** 0.5
        return float(min(max(2.0 - z, 0.0), 1.0))
    raise ValueError(f"cost_trust rule {rule!r} is not one of ('always', 'rank', 'test')")
