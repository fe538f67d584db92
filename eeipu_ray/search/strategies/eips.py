"""EIPS: expected improvement per unit of total cost (``eta = 1`` throughout)."""

from __future__ import annotations

from eeipu_ray.search.acquisition import CostAwareLogEI, LogEIPS
from eeipu_ray.search.strategies.base import AcquisitionInputs, AcquisitionStrategy, register


@register
class EIPS(AcquisitionStrategy):
    """``log EI + log E[1/C]`` with one total-cost GP (Snoek et al., NeurIPS 2012)."""

    name = "eips"
    needs_total_cost = True

    def eta(self, budget: float | None, spent: float, spent_after_warmup: float | None) -> float:
        return 1.0

    def build(self, inputs: AcquisitionInputs) -> CostAwareLogEI:
        assert inputs.costs.total_cost is not None
        return LogEIPS(
            inputs.objective, inputs.best_f, inputs.costs.total_cost, mc_samples=inputs.mc_samples
        )
