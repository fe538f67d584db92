"""Live progress of a sweep: Tune's ``CLIReporter`` plus the search's budget.

:class:`BudgetReporter` prints Tune's status table with the columns that matter
for a memoized, cost-aware search (the objective, memoized stages, the trial's
charged cost, the tuned hyperparameters) and one line of experiment-level
facts: cost spent, budget left and the cost-cooling exponent.

Use it with ``RAY_AIR_NEW_OUTPUT=0`` (Tune ignores ``progress_reporter`` under
its newer output engine) and ``tune.RunConfig(progress_reporter=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ray.tune import CLIReporter

from eeipu_ray import result as R

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

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
        from eeipu_ray.tune.searcher import SearcherStateError

        unit = self._cost_unit
        budget, eta = self._budget, None
        if self._searcher is not None:
            budget = self._searcher.budget
            try:
                spent = self._searcher.budget_spent
                eta = self._searcher.eta
            except SearcherStateError:  # no search space yet: nothing was spent
                spent = 0.0
        else:
            spent = math.fsum(
                float(t.last_result.get(self._cost_key, 0.0) or 0.0)
                for t in trials
                if t.last_result and t.is_finished()
            )
        if budget is None:
            line = f"Cost: {spent:.4g} {unit} spent (no budget)"
        else:
            left = max(budget - spent, 0.0)
            line = f"Cost: {spent:.4g} {unit} spent of {budget:.4g} {unit} ({left:.4g} {unit} left)"
        if eta is not None:
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
