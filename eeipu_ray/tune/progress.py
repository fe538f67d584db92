"""Live progress of a sweep: the search's budget next to the trials.

:class:`BudgetProgress`, a Tune ``Callback``, prints a line per finished trial
(its objective, memoized stages and charged cost) and one of the experiment
(trials, memoized trials, failures, cost spent and budget left, the
cost-cooling exponent, the best trial so far). It works with any of Tune's
output modes: ``tune.RunConfig(callbacks=[BudgetProgress(...)])``.

:class:`BudgetReporter` prints Tune's status table with those columns and the
budget line; Tune calls it only under its legacy output
(``RAY_AIR_NEW_OUTPUT=0``, ``tune.RunConfig(progress_reporter=...)``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ray.tune import Callback, CLIReporter
from ray.tune.experiment import Trial

from eeipu_ray import result as R

if TYPE_CHECKING:
    from eeipu_ray.tune.searcher import EEIPUSearcher


class BudgetReporter(CLIReporter):
    """A ``CLIReporter`` whose status header carries the search's budget.

    The budget line reads ``budget_spent`` and ``eta`` from the searcher, the
    facts the search itself stops on. Hand it the very object given to
    ``tune.TuneConfig(search_alg=...)``: ``Tuner.fit`` runs both in this
    process, and ``Tuner.restore`` unpickles them together from ``tuner.pkl``
    (one object again) before restoring the searcher's state into it. Under
    Ray Client (``ray://``) the Tuner runs in the cluster with its own copies:
    leave ``searcher`` out there; the spent cost is then the sum of the trials'
    ``total_cost`` (what a pipeline trial is charged), and ``eta`` is not shown.

    Args:
        metric: The objective (sorts the table and names the best trial).
        mode: ``"max"`` or ``"min"``.
        searcher: The searcher of the run, or ``None`` (see above).
        budget: The cost budget when there is no searcher to ask.
        parameter_columns: Hyperparameters to show (flat ``"stage/name"`` keys,
            or a mapping of key to column title).
        cost: What a trial's cost is, ``"time"`` (seconds) or ``"energy"``
            (joules): the unit of the budget line, and the ``cost`` column
            (``total_cost``, or ``total_energy_joules``; what is summed
            without a searcher). ``None`` (default): the searcher's
            ``EngineOptions.cost``, or ``"time"`` without a searcher.
        max_progress_rows: Rows of the table (the best finished trials and the
            running ones), also in the final report when ``full_final_table``
            is false.
        max_report_frequency: Seconds between reports.
        full_final_table: Print every trial in the final report (Tune's default).

    Example:
        >>> searcher = EEIPUSearcher(pipeline, metric="score", mode="max", budget=600.0)
        >>> reporter = BudgetReporter("score", "max", searcher=searcher)
        >>> tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher),
        ...            run_config=tune.RunConfig(progress_reporter=reporter)).fit()
    """

    def __init__(
        self,
        metric: str,
        mode: str,
        *,
        searcher: EEIPUSearcher | None = None,
        budget: float | None = None,
        parameter_columns: Sequence[str] | Mapping[str, str] | None = None,
        cost: str | None = None,
        max_progress_rows: int = 10,
        max_report_frequency: int = 10,
        full_final_table: bool = True,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
        if cost is None:
            cost = searcher.options.cost if searcher is not None else "time"
        cost_key = R.total_cost_key(cost)
        columns = {metric: metric, R.MEMOIZED_STAGES: "memoized", cost_key: "cost"}
        super().__init__(
            metric_columns=columns,
            parameter_columns=(
                dict(parameter_columns)
                if isinstance(parameter_columns, Mapping)
                else list(parameter_columns or [])
            ),
            max_progress_rows=max_progress_rows,
            max_report_frequency=max_report_frequency,
            print_intermediate_tables=True,
            metric=metric,
            mode=mode,
            sort_by_metric=True,
        )
        self._searcher = searcher
        self._budget = budget
        self._cost_unit = R.COST_UNITS[cost]
        self._cost_key = cost_key
        self._full_final_table = full_final_table

    def set_search_properties(self, metric: str | None, mode: str | None) -> bool:
        # TuneConfig may name the same metric and mode as this reporter does;
        # Tune's base class refuses any second value, even an equal one.
        return super().set_search_properties(
            None if metric == self._metric else metric, None if mode == self._mode else mode
        )

    def report(self, trials: list[Trial], done: bool, *sys_info: str) -> None:
        final_in_full = done and self._full_final_table
        self._print(self._progress_str(trials, final_in_full, *sys_info, self.budget_line(trials)))

    def budget_line(self, trials: Sequence[Trial]) -> str:
        """``Cost: <spent> spent of <budget> (<left> left); cost-cooling eta <eta>``."""
        finished = [t for t in trials if t.is_finished()]
        return _budget_line(self._searcher, self._budget, self._cost_key, self._cost_unit, finished)


class BudgetProgress(Callback):
    """A Tune ``Callback`` that prints the progress of a budgeted, memoized search.

    On every finished trial it prints two lines to ``out``, the trial's and
    the experiment's (one line each, wrapped here)::

        trial 8a2c65b4 finished: score 0.8123, 2 stages memoized, cost 4.12 s
        [6 trials done: 2 memoized, 0 failed; 2 running] Cost: 21.3 s spent of 100 s (78.7 s left);
            cost-cooling eta 0.812; best score 0.8541 (trial 17f63968)

    and, at the end of the experiment, the experiment's line again. A failed trial
    (Tune's error, or a pipeline stage that raised) prints ``failed``; one that
    ended on an intermediate result (a scheduler stopped it before its last
    stage returned) prints ``ended after N results``.
    The counts cover every trial Tune knows, those restored by
    ``Tuner.restore`` included.

    Args:
        metric: The objective.
        mode: ``"max"`` or ``"min"``.
        searcher: The searcher of the run, whose ``budget_spent`` and ``eta``
            are the facts the search stops on; ``None`` sums the trials'
            charged costs instead. Hand it the object given to
            ``tune.TuneConfig(search_alg=...)`` (``Tuner.restore`` unpickles
            both together, one object again); leave it out under Ray Client.
        budget: The cost budget when there is no searcher to ask.
        cost: ``"time"`` (seconds) or ``"energy"`` (joules): the unit and the
            charged-cost key (``total_cost`` or ``total_energy_joules``).
            ``None``: the searcher's ``EngineOptions.cost``, else ``"time"``.
        out: Where to print (default: standard output, when printing).

    Example:
        >>> searcher = EEIPUSearcher(pipeline, metric="score", mode="max", budget=600.0)
        >>> progress = BudgetProgress("score", "max", searcher=searcher)
        >>> tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher),
        ...            run_config=tune.RunConfig(callbacks=[progress])).fit()
    """

    def __init__(
        self,
        metric: str,
        mode: str,
        *,
        searcher: EEIPUSearcher | None = None,
        budget: float | None = None,
        cost: str | None = None,
        out: TextIO | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
        if cost is None:
            cost = searcher.options.cost if searcher is not None else "time"
        self._metric = metric
        self._mode = mode
        self._searcher = searcher
        self._budget = budget
        self._cost_key = R.total_cost_key(cost)
        self._cost_unit = R.COST_UNITS[cost]
        self._out = out

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into tuner.pkl: a stream does not travel.
        return {**self.__dict__, "_out": None}

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        result = trial.last_result or {}
        cost = result.get(self._cost_key)
        cost_text = "" if cost is None else f", cost {float(cost):.4g} {self._cost_unit}"
        if _failed(result, self._metric):
            line = f"trial {trial.trial_id} failed{cost_text}"
        elif R.MEMOIZED_STAGES in result:  # a pipeline trial's final result
            memoized = _count(int(result[R.MEMOIZED_STAGES]), "stage")
            line = (
                f"trial {trial.trial_id} finished: {self._metric} "
                f"{float(result[self._metric]):.6g}, {memoized} memoized{cost_text}"
            )
        else:  # an intermediate result: a scheduler stopped the trial, or no pipeline
            line = (
                f"trial {trial.trial_id} ended after {_count(_iterations(result), 'result')}: "
                f"{self._metric} {float(result[self._metric]):.6g}{cost_text}"
            )
        self._print(line)
        self._print(self.status_line(trials, finished=trial))

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._print(f"trial {trial.trial_id} failed (error)")
        self._print(self.status_line(trials))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._print(self.status_line(trials))

    def status_line(self, trials: Sequence[Trial], finished: Trial | None = None) -> str:
        """``[N trials done: M memoized, F failed; R running] Cost: ...; best ...``.

        ``N`` counts the trials that ended, ``M`` those of them that started from
        a cached prefix, ``F`` those that failed; the best is the best finite
        objective so far. ``finished``: a trial Tune reports complete before it
        marks it terminated.
        """
        ended = [t for t in trials if t.status in _ENDED or t is finished]
        ok = [
            t
            for t in ended
            if t.status != Trial.ERROR and not _failed(t.last_result or {}, self._metric)
        ]
        memoized = sum(1 for t in ok if (t.last_result or {}).get(R.MEMOIZED_STAGES))
        running = sum(1 for t in trials if t.status == Trial.RUNNING and t is not finished)
        failed = len(ended) - len(ok)
        line = (
            f"[{_count(len(ended), 'trial')} done: {memoized} memoized, {failed} failed; "
            f"{running} running] "
        )
        line += _budget_line(self._searcher, self._budget, self._cost_key, self._cost_unit, ended)
        sign = 1.0 if self._mode == "max" else -1.0
        best = max(ok, key=lambda t: sign * float(t.last_result[self._metric]), default=None)
        if best is not None:
            line += (
                f"; best {self._metric} {best.last_result[self._metric]:.6g} "
                f"(trial {best.trial_id})"
            )
        return line

    def _print(self, line: str) -> None:
        print(line, file=self._out or sys.stdout, flush=True)


_ENDED = (Trial.TERMINATED, Trial.ERROR)


def _iterations(result: Mapping[str, Any]) -> int:
    return int(result.get("training_iteration") or 0)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _failed(result: Mapping[str, Any], metric: str) -> bool:
    """A finished trial without a finite objective, or whose stage raised."""
    value = result.get(metric)
    if result.get(R.STAGE_FAILED) or isinstance(value, bool):
        return True
    return not isinstance(value, int | float) or not math.isfinite(value)


def _budget_line(
    searcher: EEIPUSearcher | None,
    budget: float | None,
    cost_key: str,
    unit: str,
    finished: Sequence[Trial],
) -> str:
    """``Cost: <spent> spent of <budget> (<left> left); cost-cooling eta <eta>``.

    From the searcher when there is one; else the sum of the ``finished`` trials'
    charged costs.
    """
    from eeipu_ray.tune.searcher import SearcherStateError

    eta = None
    if searcher is not None:
        budget = searcher.budget
        try:
            spent = searcher.budget_spent
            eta = searcher.eta
        except SearcherStateError:  # no search space yet: nothing was spent
            spent = 0.0
    else:
        spent = math.fsum(
            float(t.last_result.get(cost_key, 0.0) or 0.0) for t in finished if t.last_result
        )
    if budget is None:
        line = f"Cost: {spent:.4g} {unit} spent (no budget)"
    else:
        left = max(budget - spent, 0.0)
        line = f"Cost: {spent:.4g} {unit} spent of {budget:.4g} {unit} ({left:.4g} {unit} left)"
    if eta is not None and budget is not None:  # no budget, no cost cooling
        line += f"; cost-cooling eta {eta:.3f}"
    return line


def tuned_parameter_columns(search_space: Mapping[str, Any]) -> dict[str, str]:
    """The tuned keys of a nested Tune search space, as ``{"stage/name": title}``.

    Constants are left out (they are the same in every row); a title is the
    bare name unless two stages tune a parameter of the same name.
    """
    from eeipu_ray._domains import is_domain

    keys: list[tuple[str, str]] = []

    def walk(prefix: str, space: Mapping[str, Any]) -> None:
        for name, value in space.items():
            path = f"{prefix}/{name}" if prefix else str(name)
            if isinstance(value, Mapping):
                walk(path, value)
            elif is_domain(value):
                keys.append((path, str(name)))

    walk("", search_space)
    counts: dict[str, int] = {}
    for _, name in keys:
        counts[name] = counts.get(name, 0) + 1
    return {path: (name if counts[name] == 1 else path) for path, name in keys}
