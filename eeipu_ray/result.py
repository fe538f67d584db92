"""The flat result a pipeline trial reports to Ray Tune: one name per quantity.

The runner writes it (:meth:`eeipu_ray.pipeline.PipelineRun.to_result`); the
searcher, the trial records, the report and the CLI read it through the names
here. Trial-wide entries have plain names; per-stage entries are
``"<field>/<stage>"`` (:func:`stage_key`); ``<s>`` is a stage name:

    ==============================  ===============================================
    ``<metric>``                    from the last stage's output (a number, or a
                                    mapping holding it); other numeric entries of
                                    a mapping output are reported too
    ``memoized_stages``             leading stages loaded from the cache (int)
    ``total_cost``                  sum of ``stage_costs``
    ``stage_costs/<s>``             what this trial spent on the stage
    ``compute_costs/<s>``           what computing the stage costs (original time)
    ``cache_hit/<s>``               1 if loaded from the cache, else 0
    ``cache_bytes/<s>``             bytes loaded or stored for the stage
    ``load_seconds/<s>``            measured load time (0 unless loaded)
    ``prefix_key/<s>``              prefix key of stages 1..s
    ``cpu_seconds/<s>``             process CPU time spent on the stage (seconds)
    ``energy_joules/<s>``           energy spent on the stage (J); absent without
                                    a meter
    ``compute_energy_joules/<s>``   energy computing the stage costs (J; the
                                    original energy for a loaded stage); absent
                                    when unknown
    ``energy_source/<s>``           meter of ``energy_joules/<s>``: ``"nvml"``,
                                    ``"rapl"``, ``"nvml+rapl"`` or ``"none"``
    ``energy_measured/<s>``         1 if ``energy_joules/<s>`` was measured, else 0
    ``total_cpu_seconds``           sum of ``cpu_seconds``
    ``total_energy_joules``         sum of ``energy_joules``; absent unless every
                                    stage was metered
    ``energy_shared``               1 if the metered devices served other work too
                                    (their energy is included); with a meter only
    ==============================  ===============================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Trial-wide entries.
MEMOIZED_STAGES = "memoized_stages"  # leading stages loaded from the cache (int)
TOTAL_COST = "total_cost"  # sum of the stages' STAGE_COST
TOTAL_CPU_SECONDS = "total_cpu_seconds"  # sum of the stages' CPU_SECONDS
TOTAL_ENERGY_JOULES = "total_energy_joules"  # sum of ENERGY_JOULES; only if all were metered
ENERGY_SHARED = "energy_shared"  # 1 if the metered devices served other work too
STAGE_FAILED = "stage_failed"  # 1 in the last result of a trial whose stage raised

# Per-stage fields.
STAGE_COST = "stage_costs"  # what this trial spent on the stage (charged)
COMPUTE_COST = "compute_costs"  # what computing the stage costs (the original run's)
CACHE_HIT = "cache_hit"  # 1 if loaded from the cache
CACHE_BYTES = "cache_bytes"  # bytes loaded or stored
LOAD_SECONDS = "load_seconds"  # time to load the stage from the cache (0 unless loaded)
PREFIX_KEY = "prefix_key"  # cache key of stages 1..s
CPU_SECONDS = "cpu_seconds"  # process CPU time spent on the stage
ENERGY_JOULES = "energy_joules"  # energy spent on the stage; absent without a meter
COMPUTE_ENERGY_JOULES = "compute_energy_joules"  # energy computing the stage costs
ENERGY_SOURCE = "energy_source"  # "nvml", "rapl", "nvml+rapl" or "none"
ENERGY_MEASURED = "energy_measured"  # 1 if ENERGY_JOULES was measured


# What a trial's cost is, end to end (the searcher's budget, the trainable's
# meter, the progress table, the CLI's --cost): seconds of stage time, or joules
# measured by the trials' energy meters.
COSTS = ("time", "energy")
COST_UNITS = {"time": "s", "energy": "J"}


def check_cost(cost: Any, where: str = "cost") -> str:
    """``cost`` if it is one of :data:`COSTS`.

    Raises:
        ValueError: naming ``where`` and the value.
    """
    if cost not in COSTS:
        raise ValueError(f"{where}={cost!r} must be one of {COSTS}")
    return cost


def total_cost_key(cost: str) -> str:
    """The entry holding a trial's whole cost in the unit ``cost``."""
    return TOTAL_ENERGY_JOULES if check_cost(cost) == "energy" else TOTAL_COST


def stage_key(field: str, stage: str) -> str:
    """The result key of a per-stage ``field`` for ``stage``.

    A flat search space has one unnamed stage (``""``): its key is ``field``.
    """
    return f"{field}/{stage}" if stage else field


def stage_entries(result: Mapping[str, Any], field: str) -> dict[str, Any]:
    """``{stage: value}`` of the result's ``field/<stage>`` entries, in the result's order."""
    head = f"{field}/"
    return {
        k[len(head) :]: v for k, v in result.items() if isinstance(k, str) and k.startswith(head)
    }


def per_stage(result: Mapping[str, Any], field: str, stages: Sequence[str]) -> list[Any]:
    """The values of ``field`` for ``stages`` in order (``None`` where absent)."""
    return [result.get(stage_key(field, s)) for s in stages]


def reports_time_costs(result: Mapping[str, Any]) -> bool:
    """Whether ``result`` carries time-based cost entries."""
    return TOTAL_COST in result or bool(stage_entries(result, STAGE_COST))


def reports_energy(result: Mapping[str, Any]) -> bool:
    """Whether ``result`` carries any energy entry a cost can be made of."""
    return (
        TOTAL_ENERGY_JOULES in result
        or bool(stage_entries(result, ENERGY_JOULES))
        or bool(stage_entries(result, COMPUTE_ENERGY_JOULES))
    )


def energy_as_cost(result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` with its energy entries in the cost fields, time costs dropped.

    ``energy_joules/<s>`` becomes ``stage_costs/<s>``, ``compute_energy_joules/<s>``
    becomes ``compute_costs/<s>`` and ``total_energy_joules`` becomes
    ``total_cost``; the time-based cost entries are left out, never mixed in.
    """
    energy: dict[str, Any] = {
        stage_key(STAGE_COST, s): v for s, v in stage_entries(result, ENERGY_JOULES).items()
    }
    energy.update(
        (stage_key(COMPUTE_COST, s), v)
        for s, v in stage_entries(result, COMPUTE_ENERGY_JOULES).items()
    )
    if TOTAL_ENERGY_JOULES in result:
        energy[TOTAL_COST] = result[TOTAL_ENERGY_JOULES]
    time_heads = (f"{STAGE_COST}/", f"{COMPUTE_COST}/")
    kept = {k: v for k, v in result.items() if k != TOTAL_COST and not k.startswith(time_heads)}
    return {**kept, **energy}


__all__ = [
    "CACHE_BYTES",
    "CACHE_HIT",
    "COMPUTE_COST",
    "COMPUTE_ENERGY_JOULES",
    "CPU_SECONDS",
    "ENERGY_JOULES",
    "ENERGY_MEASURED",
    "ENERGY_SHARED",
    "ENERGY_SOURCE",
    "LOAD_SECONDS",
    "MEMOIZED_STAGES",
    "PREFIX_KEY",
    "STAGE_COST",
    "STAGE_FAILED",
    "TOTAL_COST",
    "TOTAL_CPU_SECONDS",
    "TOTAL_ENERGY_JOULES",
    "energy_as_cost",
    "per_stage",
    "reports_energy",
    "reports_time_costs",
    "stage_entries",
    "stage_key",
]
