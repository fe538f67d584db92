"""The memoized runner: load the longest cached prefix, run the rest, store outputs.

Free of Ray: the Ray Tune trainable wraps it, and it runs as well in a plain
process, which is how the tests and ``Pipeline.run`` use it.

Cost accounting per stage (the numbers the searcher learns from):

* ``compute_cost``: what computing the stage costs. Measured with a
  monotonic clock around the stage function (CUDA synchronized first when CUDA
  is in use) or declared by the stage (``Stage.cost`` / ``ctx.charge``). For a
  loaded stage it is the original compute time recorded in the cache entry.
* ``cost``: what this trial spent on the stage. Executed: compute time plus
  the time to store its output (declared stages: the declared cost). Loaded:
  the measured load time is charged to the deepest loaded stage and 0 to the
  stages before it, whose outputs were never needed; with a declared
  ``Stage.load_cost``, every loaded stage is charged that instead.

Energy per stage, next to the time (see :mod:`eeipu_ray.energy`): an energy
meter (NVML for the trial's GPUs, RAPL for the CPU packages, where available)
is read around each executed stage and around the load of a cached prefix.

* ``energy_joules``: what this trial spent on the stage: compute + store
  energy if executed; the energy of the load for the deepest loaded stage and 0
  for the stages before it. ``None`` when no meter measured it (never 0).
* ``compute_energy_joules``: what computing the stage costs in joules: measured
  now, or the original compute energy recorded in the cache entry (``None``
  when unknown: no meter then, or an entry from before energy was recorded).
* ``cpu_seconds``: CPU time of this process spent on the stage (always
  measured; a proxy labelled as CPU-seconds, never passed off as joules).

Progress a stage reports with ``ctx.report`` is handed on with the trial's
running totals added: ``total_cost`` (seconds so far: finished stages as
charged, plus the running stage's wall time unless it declares its cost),
``total_cpu_seconds`` and, with a meter, ``total_energy_joules``. A scheduler
that stops the trial early thus sees what it has spent, and so does a searcher
that is told about the stopped trial.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eeipu_ray import result as R
from eeipu_ray.errors import CacheError, CodecError, StageExecutionError
from eeipu_ray.pipeline.stage import StageContext

if TYPE_CHECKING:
    from eeipu_ray.cache import CacheHit, PrefixCache
    from eeipu_ray.energy import EnergyMeter, EnergyReading, EnergySpan
    from eeipu_ray.pipeline.pipeline import Pipeline
    from eeipu_ray.pipeline.stage import Stage

logger = logging.getLogger(__name__)


@dataclass
class StageRecord:
    """What happened to one stage in one trial."""

    name: str
    index: int
    prefix_key: str
    status: str  # "executed" or "loaded"
    cost: float  # what this trial spent on the stage (charged): result's stage_costs/<s>
    compute_cost: float  # what computing the stage costs: result's compute_costs/<s>
    bytes: int = 0
    load_seconds: float = 0.0
    store_seconds: float = 0.0
    stored: bool = False
    producer: Mapping[str, Any] = field(default_factory=dict)
    energy_joules: float | None = None
    compute_energy_joules: float | None = None
    energy_source: str = "none"
    energy_measured: bool = False
    cpu_seconds: float = 0.0

    @property
    def cache_hit(self) -> bool:
        return self.status == "loaded"

    def result_entries(self) -> dict[str, Any]:
        """This stage's per-stage entries of the trial result (:mod:`eeipu_ray.result`)."""
        entries = {
            R.STAGE_COST: self.cost,
            R.COMPUTE_COST: self.compute_cost,
            R.CACHE_HIT: int(self.cache_hit),
            R.CACHE_BYTES: self.bytes,
            R.LOAD_SECONDS: self.load_seconds,
            R.PREFIX_KEY: self.prefix_key,
            R.CPU_SECONDS: self.cpu_seconds,
            R.ENERGY_SOURCE: self.energy_source,
            R.ENERGY_MEASURED: int(self.energy_measured),
        }
        # A missing meter is missing, not 0 J: leave the keys out.
        if self.energy_joules is not None:
            entries[R.ENERGY_JOULES] = self.energy_joules
        if self.compute_energy_joules is not None:
            entries[R.COMPUTE_ENERGY_JOULES] = self.compute_energy_joules
        return {R.stage_key(f, self.name): v for f, v in entries.items()}

    def _take_energy(self, reading: EnergyReading, *, spent: bool = True) -> None:
        """Record ``reading`` as this stage's spent energy and CPU time (or, with
        ``spent=False``, as a loaded stage's share of nothing: 0 J where a meter
        exists, still ``None`` where none does)."""
        self.energy_source = reading.source
        self.energy_measured = reading.measured
        if spent:
            self.energy_joules = reading.joules
            self.cpu_seconds = reading.cpu_seconds
        else:
            self.energy_joules = 0.0 if reading.measured else None
            self.cpu_seconds = 0.0


@dataclass
class PipelineRun:
    """The result of one memoized pipeline run.

    Attributes:
        output: The last stage's output.
        stages: One :class:`StageRecord` per stage, in order.
        memoized_stages: How many leading stages were loaded from the cache.
    """

    output: Any
    stages: list[StageRecord]
    memoized_stages: int
    energy_shared: bool = False

    @property
    def total_cost(self) -> float:
        return sum(s.cost for s in self.stages)

    @property
    def total_energy_joules(self) -> float | None:
        """Energy this trial spent on its stages; ``None`` unless every stage was metered."""
        spent = [s.energy_joules for s in self.stages]
        if not spent or any(j is None for j in spent):
            return None
        return float(math.fsum(j for j in spent if j is not None))

    @property
    def total_cpu_seconds(self) -> float:
        return float(math.fsum(s.cpu_seconds for s in self.stages))

    def to_result(self, metric: str | None = None) -> dict[str, Any]:
        """The flat result a trial reports to Ray Tune (keys: :mod:`eeipu_ray.result`).

        ``metric`` comes from the last stage's output (a number, or a mapping
        holding it); the other numeric entries of a mapping output are reported
        too, next to the trial's costs, cache hits and energy per stage.
        """
        result: dict[str, Any] = {}
        out = self.output
        last = self.stages[-1].name if self.stages else "?"
        if isinstance(out, Mapping):
            for k, v in out.items():
                if isinstance(k, str) and _is_number(v) and "/" not in k:
                    result[k] = int(v) if isinstance(v, numbers.Integral) else float(v)
            if metric is not None and metric not in result:
                raise StageExecutionError(
                    f"last stage {last!r} returned a mapping without a numeric {metric!r} entry "
                    f"(keys: {sorted(map(str, out))}); return {{{metric!r}: value, ...}}"
                )
        elif _is_number(out):
            result[metric or "score"] = float(out)
        elif metric is not None:
            raise StageExecutionError(
                f"last stage {last!r} returned {type(out).__name__}; return a number or a "
                f"mapping with a numeric {metric!r} entry"
            )
        result[R.MEMOIZED_STAGES] = self.memoized_stages
        result[R.TOTAL_COST] = self.total_cost
        for s in self.stages:
            result.update(s.result_entries())
        result[R.TOTAL_CPU_SECONDS] = self.total_cpu_seconds
        total_energy = self.total_energy_joules
        if total_energy is not None:
            result[R.TOTAL_ENERGY_JOULES] = total_energy
            result[R.ENERGY_SHARED] = int(self.energy_shared)
        return result

    def as_dict(self) -> dict[str, Any]:
        return {R.MEMOIZED_STAGES: self.memoized_stages, "stages": [asdict(s) for s in self.stages]}


def _spent_before_failure(
    records: list[StageRecord],
    memoized: int,
    stage: Stage,
    key: str,
    params: dict[str, Any],
    elapsed: float,
    span: EnergySpan,
) -> dict[str, Any]:
    """The cost fields of a trial whose stage ``stage`` raised after ``elapsed`` s.

    The failing stage is charged what it ran (its declared cost, for a stage
    that declares one, else the clock); its compute cost stays unknown (no
    ``compute_costs``), since it never finished.
    """
    seconds = elapsed
    if stage.cost is not None:
        try:
            seconds = float(stage.cost(params))
        except Exception:  # noqa: BLE001 -- the stage failed already; so may its cost function
            seconds = 0.0
        if not (math.isfinite(seconds) and seconds >= 0.0):
            seconds = 0.0
    failing = StageRecord(
        name=stage.name,
        index=len(records) + 1,
        prefix_key=key,
        status="failed",
        cost=seconds,
        compute_cost=math.nan,
    )
    failing._take_energy(span.read())
    run = PipelineRun(output=None, stages=[*records, failing], memoized_stages=memoized)
    spent = run.to_result(None)
    spent.pop(R.stage_key(R.COMPUTE_COST, stage.name), None)
    spent.pop(R.stage_key(R.COMPUTE_ENERGY_JOULES, stage.name), None)
    return spent


def _is_number(value: Any) -> bool:
    # numbers.Real covers NumPy scalars (np.float32 is no float subclass); bools are flags.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _sync_cuda() -> None:
    # Only if the stage could have queued CUDA work: never import torch here.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_pipeline(
    pipeline: Pipeline,
    config: Mapping[str, Any],
    cache: PrefixCache | None = None,
    *,
    trial_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    reporter: Callable[[dict[str, Any]], None] | None = None,
    trial_id: str | None = None,
    meter: EnergyMeter | str | None = "auto",
) -> PipelineRun:
    """Run ``pipeline`` on ``config``, reusing the longest cached prefix.

    Args:
        pipeline: The pipeline.
        config: Hyperparameters, nested ``{stage: {key: value}}`` or flat ``"stage/key"``.
        cache: Where stage outputs are looked up and stored; ``None`` runs every
            stage and stores nothing.
        trial_dir: Scratch directory for stages, kept after the run. By default a
            temporary one, removed when the run ends (pass a directory to keep
            what the stages write there).
        device: Device string handed to stages.
        reporter: Receives ``ctx.report(...)`` progress dicts, with the trial's
            running ``total_cost``, ``total_cpu_seconds`` and (with a meter)
            ``total_energy_joules`` added.
        trial_id: Recorded as the producer of stored entries.
        meter: The energy meter: ``"auto"`` (default) opens the meters that
            work here (NVML for the visible GPUs when ``device`` is CUDA, RAPL
            when readable; see :func:`eeipu_ray.energy.auto_meter`) and closes
            them at the end; ``None`` measures no energy; an open
            :class:`~eeipu_ray.energy.EnergyMeter` is used and left open.

    Raises:
        ConfigError: the config does not fit the search space: a missing or unknown
            key, or a value of the wrong kind (not a finite number, not an
            integer; see :meth:`Pipeline.check_config`). Values outside a stage's
            declared bounds or categories run (a Tune ``param_space`` may
            override the declared space).
        StageExecutionError: a stage raised (the original exception is chained).
        CodecError: a stage returned a value no codec can store (names the stage).
    """
    from eeipu_ray.energy import NoMeter, auto_meter, visible_gpu_ids

    per_stage = pipeline.check_config(config, in_domain=False)
    keys = pipeline._keys(per_stage)
    if meter == "auto":
        gpu_ids = visible_gpu_ids() if device.startswith("cuda") else []
        energy_meter, owned = auto_meter(gpu_ids), True
    elif meter is None:
        energy_meter, owned = NoMeter({"all": "run without an energy meter (meter=None)"}), True
    elif isinstance(meter, str):
        raise ValueError(f"meter={meter!r}: pass 'auto', None or an EnergyMeter")
    else:
        energy_meter, owned = meter, False
    scratch = None
    if trial_dir is None:
        scratch = tempfile.mkdtemp(prefix="eeipu-trial-")
        trial_dir = scratch
    try:
        return _run(
            pipeline,
            per_stage,
            keys,
            cache,
            energy_meter,
            trial_dir=trial_dir,
            device=device,
            reporter=reporter,
            trial_id=trial_id,
        )
    finally:
        if owned:
            energy_meter.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class _RunState:
    """What the runner carries from stage to stage of one trial."""

    progress: _Progress
    records: list[StageRecord] = field(default_factory=list)
    value: Any = None
    memoized: int = 0
    compute_so_far: list[float] = field(default_factory=list)
    energy_so_far: list[float | None] = field(default_factory=list)
    sources_so_far: list[str] = field(default_factory=list)


def _run(
    pipeline: Pipeline,
    per_stage: list[dict[str, Any]],
    keys: list[str],
    cache: PrefixCache | None,
    meter: EnergyMeter,
    *,
    trial_dir: str | os.PathLike[str],
    device: str,
    reporter: Callable[[dict[str, Any]], None] | None,
    trial_id: str | None,
) -> PipelineRun:
    """Load the longest cached prefix, then run, meter and store the remaining stages."""
    n = len(pipeline.stages)
    trial_path = Path(trial_dir)
    trial_path.mkdir(parents=True, exist_ok=True)
    # A name no stage can have (stage names never start with "."): a stage's
    # scratch directory trial_path/<stage> never holds restored inputs.
    restore_dir = trial_path / ".restored"
    if meter.shared:
        _warn_shared(meter)

    state = _RunState(progress=_Progress(reporter, metered=meter.measured))

    # 1-2. Longest cached proper prefix (the last stage is never stored).
    if cache is not None:
        _load_longest_prefix(pipeline, keys, cache, meter, restore_dir, state)

    # 3-4. Run the rest, timing and metering each stage and storing every output but the last.
    params_so_far = {s.name: p for s, p in zip(pipeline.stages, per_stage, strict=True)}
    for i in range(state.memoized, n):
        stage = pipeline.stages[i]
        ctx = StageContext(
            stage=stage.name,
            index=i + 1,
            trial_dir=trial_path / stage.name,
            device=device,
            params={s.name: params_so_far[s.name] for s in pipeline.stages[: i + 1]},
            _reporter=state.progress if reporter is not None else None,
        )
        ctx.trial_dir.mkdir(parents=True, exist_ok=True)
        record, span, declared = _execute_stage(
            pipeline, i, per_stage[i], keys[i], ctx, meter, state
        )
        if cache is not None and i < n - 1:
            _store(
                cache,
                pipeline,
                keys[i],
                state.value,
                params=per_stage[: i + 1],
                compute=state.compute_so_far,
                energy=state.energy_so_far,
                sources=state.sources_so_far,
                trial_id=trial_id,
                record=record,
                declared=declared,
            )
        record._take_energy(span.read())  # compute + store
        state.records.append(record)
        state.progress.finished(record)
    return PipelineRun(state.value, state.records, state.memoized, energy_shared=meter.shared)


def _load_longest_prefix(
    pipeline: Pipeline,
    keys: list[str],
    cache: PrefixCache,
    meter: EnergyMeter,
    restore_dir: Path,
    state: _RunState,
) -> None:
    """Load the longest cached proper prefix into ``state``, if any is cached."""
    for k in range(len(pipeline.stages) - 1, 0, -1):
        span = meter.begin()
        try:
            hit = cache.load(keys[k - 1], workdir=restore_dir)
        except (CacheError, OSError) as exc:
            # An unreachable or failing cache costs this trial its memo, not its result.
            logger.warning(
                "stage %r: cache lookup failed (%s); treating it as a miss",
                pipeline.stages[k - 1].name,
                exc,
            )
            hit = None
        if hit is None:
            continue
        _take_prefix(pipeline, keys, k, hit, span.read(), state)
        logger.info(
            "pipeline %s: loaded stages 1..%d from cache (%.3fs, %s layer)",
            pipeline.name,
            k,
            hit.seconds,
            hit.layer,
        )
        return


def _take_prefix(
    pipeline: Pipeline,
    keys: list[str],
    k: int,
    hit: CacheHit,
    load_reading: EnergyReading,
    state: _RunState,
) -> None:
    """Record the loaded stages ``1..k`` of cache hit ``hit`` in ``state``."""
    meta = hit.manifest.meta
    state.memoized, state.value = k, hit.value
    state.compute_so_far = list(meta.compute_seconds)
    state.energy_so_far = (
        list(meta.compute_energy_joules) if meta.compute_energy_joules is not None else [None] * k
    )
    state.sources_so_far = (
        list(meta.energy_sources) if meta.energy_sources is not None else ["none"] * k
    )
    for i in range(k):
        stage = pipeline.stages[i]
        deepest = i == k - 1
        if stage.load_cost is not None:
            spent = float(stage.load_cost)
        else:
            spent = hit.seconds if deepest else 0.0
        record = StageRecord(
            name=stage.name,
            index=i + 1,
            prefix_key=keys[i],
            status="loaded",
            cost=spent,
            compute_cost=float(state.compute_so_far[i]),
            bytes=hit.manifest.total_bytes if deepest else 0,
            load_seconds=hit.seconds if deepest else 0.0,
            producer=dict(hit.manifest.producer) if deepest else {},
            compute_energy_joules=_joules_or_none(state.energy_so_far[i]),
        )
        record._take_energy(load_reading, spent=deepest)
        state.records.append(record)
        state.progress.finished(record)


def _execute_stage(
    pipeline: Pipeline,
    i: int,
    params: dict[str, Any],
    key: str,
    ctx: StageContext,
    meter: EnergyMeter,
    state: _RunState,
) -> tuple[StageRecord, EnergySpan, bool]:
    """Run stage ``i`` on ``state.value``, timing and metering it.

    Returns its record (compute cost, energy not yet taken), the open energy
    span and whether its cost was declared rather than measured.
    """
    stage = pipeline.stages[i]
    _sync_cuda()
    span = meter.begin()
    state.progress.running(span, declared=stage.cost is not None)
    start = time.perf_counter()
    try:
        state.value = stage.call(state.value, params, ctx)
    except Exception as exc:
        raise StageExecutionError(
            f"stage {stage.name!r} (#{i + 1} of pipeline {pipeline.name!r}) failed with "
            f"hyperparameters {params!r}: {exc!r}",
            spent=_spent_before_failure(
                state.records,
                state.memoized,
                stage,
                key,
                params,
                time.perf_counter() - start,
                span,
            ),
        ) from exc
    _sync_cuda()
    measured = time.perf_counter() - start
    compute_reading = span.read()
    declared = ctx._charged
    if declared is None and stage.cost is not None:
        declared = _declared_cost(stage.name, stage.cost, params)
    compute = measured if declared is None else declared
    state.compute_so_far.append(compute)
    state.energy_so_far.append(compute_reading.joules)
    state.sources_so_far.append(compute_reading.source)
    record = StageRecord(
        name=stage.name,
        index=i + 1,
        prefix_key=key,
        status="executed",
        cost=compute,
        compute_cost=compute,
        compute_energy_joules=compute_reading.joules,
    )
    return record, span, declared is not None


def _declared_cost(
    name: str, cost: Callable[[Mapping[str, Any]], float], params: dict[str, Any]
) -> float:
    """The cost ``cost`` declares for stage ``name`` run on ``params``; checked finite, >= 0."""
    try:
        declared = float(cost(params))
    except Exception as exc:
        raise StageExecutionError(
            f"stage {name!r}: its cost function failed for hyperparameters {params!r}: {exc!r}"
        ) from exc
    if not (math.isfinite(declared) and declared >= 0.0):
        raise StageExecutionError(
            f"stage {name!r}: declared cost {declared!r} for {params!r} is not a finite number >= 0"
        )
    return declared


class _Progress:
    """Hands ``ctx.report`` progress on with the trial's running totals added."""

    def __init__(self, reporter: Callable[[dict[str, Any]], None] | None, *, metered: bool):
        self._reporter = reporter
        self._cost = 0.0
        self._cpu = 0.0
        self._energy: float | None = 0.0 if metered else None
        self._span: EnergySpan | None = None
        self._declared = False

    def running(self, span: EnergySpan, *, declared: bool) -> None:
        self._span, self._declared = span, declared

    def finished(self, record: StageRecord) -> None:
        self._span = None
        self._cost += record.cost
        self._cpu += record.cpu_seconds
        if self._energy is not None:
            self._energy = (
                None if record.energy_joules is None else self._energy + record.energy_joules
            )

    def __call__(self, metrics: dict[str, Any]) -> None:
        if self._reporter is None:
            return
        cost, cpu, energy = self._cost, self._cpu, self._energy
        if self._span is not None:
            reading = self._span.read()
            cpu += reading.cpu_seconds
            energy = None if energy is None or reading.joules is None else energy + reading.joules
            if not self._declared:  # a declared cost is known only when the stage ends
                cost += reading.wall_seconds
        totals: dict[str, Any] = {R.TOTAL_COST: cost, R.TOTAL_CPU_SECONDS: cpu}
        if energy is not None:
            totals[R.TOTAL_ENERGY_JOULES] = energy
        self._reporter({**metrics, **totals})


_warned_shared: set[tuple[str, ...]] = set()


def _warn_shared(meter: EnergyMeter) -> None:
    # Once per process and set of devices: a sweep would repeat it every trial.
    if meter.devices in _warned_shared:
        return
    _warned_shared.add(meter.devices)
    logger.warning(
        "energy meter %s measures devices shared with other work (%s): a trial's joules "
        "include that work, so concurrent trials on them are each charged the energy of all",
        meter.source,
        ", ".join(meter.devices),
    )


def _joules_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _store(
    cache: PrefixCache,
    pipeline: Pipeline,
    key: str,
    value: Any,
    *,
    params: list[dict[str, Any]],
    compute: list[float],
    energy: list[float | None],
    sources: list[str],
    trial_id: str | None,
    record: StageRecord,
    declared: bool,
) -> None:
    from eeipu_ray.cache.manifest import EntryMeta

    n = len(params)
    meta = EntryMeta(
        pipeline=pipeline.name,
        stage_names=[s.name for s in pipeline.stages[:n]],
        stage_versions=[s.version for s in pipeline.stages[:n]],
        params=[_plain(p) for p in params],
        compute_seconds=list(compute),
        trial_id=trial_id,
        compute_energy_joules=list(energy),
        energy_sources=list(sources),
    )
    try:
        result = cache.store(key, value, meta)
    except CodecError:
        raise  # the user must fix the stage's output type: fail loudly
    except (CacheError, OSError) as exc:
        # The trial's result is still good; only the memo is lost.
        logger.warning("stage %r: output not cached (%s); the trial goes on", record.name, exc)
        return
    record.bytes = result.bytes
    record.store_seconds = result.seconds
    record.stored = result.published
    if not declared:
        record.cost += result.seconds


def _plain(value: Any) -> Any:
    """``value`` with NumPy scalars turned into the Python scalars they hold.

    The manifest is JSON: a NumPy scalar (``np.int64`` from a searcher) would be
    written as its repr, and the entry would no longer match its key. The key
    already treats a NumPy scalar as the Python scalar (:func:`canonicalize`).
    """
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):  # JSON makes it a list; the key does not differ
        return [_plain(v) for v in value]
    if (
        hasattr(value, "item")
        and type(value).__module__ == "numpy"
        and getattr(value, "ndim", 1) == 0
    ):
        return value.item()
    return value
