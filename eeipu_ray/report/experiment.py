"""An experiment directory read back: its trials and the searcher's decisions.

Two layouts are understood:

* what ``eeipu-ray run`` writes next to Tune's files: ``summary.json`` (the
  run's options and totals), ``trials.json`` (one :class:`TrialRow` per trial,
  in completion order) and, with an EEIPU-family searcher, ``decisions.json``
  (the engine's decision log, see ``BOEngine.decisions``);
* a plain Ray Tune experiment directory: one subdirectory per trial holding
  ``result.json`` (one JSON result per line, the last one final) and
  ``params.json``. Its trials are read with the same parser as a run's, from
  the flat result schema of ``PipelineRun.to_result``.

Nothing here imports Ray, torch or matplotlib.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eeipu_ray import result as R
from eeipu_ray.errors import EEIPUError

SUMMARY_FILE = "summary.json"
TRIALS_FILE = "trials.json"
DECISIONS_FILE = "decisions.json"
FORMAT = 1


class ReportError(EEIPUError):
    """A report could not be made."""


class ExperimentDirError(ReportError, ValueError):
    """The directory is not an experiment directory, or its files cannot be read."""


@dataclass
class TrialRow:
    """One trial as a report shows it.

    Attributes:
        trial_id: Tune's trial id (``None`` if the trial reported nothing).
        status: ``"completed"``, or ``"failed"`` (errored, or its metric missing,
            NaN or infinite).
        objective: The metric as reported (not sign-flipped); ``None`` unless completed.
        memoized_stages: Leading stages loaded from the prefix cache.
        charged_cost: What the trial was charged (``total_cost``: compute time of
            the executed stages plus load time of the loaded ones).
        stage_costs: Per stage, what this trial spent on it.
        compute_costs: Per stage, what computing it costs (for a loaded stage:
            the original compute time, i.e. what loading saved).
        cache_hit: Per stage, whether it was loaded from the cache.
        stage_energy: Per stage, the energy this trial spent on it (joules);
            only stages a meter measured (empty where no meter existed).
        compute_energy: Per stage, what computing it costs in joules (for a
            loaded stage: its original compute energy), where known.
        energy_joules: The trial's total energy, ``None`` unless measured.
        cpu_seconds: The trial's process CPU time (``None`` in older results).
        config: The trial's config, nested ``{stage: {name: value}}``.
        finished_at: Unix time of the trial's last result (Tune's ``timestamp``).
        error: Why the trial failed, when it did.
    """

    trial_id: str | None
    status: str
    objective: float | None
    memoized_stages: int = 0
    charged_cost: float = 0.0
    stage_costs: dict[str, float] = field(default_factory=dict)
    compute_costs: dict[str, float] = field(default_factory=dict)
    cache_hit: dict[str, bool] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    finished_at: float | None = None
    stage_energy: dict[str, float] = field(default_factory=dict)
    compute_energy: dict[str, float] = field(default_factory=dict)
    energy_joules: float | None = None
    cpu_seconds: float | None = None
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRow:
        objective = data.get("objective")
        finished = data.get("finished_at")
        energy, cpu = data.get("energy_joules"), data.get("cpu_seconds")
        return cls(
            trial_id=None if data.get("trial_id") is None else str(data["trial_id"]),
            status=str(data.get("status", "completed")),
            objective=None if objective is None else float(objective),
            memoized_stages=int(data.get("memoized_stages") or 0),
            charged_cost=float(data.get("charged_cost") or 0.0),
            stage_costs={str(k): float(v) for k, v in dict(data.get("stage_costs", {})).items()},
            compute_costs={
                str(k): float(v) for k, v in dict(data.get("compute_costs", {})).items()
            },
            cache_hit={str(k): bool(v) for k, v in dict(data.get("cache_hit", {})).items()},
            config=dict(data.get("config") or {}),
            finished_at=None if finished is None else float(finished),
            error=data.get("error"),
            stage_energy={str(k): float(v) for k, v in dict(data.get("stage_energy", {})).items()},
            compute_energy={
                str(k): float(v) for k, v in dict(data.get("compute_energy", {})).items()
            },
            energy_joules=None if energy is None else float(energy),
            cpu_seconds=None if cpu is None else float(cpu),
        )


@dataclass
class Experiment:
    """What a report is made of.

    Attributes:
        path: The experiment directory.
        metric: The objective's name; ``mode``: ``"max"`` or ``"min"``.
        stage_names: The pipeline's stages, in order (``[]`` when the trials
            report no per-stage costs).
        trials: One row per trial, in completion order.
        decisions: The searcher's decision log (dicts of ``Decision.to_dict``),
            or ``None`` when the directory has none.
        budget: The cost budget, when known; ``n_warmup``: the warm-up size.
        searcher: The searcher's name (``"eeipu"``, ..., ``"tune-random"``), when known.
        pipeline: The pipeline's name, when known.
        summary: ``summary.json`` as written by ``eeipu-ray run`` (``{}`` if absent).
    """

    path: Path
    metric: str
    mode: str
    stage_names: list[str]
    trials: list[TrialRow]
    decisions: list[dict[str, Any]] | None = None
    budget: float | None = None
    n_warmup: int | None = None
    searcher: str | None = None
    pipeline: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def completed(self) -> list[TrialRow]:
        return [t for t in self.trials if t.completed]

    @property
    def cost_spent(self) -> float:
        return math.fsum(t.charged_cost for t in self.trials)

    @property
    def energy_measured(self) -> bool:
        """Whether any trial's energy was measured (then the report shows it)."""
        return any(t.energy_joules is not None or t.stage_energy for t in self.trials)

    @property
    def energy_spent(self) -> float | None:
        """Measured energy of all trials (J); ``None`` unless every trial has it."""
        values = [t.energy_joules for t in self.trials]
        if not values or any(v is None for v in values):
            return None
        return math.fsum(v for v in values if v is not None)

    @property
    def cost_without_memoization(self) -> float:
        """What the trials would have cost with every stage computed."""
        return math.fsum(
            math.fsum(t.compute_costs.values()) if t.compute_costs else t.charged_cost
            for t in self.trials
        )

    def best(self) -> TrialRow | None:
        """The completed trial with the best objective (the first one on a tie)."""
        sign = 1.0 if self.mode == "max" else -1.0
        best: TrialRow | None = None
        for t in self.completed:
            assert t.objective is not None
            if best is None or sign * t.objective > sign * (best.objective or 0.0):
                best = t
        return best


def trial_row(
    result: Mapping[str, Any] | None,
    metric: str,
    *,
    config: Mapping[str, Any] | None = None,
    error: str | None = None,
    stage_names: Sequence[str] | None = None,
) -> TrialRow:
    """A :class:`TrialRow` from a trial's final flat result.

    Args:
        result: The last result the trial reported (``PipelineRun.to_result``'s
            keys plus Tune's ``trial_id``, ``timestamp``, ``config``), or ``None``.
        metric: The objective's name.
        config: The trial's config, if not in ``result``.
        error: The trial's error, if it raised.
        stage_names: The stages, in order (default: as the result lists them).
    """
    result = dict(result or {})
    stages = list(stage_names) if stage_names is not None else stage_names_of(result)
    objective = result.get(metric)
    if error is None and not _finite(objective):
        error = (
            f"metric {metric!r} not reported"
            if objective is None
            else f"metric {metric!r} is {objective!r}"
        )
    stage_costs = _per_stage(result, R.STAGE_COST, stages, float)
    total = result.get(R.TOTAL_COST)
    timestamp = result.get("timestamp")
    energy, cpu = result.get(R.TOTAL_ENERGY_JOULES), result.get(R.TOTAL_CPU_SECONDS)
    return TrialRow(
        trial_id=None if result.get("trial_id") is None else str(result["trial_id"]),
        status="failed" if error else "completed",
        objective=None if error else float(objective),  # type: ignore[arg-type]
        memoized_stages=int(result.get(R.MEMOIZED_STAGES) or 0),
        charged_cost=float(total) if _finite(total) else math.fsum(stage_costs.values()),
        stage_costs=stage_costs,
        compute_costs=_per_stage(result, R.COMPUTE_COST, stages, float),
        cache_hit=_per_stage(result, R.CACHE_HIT, stages, bool),
        config=dict(config if config is not None else result.get("config") or {}),
        finished_at=float(timestamp) if _finite(timestamp) else None,
        error=error,
        stage_energy=_per_stage(result, R.ENERGY_JOULES, stages, float),
        compute_energy=_per_stage(result, R.COMPUTE_ENERGY_JOULES, stages, float),
        energy_joules=float(energy) if _finite(energy) else None,
        cpu_seconds=float(cpu) if _finite(cpu) else None,
    )


def stage_names_of(result: Mapping[str, Any]) -> list[str]:
    """The stages a flat result reports costs of, in the result's order."""
    return list(R.stage_entries(result, R.STAGE_COST))


def load_experiment(
    path: str | Path,
    *,
    metric: str | None = None,
    mode: str | None = None,
    budget: float | None = None,
    n_warmup: int | None = None,
) -> Experiment:
    """Read an experiment directory (either layout, see the module docstring).

    Args:
        path: The experiment directory.
        metric, mode: The objective; default: from ``summary.json`` /
            ``trials.json``, else ``"score"`` and ``"max"``.
        budget, n_warmup: Override or supply the budget and warm-up size (used
            to reconstruct the cost-cooling exponent when there is no decision log).

    Raises:
        ExperimentDirError: ``path`` is not an experiment directory, or one of its
            files cannot be parsed (the message names the path).
    """
    root = Path(path)
    if not root.is_dir():
        raise ExperimentDirError(f"{str(root)!r} is not a directory")
    summary = _read_json(root / SUMMARY_FILE) if (root / SUMMARY_FILE).is_file() else {}
    trials_doc = _read_json(root / TRIALS_FILE) if (root / TRIALS_FILE).is_file() else None
    trial_dirs = [p.parent for p in sorted(root.glob("*/result.json"))]
    if not summary and trials_doc is None and not trial_dirs:
        raise ExperimentDirError(
            f"{str(root)!r} is not an experiment directory: it has no {SUMMARY_FILE} or "
            f"{TRIALS_FILE} (written by 'eeipu-ray run') and no trial subdirectories with "
            "result.json (Ray Tune)"
        )
    metric = metric or summary.get("metric") or (trials_doc or {}).get("metric") or "score"
    mode = mode or summary.get("mode") or (trials_doc or {}).get("mode") or "max"
    if mode not in ("max", "min"):
        raise ExperimentDirError(f"mode {mode!r} of {str(root)!r} is not 'max' or 'min'")

    if trials_doc is not None and trials_doc.get("metric", metric) == metric:
        try:
            trials = [TrialRow.from_dict(d) for d in trials_doc["trials"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ExperimentDirError(f"{str(root / TRIALS_FILE)!r} is malformed: {exc!r}") from exc
        stage_names = list(trials_doc.get("stage_names") or [])
    elif trial_dirs:
        trials, stage_names = _read_trial_dirs(trial_dirs, metric)
    else:
        raise ExperimentDirError(
            f"{str(root)!r} has no trials to report: no {TRIALS_FILE} for metric {metric!r} "
            "and no trial subdirectories with result.json"
        )
    if not stage_names:
        stage_names = _stages_of_rows(trials)

    decisions = None
    if (root / DECISIONS_FILE).is_file():
        doc = _read_json(root / DECISIONS_FILE)
        decisions = list(doc.get("decisions", []))
    return Experiment(
        path=root,
        metric=metric,
        mode=mode,
        stage_names=stage_names,
        trials=trials,
        decisions=decisions,
        budget=budget if budget is not None else summary.get("budget"),
        n_warmup=n_warmup if n_warmup is not None else summary.get("warmup"),
        searcher=summary.get("searcher"),
        pipeline=summary.get("pipeline"),
        summary=summary,
    )


def completion_order(rows: Iterable[tuple[TrialRow, int]]) -> list[TrialRow]:
    """Rows sorted by completion: Tune's ``timestamp`` (whole seconds), then the
    trial's creation index (exact for a sequential search)."""
    return [
        row
        for row, _ in sorted(
            rows,
            key=lambda pair: (
                math.inf if pair[0].finished_at is None else pair[0].finished_at,
                pair[1],
            ),
        )
    ]


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExperimentDirError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExperimentDirError(f"{str(path)!r} does not hold a JSON object")
    return data


def _read_trial_dirs(dirs: Sequence[Path], metric: str) -> tuple[list[TrialRow], list[str]]:
    rows: list[tuple[TrialRow, int]] = []
    stage_names: list[str] = []
    for position, trial_dir in enumerate(dirs):
        result = _last_result(trial_dir / "result.json")
        config = None
        if (trial_dir / "params.json").is_file():
            config = _read_json(trial_dir / "params.json")
        error = None
        if (trial_dir / "error.txt").is_file():
            lines = (trial_dir / "error.txt").read_text(errors="replace").strip().splitlines()
            error = lines[-1] if lines else "error"
        elif result is None:
            error = "no result reported"
        if result and not stage_names:
            stage_names = stage_names_of(result)
        row = trial_row(result, metric, config=config, error=error)
        rows.append((row, _creation_index(trial_dir.name, row.trial_id, position)))
    return completion_order(rows), stage_names


def _last_result(path: Path) -> dict[str, Any] | None:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ExperimentDirError(f"cannot read {str(path)!r}: {exc}") from exc
    if not lines:
        return None
    try:
        result = json.loads(lines[-1])
    except ValueError as exc:
        raise ExperimentDirError(f"last line of {str(path)!r} is not JSON: {exc}") from exc
    return result if isinstance(result, dict) else None


def _creation_index(dirname: str, trial_id: str | None, default: int) -> int:
    # Tune names trial directories "<trainable>_<trial_id>_<index>_<params>_<date>".
    if trial_id:
        match = re.search(rf"{re.escape(trial_id)}_(\d+)", dirname)
        if match:
            return int(match.group(1))
    return default


def _stages_of_rows(rows: Sequence[TrialRow]) -> list[str]:
    for row in rows:
        if row.stage_costs:
            return list(row.stage_costs)
    return []


def _per_stage(
    result: Mapping[str, Any], field: str, stages: Sequence[str], cast: Any
) -> dict[str, Any]:
    values = R.per_stage(result, field, stages)
    return {s: cast(v) for s, v in zip(stages, values, strict=True) if v is not None}


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
