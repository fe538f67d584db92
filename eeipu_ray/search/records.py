"""One record per trial, and the store that owns them.

Everything the models train on is read from the records, never from lists
filled in completion order: under Ray, trials finish in any order, and a
record keeps a trial's ``x``, its objective and its costs together.

Results are parsed from the flat schema of
:meth:`eeipu_ray.pipeline.runner.PipelineRun.to_result` (``<s>`` is a stage name):

* ``<metric>``: the objective; flipped once here so that larger is better.
* ``stage_costs/<s>``: what the trial spent on the stage (charged to the budget).
* ``compute_costs/<s>``: what computing the stage costs (the cost GPs learn this).
* ``load_seconds/<s>``, ``cache_hit/<s>``, ``memoized_stages``, ``prefix_key/<s>``.
* ``total_cost``: used as the charge when no ``stage_costs/<s>`` is reported.

A result whose metric is missing, not a number, NaN or infinite, or a trial
that errored, is a *failure*: it gets no objective, but what it spent is still
charged to the budget and its finite compute costs still teach the cost GPs.

A cost entry that is negative, NaN, infinite or not a number is *unknown*: it
is neither charged nor learned, and a warning names the trial, the key and the
value (the trial's other, valid costs still count). A result with no valid
cost at all is charged 0, with a warning. A result that is not a mapping is
refused with :class:`~eeipu_ray.search.errors.TrialResultError`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from eeipu_ray import result as R
from eeipu_ray.search.errors import TrialResultError, TrialStateError

logger = logging.getLogger(__name__)


class TrialStatus(str, Enum):
    """Lifecycle of a trial as the engine sees it."""

    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass
class TrialRecord:
    """Everything the engine knows about one trial.

    Attributes:
        trial_id: The caller's id of the trial.
        config: The suggested (or observed) configuration, as decoded.
        x: ``Tensor[d]``, the config's point in the unit cube.
        status: Pending until a result arrives, then completed or failed.
        phase: How the config was proposed: ``"warmup"``, ``"bo"``, ``"random"``
            or ``"observed"`` (added from outside).
        objective: The metric in maximize orientation; ``None`` unless completed.
        compute_costs: Per stage, what computing it costs (``None`` where
            unknown, e.g. stages after a failure).
        stage_costs: Per stage, what this trial spent (``None`` where unknown).
        charged_cost: What the trial is charged against the budget.
        memoized_stages: Leading stages loaded from the cache.
        prefix_keys: Per stage ``k``, the key of stages ``1..k`` (``None`` if unknown).
        load_seconds: Per stage, the measured load time (0 unless loaded).
        planned_prefix_depth: Stages the engine expected to be cached when it
            suggested the config (0 for a fresh run).
        error: Why the trial failed, when it did.
    """

    trial_id: str
    config: Any
    x: Tensor
    status: TrialStatus = TrialStatus.PENDING
    phase: str = "bo"
    objective: float | None = None
    compute_costs: list[float | None] = field(default_factory=list)
    stage_costs: list[float | None] = field(default_factory=list)
    charged_cost: float = 0.0
    memoized_stages: int = 0
    prefix_keys: list[str | None] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    planned_prefix_depth: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Completed or failed."""
        return self.status is not TrialStatus.PENDING

    @property
    def loaded_cost(self) -> float | None:
        """What loading the memoized prefix cost this trial (``None`` if nothing was
        loaded or the per-stage spending is unknown)."""
        m = self.memoized_stages
        if m <= 0 or len(self.stage_costs) < m:
            return None
        spent = self.stage_costs[:m]
        if any(s is None for s in spent):
            return None
        return float(sum(s for s in spent if s is not None))

    def to_dict(self) -> dict[str, Any]:
        """A plain-Python form (JSON-able when the config is)."""
        return {
            "trial_id": self.trial_id,
            "config": self.config,
            "x": [float(v) for v in self.x.tolist()],
            "status": self.status.value,
            "phase": self.phase,
            "objective": self.objective,
            "compute_costs": list(self.compute_costs),
            "stage_costs": list(self.stage_costs),
            "charged_cost": self.charged_cost,
            "memoized_stages": self.memoized_stages,
            "prefix_keys": list(self.prefix_keys),
            "load_seconds": list(self.load_seconds),
            "planned_prefix_depth": self.planned_prefix_depth,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(
            trial_id=str(data["trial_id"]),
            config=data["config"],
            x=torch.tensor(data["x"], dtype=torch.double),
            status=TrialStatus(data["status"]),
            phase=str(data.get("phase", "bo")),
            objective=data.get("objective"),
            # Checkpoints of eeipu-ray 0.1 name these stage_compute_costs / stage_spent_costs.
            compute_costs=list(data.get("compute_costs", data.get("stage_compute_costs", []))),
            stage_costs=list(data.get("stage_costs", data.get("stage_spent_costs", []))),
            charged_cost=float(data.get("charged_cost", 0.0)),
            memoized_stages=int(data.get("memoized_stages", 0)),
            prefix_keys=list(data.get("prefix_keys", [])),
            load_seconds=list(data.get("load_seconds", [])),
            planned_prefix_depth=int(data.get("planned_prefix_depth", 0)),
            error=data.get("error"),
        )


class TrialStore:
    """The trial records of one search, keyed by trial id.

    Args:
        stage_names: Stage names in order (``[""]`` for a flat, single-stage space:
            then the result keys are ``stage_costs`` etc. without a suffix, or
            ``total_cost``).
        metric: Name of the objective in the results.
        mode: ``"max"`` or ``"min"``; minimized metrics are negated once, here.

    Example:
        >>> import torch
        >>> store = TrialStore(["prep", "train"], metric="loss", mode="min")
        >>> _ = store.add_pending("t1", {}, torch.zeros(0))
        >>> store.complete("t1", {"loss": 0.5, "stage_costs/prep": 2.0,
        ...                       "stage_costs/train": 3.0})
        True
        >>> store["t1"].objective, store.budget_spent
        (-0.5, 5.0)
    """

    def __init__(self, stage_names: Sequence[str], metric: str = "score", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.stage_names = list(stage_names)
        self.metric = metric
        self.mode = mode
        self._records: dict[str, TrialRecord] = {}
        self.version = 0  # bumped on every completion: models refit when it moves

    # ------------------------------------------------------------- access
    def __contains__(self, trial_id: object) -> bool:
        return trial_id in self._records

    def __getitem__(self, trial_id: str) -> TrialRecord:
        try:
            return self._records[trial_id]
        except KeyError:
            raise TrialStateError(f"unknown trial id {trial_id!r}") from None

    def get(self, trial_id: str | None, default: TrialRecord | None = None) -> TrialRecord | None:
        return self._records.get(trial_id, default) if trial_id is not None else default

    def __iter__(self) -> Iterator[TrialRecord]:
        return iter(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    @property
    def pending(self) -> list[TrialRecord]:
        return [r for r in self if r.status is TrialStatus.PENDING]

    @property
    def completed(self) -> list[TrialRecord]:
        return [r for r in self if r.status is TrialStatus.COMPLETED]

    @property
    def failed(self) -> list[TrialRecord]:
        return [r for r in self if r.status is TrialStatus.FAILED]

    @property
    def budget_spent(self) -> float:
        """Sum of the costs charged by finished trials."""
        return cost_sum(r.charged_cost for r in self if r.finished)

    def top(self, q: int) -> list[TrialRecord]:
        """The ``q`` completed records with the largest objective (ties: earlier first)."""
        done = self.completed
        order = sorted(range(len(done)), key=lambda i: (-float(done[i].objective or 0.0), i))
        return [done[i] for i in order[:q]]

    def train_xy(self) -> tuple[Tensor, Tensor]:
        """``(X, Y)`` of the completed trials: ``n x d`` and ``n x 1`` (double)."""
        done = self.completed
        if not done:
            return torch.empty(0, 0, dtype=torch.double), torch.empty(0, 1, dtype=torch.double)
        X = torch.stack([r.x for r in done]).to(torch.double)
        Y = torch.tensor([[float(r.objective)] for r in done], dtype=torch.double)  # type: ignore[arg-type]
        return X, Y

    # ---------------------------------------------------------- mutation
    def add_pending(
        self,
        trial_id: str,
        config: Any,
        x: Tensor,
        *,
        phase: str = "bo",
        prefix_keys: Sequence[str | None] | None = None,
        planned_prefix_depth: int = 0,
    ) -> TrialRecord:
        """Register a suggested trial that has no result yet.

        Raises:
            TrialStateError: the id is already known.
        """
        check_trial_id(trial_id)
        if trial_id in self._records:
            raise TrialStateError(
                f"trial id {trial_id!r} was already suggested; trial ids must be unique"
            )
        keys = list(prefix_keys) if prefix_keys is not None else []
        record = TrialRecord(
            trial_id=trial_id,
            config=config,
            x=x.detach().to(torch.double).clone(),
            phase=phase,
            prefix_keys=keys,
            planned_prefix_depth=planned_prefix_depth,
        )
        self._records[trial_id] = record
        return record

    def complete(
        self, trial_id: str, result: Mapping[str, Any] | None, error: bool | str = False
    ) -> bool:
        """Attach a trial's final result; idempotent.

        Args:
            trial_id: A pending trial.
            result: The flat result dict (may be ``None`` for an errored trial).
            error: True, or a message, when the trial raised.

        Returns:
            True if the record changed; False for a repeated completion (logged at
            debug level and ignored).

        Raises:
            TrialStateError: the trial id is unknown.
        """
        record = self[trial_id]
        if result is not None and not isinstance(result, Mapping):
            raise TrialResultError(
                f"result of trial {trial_id!r} must be a mapping of metric and cost keys "
                f"(or None), got {type(result).__name__}: {result!r:.200}"
            )
        if record.finished:
            logger.debug(
                "trial %s already %s; second completion ignored", trial_id, record.status.value
            )
            return False
        result = dict(result or {})
        self._fill_costs(record, result)
        reason = None
        if error:
            reason = error if isinstance(error, str) else "trial raised an error"
        else:
            value = result.get(self.metric)
            number = _as_float(value)
            if value is None:
                reason = f"result lacks the metric {self.metric!r}"
            elif number is None:
                reason = f"metric {self.metric!r} is not a number: {value!r:.200}"
            elif not math.isfinite(number):
                reason = f"metric {self.metric!r} is {number}"
            else:
                record.objective = number if self.mode == "max" else -number
        if reason is None:
            record.status = TrialStatus.COMPLETED
        else:
            record.status = TrialStatus.FAILED
            record.error = reason
            logger.info(
                "trial %s failed (%s); charged %.6g cost units",
                trial_id,
                reason,
                record.charged_cost,
            )
        self.version += 1
        return True

    def snapshot(self) -> TrialStore:
        """A copy whose records later mutation of this store does not reach.

        Completion replaces a record's fields rather than mutating them in place,
        so a shallow copy per record suffices; the copy keeps the version.
        """
        copy = TrialStore(self.stage_names, metric=self.metric, mode=self.mode)
        copy._records = {k: dataclasses.replace(r) for k, r in self._records.items()}
        copy.version = self.version
        return copy

    def add_record(self, record: TrialRecord) -> None:
        """Insert a record as it is (checkpoint restore)."""
        if record.trial_id in self._records:
            raise TrialStateError(f"trial id {record.trial_id!r} already present")
        self._records[record.trial_id] = record
        self.version += 1

    # ------------------------------------------------------------ parsing
    def _cost(self, record: TrialRecord, result: Mapping[str, Any], key: str) -> float | None:
        """``result[key]`` as a cost, or ``None`` when absent or invalid (warned)."""
        if key not in result:
            return None
        value = result[key]
        cost = _finite_nonneg(value)
        if cost is None and value is not None:
            logger.warning(
                "trial %s reported %s = %.200r, which is no cost (costs are finite "
                "numbers >= 0); treated as unknown: neither charged nor learned",
                record.trial_id,
                key,
                value,
            )
        return cost

    def _fill_costs(self, record: TrialRecord, result: Mapping[str, Any]) -> None:
        stages = self.stage_names
        spent = [self._cost(record, result, R.stage_key(R.STAGE_COST, s)) for s in stages]
        compute = [self._cost(record, result, R.stage_key(R.COMPUTE_COST, s)) for s in stages]
        loads = [self._cost(record, result, R.stage_key(R.LOAD_SECONDS, s)) or 0.0 for s in stages]
        memoized = _as_float(result.get(R.MEMOIZED_STAGES))
        if memoized is not None and math.isfinite(memoized):
            record.memoized_stages = max(0, min(int(memoized), len(self.stage_names)))
        # A stage run from scratch costs what it spent when no compute cost is
        # reported; not the stage a failed trial died in (``stage_failed``): what
        # it ran before it raised is no compute cost.
        died_in = -1
        if result.get(R.STAGE_FAILED):
            died_in = max((k for k, s in enumerate(spent) if s is not None), default=-1)
        for k, s in enumerate(spent):
            if compute[k] is None and s is not None and record.memoized_stages <= k != died_in:
                compute[k] = s
        record.stage_costs = spent
        record.compute_costs = compute
        record.load_seconds = loads
        if any(s is not None for s in spent):
            record.charged_cost = cost_sum(s for s in spent if s is not None)
        else:
            total = self._cost(record, result, R.TOTAL_COST)
            record.charged_cost = total if total is not None else 0.0
            if total is None and result:
                logger.warning(
                    "trial %s reported no stage_costs/<stage> nor total_cost; charged 0",
                    record.trial_id,
                )
        keys = [result.get(R.stage_key(R.PREFIX_KEY, s)) for s in self.stage_names]
        if any(isinstance(k, str) for k in keys):
            old = record.prefix_keys + [None] * (len(keys) - len(record.prefix_keys))
            record.prefix_keys = [
                k if isinstance(k, str) else o for k, o in zip(keys, old, strict=False)
            ]


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def check_trial_id(trial_id: Any) -> str:
    """Return ``trial_id`` if it is a non-empty string, else raise.

    A checkpoint stores ids as strings: an int id would not match itself after a
    restore.

    Raises:
        TrialStateError: naming the id and its type.
    """
    if not isinstance(trial_id, str) or not trial_id:
        raise TrialStateError(
            f"trial id {trial_id!r} ({type(trial_id).__name__}) must be a non-empty string"
        )
    return trial_id


def _as_float(value: Any) -> float | None:
    """``value`` as a float (Python and NumPy numbers, 0-d tensors), else ``None``.

    Strings and bools are no numbers here; an int too large for a float becomes
    an infinity of its sign (so it is "not finite", not a crash).
    """
    if value is None or isinstance(value, bool | str | bytes):
        return None
    try:
        return float(value)
    except OverflowError:
        return -math.inf if isinstance(value, int) and value < 0 else math.inf
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: tensors of > 1 element
        return None


def _finite_nonneg(value: Any) -> float | None:
    v = _as_float(value)
    return v if v is not None and math.isfinite(v) and v >= 0.0 else None


def cost_sum(values: Iterable[float]) -> float:
    """``math.fsum`` of non-negative costs; ``inf`` where the sum overflows a float."""
    try:
        return float(math.fsum(values))
    except OverflowError:  # finite costs near the float maximum: the sum is +inf
        return math.inf
