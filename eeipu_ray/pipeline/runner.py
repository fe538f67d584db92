"""The memoized runner: load the longest cached prefix, run the rest, store outputs.

Free of Ray: the Ray Tune trainable wraps it, and it runs as well in a plain
process, which is how the tests and ``Pipeline.run`` use it.

Cost accounting per stage (the numbers the searcher learns from):

* ``compute_seconds``: what computing the stage costs. Measured with a
  monotonic clock around the stage function (CUDA synchronized first when CUDA
  is in use) or declared by the stage (``Stage.cost`` / ``ctx.charge``). For a
  loaded stage it is the original compute time recorded in the cache entry.
* ``seconds``: what this trial spent on the stage. Executed: compute time plus
  the time to store its output (declared stages: the declared cost). Loaded:
  the measured load time is charged to the deepest loaded stage and 0 to the
  stages before it, whose outputs were never needed; with a declared
  ``Stage.load_cost``, every loaded stage is charged that instead.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eeipu_ray.errors import CacheError, CodecError, StageExecutionError
from eeipu_ray.pipeline.stage import StageContext

if TYPE_CHECKING:
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)


@dataclass
class StageRecord:
    """What happened to one stage in one trial."""

    name: str
    index: int
    prefix_key: str
    status: str  # "executed" or "loaded"
    seconds: float
    compute_seconds: float
    bytes: int = 0
    load_seconds: float = 0.0
    store_seconds: float = 0.0
    stored: bool = False
    producer: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cache_hit(self) -> bool:
        return self.status == "loaded"


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

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def to_result(self, metric: str | None = None) -> dict[str, Any]:
        """The flat result a trial reports to Ray Tune (the schema the searcher reads).

        Keys (``<s>`` is a stage name):

        ==========================  ===============================================
        ``<metric>``                from the last stage's output (a number, or a
                                    mapping holding it); other numeric entries of
                                    a mapping output are reported too
        ``memoized_stages``         leading stages loaded from the cache (int)
        ``total_cost``              sum of ``stage_costs``
        ``stage_costs/<s>``         what this trial spent on the stage
        ``compute_costs/<s>``       what computing the stage costs (original time)
        ``cache_hit/<s>``           1 if loaded from the cache, else 0
        ``cache_bytes/<s>``         bytes loaded or stored for the stage
        ``load_seconds/<s>``        measured load time (0 unless loaded)
        ``prefix_key/<s>``          prefix key of stages 1..s
        ==========================  ===============================================
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
        result["memoized_stages"] = self.memoized_stages
        result["total_cost"] = self.total_seconds
        for s in self.stages:
            result[f"stage_costs/{s.name}"] = s.seconds
            result[f"compute_costs/{s.name}"] = s.compute_seconds
            result[f"cache_hit/{s.name}"] = int(s.cache_hit)
            result[f"cache_bytes/{s.name}"] = s.bytes
            result[f"load_seconds/{s.name}"] = s.load_seconds
            result[f"prefix_key/{s.name}"] = s.prefix_key
        return result

    def as_dict(self) -> dict[str, Any]:
        return {"memoized_stages": self.memoized_stages, "stages": [asdict(s) for s in self.stages]}


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
) -> PipelineRun:
    """Run ``pipeline`` on ``config``, reusing the longest cached prefix.

    Args:
        pipeline: The pipeline.
        config: Hyperparameters, nested ``{stage: {key: value}}`` or flat ``"stage/key"``.
        cache: Where stage outputs are looked up and stored; ``None`` runs every
            stage and stores nothing.
        trial_dir: Scratch directory for stages (a temporary one by default).
        device: Device string handed to stages.
        reporter: Receives ``ctx.report(...)`` progress dicts.
        trial_id: Recorded as the producer of stored entries.

    Raises:
        ConfigError: the config does not fit the search space.
        StageExecutionError: a stage raised (the original exception is chained).
        CodecError: a stage returned a value no codec can store (names the stage).
    """
    per_stage = pipeline.split_config(config)
    keys = pipeline._keys(per_stage)
    n = len(pipeline.stages)
    trial_path = (
        Path(trial_dir) if trial_dir is not None else Path(tempfile.mkdtemp(prefix="eeipu-trial-"))
    )
    trial_path.mkdir(parents=True, exist_ok=True)
    # A name no stage can have (stage names never start with "."): a stage's
    # scratch directory trial_path/<stage> never holds restored inputs.
    restore_dir = trial_path / ".restored"

    records: list[StageRecord] = []
    value: Any = None
    memoized = 0
    compute_so_far: list[float] = []

    # 1-2. Longest cached proper prefix (the last stage is never stored).
    if cache is not None:
        for k in range(n - 1, 0, -1):
            try:
                hit = cache.load(keys[k - 1], workdir=restore_dir)
            except (CacheError, OSError) as exc:
                # An unreachable or failing cache costs this trial its memo, not its result.
                logger.warning("stage %r: cache lookup failed (%s); treating it as a miss",
                               pipeline.stages[k - 1].name, exc)
                hit = None
            if hit is None:
                continue
            memoized, value = k, hit.value
            compute_so_far = list(hit.manifest.meta.compute_seconds)
            for i in range(k):
                stage = pipeline.stages[i]
                if stage.load_cost is not None:
                    spent = float(stage.load_cost)
                else:
                    spent = hit.seconds if i == k - 1 else 0.0
                records.append(
                    StageRecord(
                        name=stage.name,
                        index=i + 1,
                        prefix_key=keys[i],
                        status="loaded",
                        seconds=spent,
                        compute_seconds=float(compute_so_far[i]),
                        bytes=hit.manifest.total_bytes if i == k - 1 else 0,
                        load_seconds=hit.seconds if i == k - 1 else 0.0,
                        producer=dict(hit.manifest.producer) if i == k - 1 else {},
                    )
                )
            logger.info(
                "pipeline %s: loaded stages 1..%d from cache (%.3fs, %s layer)",
                pipeline.name,
                k,
                hit.seconds,
                hit.layer,
            )
            break

    # 3-4. Run the rest, timing each stage and storing every output but the last.
    params_so_far = {s.name: p for s, p in zip(pipeline.stages, per_stage, strict=True)}
    for i in range(memoized, n):
        stage = pipeline.stages[i]
        params = per_stage[i]
        ctx = StageContext(
            stage=stage.name,
            index=i + 1,
            trial_dir=trial_path / stage.name,
            device=device,
            params={s.name: params_so_far[s.name] for s in pipeline.stages[: i + 1]},
            _reporter=reporter,
        )
        ctx.trial_dir.mkdir(parents=True, exist_ok=True)
        _sync_cuda()
        start = time.perf_counter()
        try:
            value = stage.call(value, params, ctx)
        except Exception as exc:
            raise StageExecutionError(
                f"stage {stage.name!r} (#{i + 1} of pipeline {pipeline.name!r}) failed with "
                f"hyperparameters {params!r}: {exc!r}"
            ) from exc
        _sync_cuda()
        measured = time.perf_counter() - start
        declared = ctx._charged
        if declared is None and stage.cost is not None:
            try:
                declared = float(stage.cost(params))
            except Exception as exc:
                raise StageExecutionError(
                    f"stage {stage.name!r}: its cost function failed for hyperparameters "
                    f"{params!r}: {exc!r}"
                ) from exc
            if not (math.isfinite(declared) and declared >= 0.0):
                raise StageExecutionError(
                    f"stage {stage.name!r}: declared cost {declared!r} for {params!r} is not "
                    "a finite number >= 0"
                )
        compute = measured if declared is None else declared
        compute_so_far.append(compute)
        record = StageRecord(
            name=stage.name,
            index=i + 1,
            prefix_key=keys[i],
            status="executed",
            seconds=compute,
            compute_seconds=compute,
        )
        if cache is not None and i < n - 1:
            _store(
                cache,
                pipeline,
                keys[i],
                value,
                params=per_stage[: i + 1],
                compute=compute_so_far,
                trial_id=trial_id,
                record=record,
                declared=declared is not None,
            )
        records.append(record)
    return PipelineRun(output=value, stages=records, memoized_stages=memoized)


def _store(
    cache: PrefixCache,
    pipeline: Pipeline,
    key: str,
    value: Any,
    *,
    params: list[dict[str, Any]],
    compute: list[float],
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
        record.seconds += result.seconds


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
