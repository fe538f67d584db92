"""EEIPU: memoization-aware, cost-cooled EI per unit of the uncached stages' cost."""

from __future__ import annotations

from eeipu_ray.search.acquisition import CostAwareLogEI, LogEEIPU
from eeipu_ray.search.strategies.base import (
    AcquisitionInputs,
    CooledStrategy,
    register,
    typical_run_cost,
)


@register
class EEIPU(CooledStrategy):
    """``log EI + eta log E[1/(eps(delta) + sum_{k >= delta} C_k)]`` over the prefix
    pool, with one cost GP per stage (Essofi et al., arXiv:2411.03731)."""

    name = "eeipu"
    needs_stage_costs = True
    memoization_aware = True

    def build(self, inputs: AcquisitionInputs) -> CostAwareLogEI:
        assert inputs.costs.stage_costs is not None
        overhead = inputs.cost_overhead * typical_run_cost(inputs.costs.stage_costs)
        return LogEEIPU(
            inputs.objective,
            inputs.best_f,
            inputs.costs.stage_costs,
            inputs.costs.load_costs,
            inputs.cached,
            eta=inputs.eta,
            mc_samples=inputs.mc_samples,
            overhead=overhead,
        )
