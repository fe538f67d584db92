"""Reports of a sweep: tables and plots from an experiment directory.

``eeipu-ray report DIR`` (or :func:`write_report`) reads what ``eeipu-ray run``
wrote (``summary.json``, ``trials.json``, ``decisions.json``), or a plain Ray
Tune experiment directory, and writes ``report.md``, a self-contained
``report.html`` and PNG plots: best objective versus cost spent, per-stage cost
per trial (cached stages hatched), cache hits, and the cost-cooling exponent.

Importing this package is cheap; matplotlib is imported when plots are drawn.
"""

from __future__ import annotations

from eeipu_ray.report.experiment import (
    DECISIONS_FILE,
    SUMMARY_FILE,
    TRIALS_FILE,
    Experiment,
    ExperimentDirError,
    ReportError,
    TrialRow,
    completion_order,
    load_experiment,
    trial_row,
)
from eeipu_ray.report.render import HTML_FILE, MARKDOWN_FILE, ReportFiles, write_report

__all__ = [
    "DECISIONS_FILE",
    "HTML_FILE",
    "MARKDOWN_FILE",
    "SUMMARY_FILE",
    "TRIALS_FILE",
    "Experiment",
    "ExperimentDirError",
    "ReportError",
    "ReportFiles",
    "TrialRow",
    "completion_order",
    "load_experiment",
    "trial_row",
    "write_report",
]
