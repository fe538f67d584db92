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
