"""The Ray Tune trainable that runs a pipeline memoized in a worker."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ray import tune

from eeipu_ray.cache import PrefixCache

if TYPE_CHECKING:
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


def pipeline_trainable(
    pipeline: Pipeline,
    cache: PrefixCache | None = None,
    metric: str = "score",
    *,
    progress: bool = True,
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
    complete entry per prefix survives and the other copy is discarded (see the
    README). No lock is held across a stage, so a killed worker can never leave
    other trials waiting, and a worker killed while writing leaves no visible
    entry: the next trial recomputes the stage.

    The trainable carries ``cache`` by value: its settings, never a live
    filesystem client or the object-store actor's handle, which every trial
    process opens (or finds by name) again. The trial's Ray node id is recorded
    in the entries it writes (``manifest.producer["node_id"]``).

    Example:
        >>> trainable = pipeline.as_trainable(cache=PrefixCache("/tmp/c"), metric="acc")
        >>> tune.Tuner(trainable, param_space=pipeline.search_space).fit()
    """
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be a non-empty string, got {metric!r}")
    if cache is None:
        cache = PrefixCache()

    def reporter(progress_metrics: dict[str, Any]) -> None:
        if progress and metric in progress_metrics:
            tune.report({k: v for k, v in progress_metrics.items() if isinstance(v, int | float)})

    def run_trial(config: dict[str, Any]) -> None:
        import ray

        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        os.environ.setdefault("EEIPU_NODE_ID", ray.get_runtime_context().get_node_id())
        trial_dir = ctx.get_trial_dir() or os.getcwd()
        run = pipeline.run(
            config,
            cache,
            trial_dir=os.path.join(trial_dir, "eeipu"),
            device=_trial_device(),
            reporter=reporter,
            trial_id=trial_id,
        )
        tune.report(run.to_result(metric))

    run_trial.__name__ = pipeline.name
    run_trial.__qualname__ = pipeline.name
    return run_trial
