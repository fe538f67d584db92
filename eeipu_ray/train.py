"""Data-parallel pipeline stages on Ray Train.

:func:`train_stage` makes a stage that trains on several Ray Train workers
(a ``TorchTrainer``) inside its trial; :func:`max_concurrent_trials` says how
many trials of such a pipeline a Ray cluster runs at once.

Such a stage runs a ``ray.train.torch.TorchTrainer`` inside its trial, with
``train_loop_config={"inputs": ..., "params": ...}``: the previous stage's
output (put in the object store once, each worker fetches it) and this
stage's hyperparameters. Every worker calls ``train_loop(inputs, params)``
with the torch process group set up (Gloo or NCCL), so the loop uses
``ray.train.get_context()``, ``ray.train.torch.prepare_model`` (DDP) and
``torch.distributed`` as in any Ray Train loop.

What the loop hands back:

* **Output**: what rank 0 returns becomes the stage's output (what the
  other ranks return is dropped). It must be something the prefix cache
  stores: a dict of tensors (a ``state_dict``; tensors come back on the
  CPU), JSON values, a ``pathlib.Path``. A path must be readable from the
  trial's node (the same node, or storage every node mounts); else the
  stage fails naming it. When rank 0 returns ``None``, the output is the
  directory of the last checkpoint the loop reported
  (``ray.train.report(metrics, checkpoint=...)``), copied into the
  trial's scratch directory; ``None`` if it reported none.
* **Progress**: the metrics rank 0 passes to ``ray.train.report`` reach
  the stage's :meth:`~eeipu_ray.pipeline.StageContext.report` (under Tune,
  an intermediate result when they carry the trial's metric). As Ray
  Train requires, every worker calls ``ray.train.report`` the same number
  of times.

Cost: the stage is charged its wall time times ``num_workers``
(worker-seconds, declared with ``ctx.charge``), from the start of the
worker group to the output back in the trial, set-up included. The budget
counts device time: a stage holding two GPUs for ten minutes uses twenty
GPU-minutes, as a user paying for two GPUs per trial counts them, and a
single-process stage on one device is charged its wall time, so both
weigh alike in the cost models and the budget. The trial's own process
only waits meanwhile and is not added. A loaded output costs its load
time, as for any stage; a failing run is charged its wall time (once).
The energy meter of the trial does not see the workers' GPUs.

Placement: Ray Train reserves the workers in a placement group of its own
while the stage runs (never while a cached output is loaded); the trial
itself needs only its own resources. Under Tune, cap the trials running at
once so that their worker groups fit the cluster:
``tune.TuneConfig(max_concurrent_trials=max_concurrent_trials(pipeline))``.
"""

from __future__ import annotations

import inspect
import io
import math
import numbers
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from queue import Empty
from typing import Any

try:
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
except ImportError as exc:  # an optional dependency of this module
    raise ImportError(
        f"eeipu_ray.train needs Ray Train and PyTorch ({exc.name} is missing): "
        "pip install 'ray[train]' torch"
    ) from exc

if not hasattr(ray.train, "UserCallback"):  # the Ray Train V1 API is selected
    raise ImportError(
        "eeipu_ray.train needs the Ray Train V2 API (rank 0's return value, user "
        "callbacks); RAY_TRAIN_V2_ENABLED=0 selects the old API: unset it"
    )

from eeipu_ray.errors import PipelineDefinitionError
from eeipu_ray.pipeline import Pipeline, Stage, StageContext

TrainLoop = Callable[[Any, dict[str, Any]], Any]
"""``train_loop(inputs, params) -> output``, run on every Ray Train worker."""

BACKENDS = ("auto", "gloo", "nccl")
"""``backend`` values: ``"auto"`` is NCCL for GPU workers and Gloo otherwise."""

_POLL_SECONDS = 0.5  # how long the stage waits for rank 0's progress before checking the run


def train_stage(
    name: str,
    train_loop: TrainLoop,
    space: Mapping[str, Any],
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    backend: str = "auto",
    storage_path: str | os.PathLike[str] | None = None,
    version: str = "1",
) -> Stage:
    """A stage that trains data-parallel on ``num_workers`` Ray Train workers.

    The stage runs a ``TorchTrainer`` inside its trial; what the loop gets and
    hands back, how the stage is charged and where its workers run: see the
    module's description (:mod:`eeipu_ray.train`).

    Args:
        name: The stage's name.
        train_loop: ``train_loop(inputs, params) -> output``, run on every
            worker; it must be picklable (a module-level function, or a
            ``functools.partial`` of one).
        space: The stage's search space (Tune domains or constants).
        num_workers: Ray Train workers, >= 1.
        use_gpu: One GPU per worker (unless ``resources_per_worker`` says
            otherwise).
        resources_per_worker: Ray resources of each worker, e.g.
            ``{"CPU": 4, "GPU": 1}``; by default 1 CPU, or 1 GPU with
            ``use_gpu``.
        backend: ``"auto"`` (NCCL with GPUs, Gloo without), ``"gloo"`` or
            ``"nccl"``.
        storage_path: Where Ray Train keeps its run state and checkpoints;
            by default the trial's scratch directory. Give storage every node
            reaches (``s3://...``, a shared mount) when workers may run on
            other nodes and the loop reports checkpoints.
        version: The stage's version. The worker count is appended to it
            (``"1+2workers"``): an output trained on another number of workers
            is another output (a per-worker batch size changes the global
            one), so it is never reused for this stage.

    Returns:
        The :class:`~eeipu_ray.pipeline.Stage`.

    Raises:
        PipelineDefinitionError: naming the stage and the value, for a
            ``train_loop`` that is not a two-argument callable, a
            ``num_workers`` that is not an integer >= 1, an unknown
            ``backend`` (or NCCL without GPUs), resources that are not
            ``{name: number >= 0}``, and whatever Ray's ``ScalingConfig``
            rejects.

    Example:
        >>> def loop(data, hp):
        ...     model = ray.train.torch.prepare_model(torch.nn.Linear(8, 1))
        ...     ...  # train on this worker's shard, ray.train.report({"loss": ...})
        ...     return {k: v.detach() for k, v in model.module.state_dict().items()}
        >>> train = train_stage("train", loop, {"lr": tune.loguniform(1e-4, 1e-1)},
        ...                     num_workers=2)
    """
    fn = _TrainStageFn(
        stage=name,
        train_loop=train_loop,
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources_per_worker,
        backend=backend,
        storage_path=None if storage_path is None else os.fspath(storage_path),
    )
    if not isinstance(version, str) or not version:
        raise PipelineDefinitionError(
            f"stage {name!r}: version {version!r} must be a non-empty string"
        )
    return Stage(name, fn, dict(space), version=f"{version}+{num_workers}workers")


def max_concurrent_trials(
    pipeline: Pipeline,
    *,
    cpus: float = 1.0,
    gpus: float = 0.0,
    cluster: Mapping[str, float] | None = None,
) -> int:
    """How many trials of ``pipeline`` a cluster runs at once, worker groups included.

    A trial holds its own resources (``cpus``, ``gpus``: what it asks Tune
    for, 1 CPU by default) from start to end, and, while one of its
    :func:`train_stage` stages runs, that stage's worker group, which Ray Train
    reserves in a placement group of its own. Tune knows only the first: left
    alone, it starts more trials than their worker groups have room for, and
    those wait (for ever once the trials hold every CPU). A trial is therefore
    counted as its own resources plus the largest worker group of its stages
    (stages run one at a time), and the answer is how many such trials fit
    ``cluster``.

    A Tune placement group with a bundle per worker would not help: Ray Train
    does not place its workers in the trial's group, so those bundles would be
    held twice.

    Args:
        pipeline: The pipeline; its :func:`train_stage` stages are counted.
        cpus: CPUs each trial asks Tune for (``tune.with_resources``).
        gpus: GPUs each trial asks Tune for.
        cluster: Resources of the cluster (``{"CPU": 8, "GPU": 2}``); by
            default ``ray.cluster_resources()`` of the running Ray.

    Returns:
        The number of trials for ``tune.TuneConfig(max_concurrent_trials=...)``
        (or ``EEIPUSearcher(max_concurrent=...)``), >= 1.

    Raises:
        ValueError: ``cpus``/``gpus`` not finite numbers >= 0, a trial that
            needs no resources at all, or a cluster too small for one trial
            (naming the resource, what a trial needs and what the cluster has).

    Example:
        >>> tune.TuneConfig(max_concurrent_trials=max_concurrent_trials(pipeline))
    """
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"pipeline must be a Pipeline, got {type(pipeline).__name__}")
    for label, value in (("cpus", cpus), ("gpus", gpus)):
        if not _is_finite_nonnegative(value):
            raise ValueError(f"{label}={value!r} must be a finite number >= 0")
    need = _trial_needs(pipeline, float(cpus), float(gpus))
    if not need:
        raise ValueError(
            f"pipeline {pipeline.name!r}: a trial with cpus={cpus!r}, gpus={gpus!r} and no "
            "Ray Train stage needs no resources; there is nothing to count"
        )
    if cluster is None:
        if not ray.is_initialized():
            raise ValueError("Ray is not running: call ray.init() first, or pass cluster=")
        cluster = ray.cluster_resources()
    fits: list[int] = []
    for resource, amount in sorted(need.items()):
        available = float(cluster.get(resource, 0.0))
        # A hair of slack: fractional resources add up with float rounding.
        count = math.floor(available / amount + 1e-9)
        if count < 1:
            raise ValueError(
                f"pipeline {pipeline.name!r}: one trial needs {amount:g} {resource} (its own "
                f"resources plus its largest Ray Train worker group) but the cluster has "
                f"{available:g}; use fewer workers or a larger cluster"
            )
        fits.append(count)
    return min(fits)


@dataclass(frozen=True)
class _TrainStageFn:
    """The function of a :func:`train_stage` stage (its options checked once)."""

    stage: str
    train_loop: TrainLoop
    num_workers: int
    use_gpu: bool
    resources_per_worker: Mapping[str, float] | None
    backend: str
    storage_path: str | None

    def __post_init__(self) -> None:
        where = f"stage {self.stage!r}"
        if not callable(self.train_loop):
            raise PipelineDefinitionError(
                f"{where}: train_loop {self.train_loop!r} is not callable"
            )
        _check_two_arguments(where, self.train_loop)
        if (
            isinstance(self.num_workers, bool)
            or not isinstance(self.num_workers, numbers.Integral)
            or self.num_workers < 1
        ):
            raise PipelineDefinitionError(
                f"{where}: num_workers={self.num_workers!r} must be an integer >= 1"
            )
        if not isinstance(self.use_gpu, bool):
            raise PipelineDefinitionError(f"{where}: use_gpu={self.use_gpu!r} must be a bool")
        if self.backend not in BACKENDS:
            raise PipelineDefinitionError(
                f"{where}: backend={self.backend!r} must be one of {BACKENDS}"
            )
        object.__setattr__(self, "num_workers", int(self.num_workers))
        if self.resources_per_worker is not None:
            object.__setattr__(
                self, "resources_per_worker", _checked_resources(where, self.resources_per_worker)
            )
        try:
            scaling = self.scaling_config()
        except (TypeError, ValueError) as exc:
            raise PipelineDefinitionError(f"{where}: Ray Train refuses its workers: {exc}") from exc
        if self.resolved_backend == "nccl" and not scaling.num_gpus_per_worker:
            raise PipelineDefinitionError(
                f"{where}: backend='nccl' needs GPU workers; pass use_gpu=True or backend='gloo'"
            )

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.scaling_config().num_gpus_per_worker else "gloo"

    def scaling_config(self) -> ray.train.ScalingConfig:
        return ray.train.ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=(
                None if self.resources_per_worker is None else dict(self.resources_per_worker)
            ),
        )

    def worker_group(self) -> dict[str, float]:
        """The resources of the whole worker group, as Ray Train requests them."""
        scaling = self.scaling_config()
        per_worker = {
            "CPU": float(scaling.num_cpus_per_worker),
            "GPU": float(scaling.num_gpus_per_worker),
            **{k: float(v) for k, v in scaling.additional_resources_per_worker.items()},
        }
        return {k: v * self.num_workers for k, v in per_worker.items() if v > 0}

    def __call__(self, inputs: Any, params: dict[str, Any], ctx: StageContext) -> Any:
        start = time.perf_counter()
        result = self._fit(inputs, params, ctx)
        output = _stage_output(result, ctx)
        # Worker-seconds: every worker holds its device for the stage's wall time.
        ctx.charge((time.perf_counter() - start) * self.num_workers)
        return output

    def _fit(self, inputs: Any, params: dict[str, Any], ctx: StageContext) -> ray.train.Result:
        storage = self.storage_path or str(Path(ctx.trial_dir).resolve() / "ray-train")
        # num_cpus=0: the queue takes nothing from the trial's bundle.
        progress = Queue(actor_options={"num_cpus": 0})
        try:
            trainer = TorchTrainer(
                partial(_worker_main, self.train_loop),
                train_loop_config={
                    # One copy in the object store, fetched by each worker.
                    "inputs": None if inputs is None else ray.put(inputs),
                    "params": dict(params),
                },
                torch_config=TorchConfig(backend=self.resolved_backend),
                scaling_config=self.scaling_config(),
                run_config=ray.train.RunConfig(
                    # A fresh name: Ray Train resumes a run whose name it finds in storage.
                    name=f"{ctx.stage}-{uuid.uuid4().hex[:12]}",
                    storage_path=storage,
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                    callbacks=[_RankZeroProgress(progress)],
                ),
            )
            return _fit_forwarding_progress(trainer, progress, ctx)
        finally:
            progress.shutdown()


class _RankZeroProgress(ray.train.UserCallback):
    """Runs in the Ray Train controller: hands what rank 0 reports to the stage."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if metrics:
            self._queue.put(dict(metrics[0]))


def _fit_forwarding_progress(
    trainer: TorchTrainer, progress: Queue, ctx: StageContext
) -> ray.train.Result:
    """``trainer.fit()``, while rank 0's progress goes to ``ctx.report`` from this thread
    (the trial's reporter runs where the stage runs, as for any stage)."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the stage's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=f"eeipu-train-{ctx.stage}", daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            metrics = progress.get(timeout=_POLL_SECONDS)
        except Empty:
            continue
        _report(ctx, metrics)
    # The controller puts each report before the run ends: what is left is all there.
    while True:
        try:
            metrics = progress.get_nowait()
        except Empty:
            break
        _report(ctx, metrics)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _report(ctx: StageContext, metrics: Mapping[Any, Any]) -> None:
    ctx.report(**{key: value for key, value in metrics.items() if isinstance(key, str)})


def _stage_output(result: ray.train.Result, ctx: StageContext) -> Any:
    """The stage's output from the run's result: rank 0's return value, else the
    last checkpoint's directory, else ``None``."""
    if result.return_value is not None:
        output = _unpack(result.return_value)
        missing = next((p for p in _paths(output) if not p.exists()), None)
        if missing is not None:
            raise FileNotFoundError(
                f"stage {ctx.stage!r}: rank 0 returned the path {str(missing)!r}, which the "
                "trial's node cannot read; write it to storage every node mounts, or report "
                "it as a checkpoint (ray.train.report(metrics, checkpoint=...)) and return None"
            )
        return output
    if result.checkpoint is not None:
        target = Path(ctx.trial_dir) / f"{ctx.stage}-checkpoint"
        return Path(result.checkpoint.to_directory(str(target)))
    return None


def _worker_main(train_loop: TrainLoop, config: dict[str, Any]) -> bytes | None:
    """The loop each Ray Train worker runs: fetch the inputs, train, pack rank 0's output."""
    inputs = config["inputs"]
    if isinstance(inputs, ray.ObjectRef):
        inputs = ray.get(inputs)
    output = train_loop(inputs, dict(config["params"]))
    if output is None or ray.train.get_context().get_world_rank() != 0:
        return None
    return _pack(output)


# ----------------------------------------------------------------- helpers
def _pack(value: Any) -> bytes:
    # Ray Train refuses tensors in a return value (its controller need not
    # import torch); torch's own format keeps dtypes, shapes and shared storage.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    # Written by this stage's own rank-0 worker: full unpickling trusts nobody new.
    # map_location: GPU tensors come back on the CPU, where the cache stores them.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _paths(value: Any) -> Iterator[Path]:
    """The paths in ``value`` and in the mappings, lists and tuples it holds."""
    if isinstance(value, Path):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _paths(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _paths(item)


def _trial_needs(pipeline: Pipeline, cpus: float, gpus: float) -> dict[str, float]:
    """A trial's own resources plus the largest worker group of each kind among its stages."""
    # Any stage function that says what worker group it starts (a train_stage's, or
    # a wrapper of one, such as a multi-worker eeipu_ray.hf.trainer_stage).
    groups = [
        s.fn.worker_group()
        for s in pipeline.stages
        if callable(getattr(s.fn, "worker_group", None))
    ]
    need = {"CPU": cpus, "GPU": gpus}
    for resource in {r for group in groups for r in group}:
        need[resource] = need.get(resource, 0.0) + max(g.get(resource, 0.0) for g in groups)
    return {resource: amount for resource, amount in need.items() if amount > 0}


def _checked_resources(where: str, resources: Any) -> dict[str, float]:
    if not isinstance(resources, Mapping):
        raise PipelineDefinitionError(
            f"{where}: resources_per_worker={resources!r} must be a mapping "
            "{resource: amount}, e.g. {'CPU': 2, 'GPU': 1}"
        )
    checked: dict[str, float] = {}
    for key, amount in resources.items():
        if not isinstance(key, str) or not key:
            raise PipelineDefinitionError(
                f"{where}: resources_per_worker key {key!r} must be a resource name"
            )
        if key in ("cpu", "gpu"):  # Tune accepts them; Ray Train's workers do not
            raise PipelineDefinitionError(
                f"{where}: resources_per_worker key {key!r}: Ray names it {key.upper()!r}"
            )
        if not _is_finite_nonnegative(amount):
            raise PipelineDefinitionError(
                f"{where}: resources_per_worker[{key!r}]={amount!r} must be a finite number >= 0"
            )
        checked[key] = float(amount)
    if not any(checked.values()):
        raise PipelineDefinitionError(
            f"{where}: resources_per_worker={resources!r} asks for nothing; give each worker "
            "at least one resource"
        )
    return checked


def _check_two_arguments(where: str, train_loop: TrainLoop) -> None:
    try:
        signature = inspect.signature(train_loop)
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call tell
        return
    try:
        signature.bind(None, {})
    except TypeError as exc:
        raise PipelineDefinitionError(
            f"{where}: train_loop {getattr(train_loop, '__name__', train_loop)!r} must accept "
            f"(inputs, params); its signature is {signature}"
        ) from exc


def _is_finite_nonnegative(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(float(value)) and float(value) >= 0.0
