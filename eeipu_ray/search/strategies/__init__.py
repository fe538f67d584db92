"""Acquisition strategies, one module per method, looked up by name.

Built in: ``eeipu``, ``ei``, ``eips``, ``carbo``, ``random``, ``eeipu_gittins``. See
:mod:`eeipu_ray.search.strategies.base` for how to add one.
"""

from __future__ import annotations

from eeipu_ray.search.strategies import (  # noqa: F401  (register)
    carbo,
    eeipu,
    ei,
    eips,
    gittins,
    random,
)
from eeipu_ray.search.strategies.base import (
    AcquisitionInputs,
    AcquisitionStrategy,
    CostModels,
    acquisition_names,
    get_strategy,
    register,
)

__all__ = [
    "AcquisitionInputs",
    "AcquisitionStrategy",
    "CostModels",
    "acquisition_names",
    "get_strategy",
    "register",
]
