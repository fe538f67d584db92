"""EI: log expected improvement, blind to cost (``eta = 0``)."""

from __future__ import annotations

from eeipu_ray.search.acquisition import CostAwareLogEI
from eeipu_ray.search.strategies.base import AcquisitionInputs, AcquisitionStrategy, register


@register
class EI(AcquisitionStrategy):
    """Log-EI (Ament et al., NeurIPS 2023)."""

    name = "ei"

    def build(self, inputs: AcquisitionInputs) -> CostAwareLogEI:
        return CostAwareLogEI(inputs.objective, inputs.best_f, cost=None, eta=0.0)
