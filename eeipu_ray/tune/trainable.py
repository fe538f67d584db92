"""The Ray Tune trainable that runs a pipeline memoized in a worker."""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

from ray import tune

from eeipu_ray import result as R
from eeipu_ray.cache import PrefixCache
from eeipu_ray.errors import EnergyMeterError, StageExecutionError

if TYPE_CHECKING:
    from eeipu_ray.energy import EnergyMeter
    from eeipu_ray.pipeline import Pipeline

logger = logging.getLogger(__name__)


def _trial_device() -> str:
    """``"cuda"`` when Ray gave this trial a GPU (Ray sets CUDA_VISIBLE_DEVICES), else ``"cpu"``."""
    import ray

    if not ray.get_gpu_ids():
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _trial_meter(cost: str, meter: str | None, trial_id: str | None) -> EnergyMeter:
    """The energy meter of this trial: NVML for the GPUs Ray assigned to it (none
    for a CPU trial), RAPL where readable; none with ``meter=None``.

    A trial holding a fraction of a GPU shares the GPU's energy counter with the
    other trials on it: its readings are marked shared (see ``eeipu_ray.energy``).

    Raises:
        EnergyMeterError: ``cost="energy"`` and no meter works here.
    """
    import ray

    from eeipu_ray.energy import NoMeter, auto_meter

    if meter is None:
        return NoMeter({"all": "energy metering is off for this trainable (meter=None)"})
    gpu_ids = list(ray.get_gpu_ids())
    shared = False
    if gpu_ids:
        gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        shared = 0.0 < gpus < len(gpu_ids) or not float(gpus).is_integer()
    opened = auto_meter(gpu_ids, shared_gpu=shared)
    if cost == "energy" and not opened.measured:
        reason = opened.explain() if isinstance(opened, NoMeter) else ""
        opened.close()
        raise EnergyMeterError(
            f"trial {trial_id}: energy is the cost but no energy meter works on this node "
            f"({reason}); run on nodes with NVIDIA GPUs (NVML, with the 'energy' extra) or "
            "readable RAPL counters, or use time as the cost"
        )
    return opened


def _check_trainable_arguments(
    metric: Any, cost: Any, meter: Any, energy: str | None
) -> tuple[str, str | None]:
    """``(cost, meter)``, with the former ``energy=`` argument folded in.

    Raises:
        ValueError: an invalid argument, named with its value.
    """
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty string, got {metric!r}")
    if energy is not None:
        if energy not in ("auto", "required", "off"):
            raise ValueError(f"energy={energy!r} must be 'auto', 'required' or 'off'")
        replacement = {"auto": "", "required": 'cost="energy"', "off": "meter=None"}[energy]
        warnings.warn(
            f"pipeline_trainable(energy={energy!r}) is deprecated and will be removed"
            + (f": pass {replacement}" if replacement else ": it is the default"),
            FutureWarning,
            stacklevel=4,
        )
        cost = "energy" if energy == "required" else cost
        meter = None if energy == "off" else meter
    R.check_cost(cost)
    if meter not in ("auto", None):
        raise ValueError(f"meter={meter!r} must be 'auto' or None")
    if cost == "energy" and meter is None:
        raise ValueError('cost="energy" needs an energy meter; meter=None measures nothing')
    return cost, meter


def pipeline_trainable(
    pipeline: Pipeline,
    cache: PrefixCache | None = None,
    metric: str = "score",
    *,
    progress: bool = True,
    cost: str = "time",
    meter: str | None = "auto",
    energy: str | None = None,
) -> Any:
    """Return a function trainable for ``tune.run`` / ``tune.Tuner`` / ``tune.with_resources``.

    Each trial runs ``pipeline`` through the memoized runner against ``cache``
    (the local-directory default when ``None``) and reports one final result
    with the metric and the per-stage costs; see
    :meth:`eeipu_ray.pipeline.PipelineRun.to_result` for the schema. Progress a
    stage reports with ``ctx.report(...)`` becomes an intermediate
    ``tune.report`` when it carries the metric (Tune requires the metric in
    every report).

    Two trials that need the same missing prefix at once both compute it; one
    complete entry per prefix survives and the other copy is discarded (see
    docs/cache.md). No lock is held across a stage, so a killed worker can never leave
    other trials waiting, and a worker killed while writing leaves no visible
    entry: the next trial recomputes the stage.

    The trainable carries ``cache`` by value: its settings, never a live
    filesystem client or the object-store actor's handle, which every trial
    process opens (or finds by name) again. The trial's Ray node id is recorded
    in the entries it writes (``manifest.producer["node_id"]``).

    Energy: with ``meter="auto"`` (default) each trial opens the meters that
    work on its node (NVML for the GPUs Ray assigned to it, RAPL for the CPU
    packages when readable) and reports per-stage energy next to per-stage
    time; ``meter=None`` measures nothing (CPU-seconds are still reported).
    ``cost="energy"`` (energy is the searcher's cost, as
    ``EngineOptions(cost="energy")``) fails a trial before it runs a stage when
    its node has no meter. The former ``energy="required"``/``"off"`` still
    work, with a ``FutureWarning``.

    Example:
        >>> trainable = pipeline.as_trainable(cache=PrefixCache("/tmp/c"), metric="acc")
        >>> tune.Tuner(trainable, param_space=pipeline.search_space).fit()
    """
    cost, meter = _check_trainable_arguments(metric, cost, meter, energy)
    return _trial_function(
        pipeline, PrefixCache() if cache is None else cache, metric, progress, cost, meter
    )


def _trial_function(
    pipeline: Pipeline,
    cache: PrefixCache,
    metric: str,
    progress: bool,
    cost: str,
    meter: str | None,
) -> Any:
    """The function trainable of :func:`pipeline_trainable` (arguments checked)."""

    def reporter(progress_metrics: dict[str, Any]) -> None:
        if progress and metric in progress_metrics:
            tune.report({k: v for k, v in progress_metrics.items() if isinstance(v, int | float)})

    def run_trial(config: dict[str, Any]) -> None:
        import ray

        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        os.environ.setdefault("EEIPU_NODE_ID", ray.get_runtime_context().get_node_id())
        trial_dir = ctx.get_trial_dir() or os.getcwd()
        trial_meter = _trial_meter(cost, meter, trial_id)
        try:
            run = pipeline.run(
                config,
                cache,
                trial_dir=os.path.join(trial_dir, "eeipu"),
                device=_trial_device(),
                reporter=reporter,
                trial_id=trial_id,
                meter=trial_meter,
            )
        except StageExecutionError as exc:
            if exc.spent:
                # What the trial spent, before it fails: the searcher charges it
                # (Tune tells a searcher of an errored trial nothing else). The
                # metric must be in every report; NaN marks the failure.
                tune.report({**exc.spent, metric: math.nan, R.STAGE_FAILED: 1})
            raise
        finally:
            trial_meter.close()
        tune.report(run.to_result(metric))

    run_trial.__name__ = pipeline.name
    run_trial.__qualname__ = pipeline.name
    return run_trial
