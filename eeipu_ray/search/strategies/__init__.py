"""Acquisition strategies, one module per method, looked up by name.

Built in: ``eeipu``, ``ei``, ``eips``, ``carbo``, ``random``. See
:mod:`eeipu_ray.search.strategies.base` for how to add one.
"""

from __future__ import annotations

from eeipu_ray.search.strategies import carbo, eeipu, ei, eips, random  # noqa: F401  (register)
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
