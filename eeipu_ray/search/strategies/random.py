"""Random search: independent uniform points, no models."""

from __future__ import annotations

from eeipu_ray.search.strategies.base import AcquisitionStrategy, register


@register
class RandomSearch(AcquisitionStrategy):
    """Every suggestion is a uniform point of the cube (reproducible per index)."""

    name = "random"
    proposes_randomly = True
