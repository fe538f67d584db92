"""The ``eeipu-ray`` command.

``eeipu-ray run PIPELINE``
    Sweep a pipeline (built-in name or ``module:object``) on a Ray cluster
    (a local one unless ``--address`` is given) with the prefix cache, showing
    live progress (the objective, memoized stages and charged cost per trial;
    trials, memoized trials, cost spent, budget left, the cost-cooling exponent
    and the best trial so far), with a trial scheduler (``--scheduler fifo``,
    ``asha`` or ``sm2``) and experiment trackers (``--mlflow URI``,
    ``--wandb PROJECT``) if asked, then print a per-trial table and write into
    the experiment directory:

    * ``run_settings.json``: the run's options (``--resume`` reads them);
    * ``summary.json``: the run's options and totals (and one short row per trial);
    * ``trials.json``: every trial in completion order, with its per-stage
      costs, cache hits and config (``eeipu_ray.report.TrialRow``);
    * ``decisions.json``: the searcher's decision log, one entry per suggestion
      (phase, cost-cooling ``eta``, planned prefix, budget spent, acquisition
      value; see ``BOEngine.decisions``); not written for ``tune-random``;
    * ``report.md``, ``report.html`` and PNG plots (unless ``--no-report``).
``eeipu-ray run --resume EXPERIMENT_DIR``
    Go on with a sweep whose driver died: Tune restores its trials, searcher
    (observations, budget spent), scheduler and trackers.
``eeipu-ray report EXPERIMENT_DIR``
    Write the report of a finished run (or of a plain Ray Tune experiment
    directory, from its trials' ``result.json``).
``eeipu-ray cache ls|stats|gc URL``
    Inspect or clean an existing prefix cache.

Usage errors (a bad option, a directory that is not an experiment or not a
cache, a missing optional package) exit with status 2 and a message on stderr.
``--help`` shows every option with its default; ``--version`` the version.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from eeipu_ray.cli._common import UsageError, parse_key_values
from eeipu_ray.cli._resume import resume_arguments
from eeipu_ray.cli.parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``eeipu-ray`` with ``argv``; the exit status (2: a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run" and args.resume:
            args = resume_arguments(argv, args)
        result: Any = args.func(args)
    except UsageError as exc:
        print(f"eeipu-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


__all__ = ["UsageError", "build_parser", "main", "parse_key_values"]
