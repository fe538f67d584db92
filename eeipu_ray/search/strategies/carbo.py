"""CArBO: EI per unit of total cost, with the cost exponent cooled over the budget."""

from __future__ import annotations

from eeipu_ray.search.acquisition import CostAwareLogEI, LogCArBO
from eeipu_ray.search.strategies.base import AcquisitionInputs, CooledStrategy, register


@register
class CArBO(CooledStrategy):
    """``log EI + eta log E[1/C]``, one total-cost GP (Lee et al., arXiv:2003.10870)."""

    name = "carbo"
    needs_total_cost = True

    def build(self, inputs: AcquisitionInputs) -> CostAwareLogEI:
        assert inputs.costs.total_cost is not None
        return LogCArBO(
            inputs.objective,
            inputs.best_f,
            inputs.costs.total_cost,
            eta=inputs.eta,
            mc_samples=inputs.mc_samples,
        )
