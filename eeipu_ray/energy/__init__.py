"""Energy meters: NVML (the trial's GPUs), RAPL (CPU packages) when readable, or none.

Free of Ray and torch; ``nvidia-ml-py`` (the ``energy`` extra) is imported only
when an NVML meter is opened. See :mod:`eeipu_ray.energy.meters` for what each
counter covers and when energy is shared between trials.
"""

from __future__ import annotations

from eeipu_ray.energy.meters import (
    ENERGY_METERS_ENV,
    POWERCAP_ROOT,
    SOURCE_NONE,
    CompositeMeter,
    EnergyMeter,
    EnergyReading,
    EnergySpan,
    NoMeter,
    NvmlMeter,
    RaplMeter,
    auto_meter,
    visible_gpu_ids,
)
from eeipu_ray.errors import EnergyMeterError

__all__ = [
    "ENERGY_METERS_ENV",
    "POWERCAP_ROOT",
    "SOURCE_NONE",
    "CompositeMeter",
    "EnergyMeter",
    "EnergyMeterError",
    "EnergyReading",
    "EnergySpan",
    "NoMeter",
    "NvmlMeter",
    "RaplMeter",
    "auto_meter",
    "visible_gpu_ids",
]
