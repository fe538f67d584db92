"""The ``eeipu-ray`` argument parser: one builder per subcommand."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from eeipu_ray.cli._common import positive_size_argument, size_argument
from eeipu_ray.result import COSTS

DESCRIPTION = (
    "Memoization-aware, cost-aware hyperparameter sweeps of multi-stage pipelines on Ray Tune "
    "(EEIPU), with a prefix cache the trials share."
)
SCHEDULERS = ("fifo", "asha", "sm2")
SEARCHERS = ("eeipu", "ei", "eips", "carbo", "random", "tune-random")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Tune's and pip's habit: every option's help ends with its default.

    An option without a default worth printing (``None``, a flag that is off,
    an empty list) says in its help what leaving it out does instead.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        # Identity, not equality: a default of 0 is worth printing, False is not.
        if default is None or default is False or default is argparse.SUPPRESS or default == []:
            return action.help
        return super()._get_help_string(action)


def package_version() -> str:
    """The installed version of ``eeipu-ray`` (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eeipu-ray")
    except PackageNotFoundError:  # run from a source tree without installing it
        from eeipu_ray import __version__

        return __version__


def build_parser(run_defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser of ``eeipu-ray run``, ``report`` and ``cache``.

    Args:
        run_defaults: Defaults of ``run``'s options in place of the built-in
            ones (``--resume`` takes the resumed run's settings this way).
    """
    parser = argparse.ArgumentParser(
        prog="eeipu-ray", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub, run_defaults or {})
    _add_report(sub)
    _add_cache(sub)
    return parser


def _add_run(sub: Any, run_defaults: Mapping[str, Any]) -> None:
    from eeipu_ray.cli.run import cmd_run
    from eeipu_ray.pipelines import BUILTIN

    run = sub.add_parser(
        "run",
        help="sweep a pipeline on Ray Tune with the prefix cache",
        description="Sweep a pipeline on Ray Tune with the prefix cache, or resume a sweep.",
        formatter_class=HelpFormatter,
    )
    run.add_argument(
        "pipeline",
        nargs="?",
        metavar="PIPELINE",
        help=f"built-in pipeline ({', '.join(sorted(BUILTIN))}) or module:object; with "
        "--resume, the resumed run's",
    )
    _add_run_search(run)
    _add_run_cost_and_cache(run)
    _add_run_scheduler(run)
    _add_run_resources(run)
    _add_run_logging(run)
    run.set_defaults(func=cmd_run, **run_defaults)


def _add_run_search(run: Any) -> None:
    """``run``'s searcher, budget and objective."""
    search = run.add_argument_group("search")
    search.add_argument(
        "--searcher",
        default="eeipu",
        choices=SEARCHERS,
        help="EEIPU, its baselines on the same models, or Ray Tune's own random search",
    )
    search.add_argument(
        "--budget",
        type=float,
        default=None,
        help="cost budget in seconds of stage time, or in joules with --cost energy (the search "
        "stops there); unset: no budget, give --num-samples",
    )
    search.add_argument(
        "--num-samples", type=int, default=-1, help="maximum trials (-1: until the budget is spent)"
    )
    search.add_argument("--warmup", type=int, default=10, help="initial design size")
    search.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument of the pipeline's builder (repeatable), e.g. "
        "-o teacher_path=/models/t5-small -o n_train=2000; values are read as JSON where "
        "they parse, else as strings",
    )
    search.add_argument("--seed", type=int, default=0, help="seed of the searcher")
    search.add_argument("--metric", default="score", help="the objective, a result key")
    search.add_argument(
        "--mode", choices=("min", "max"), default="max", help="minimize or maximize --metric"
    )


def _add_run_cost_and_cache(run: Any) -> None:
    """``run``'s cost unit and the cache the trials share."""
    search = run.add_argument_group("cost and cache")
    search.add_argument(
        "--cost",
        choices=COSTS,
        default="time",
        help="what a trial costs: seconds of stage time, or measured energy (joules, from "
        "NVML for the trials' GPUs or RAPL; refused where no energy meter works)",
    )
    search.add_argument(
        "--energy",
        dest="cost",
        action="store_const",
        const="energy",
        help="the same as --cost energy",
    )
    search.add_argument(
        "--cache",
        default=None,
        help="cache URL: a directory or s3://bucket/prefix; unset: $EEIPU_CACHE_DIR or "
        "~/.cache/eeipu-ray/prefix-cache",
    )
    search.add_argument(
        "--object-store",
        default=None,
        help="name of a Ray object-store cache layer in front of --cache; unset: none",
    )
    search.add_argument(
        "--cache-budget",
        type=positive_size_argument,
        default=None,
        metavar="SIZE",
        help="bytes the cache may hold, least recently used entries evicted beyond it: a "
        "number of bytes or one with a unit, e.g. 500MB (10^6 bytes each) or 20GiB (2^30 "
        "bytes each); unset: no limit",
    )


def _add_run_scheduler(run: Any) -> None:
    """``run``'s trial scheduler: whether and how trials are stopped early."""
    group = run.add_argument_group(
        "trial scheduler",
        "Early stopping acts on intermediate results: a stage that calls ctx.report with the "
        "metric (the cnn pipeline with -o report_score=true).",
    )
    group.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="fifo",
        help="fifo: every trial runs to its end; asha: Ray Tune's ASHAScheduler; sm2: "
        "energy-aware successive halving (SM2Scheduler), whose score subtracts "
        "--energy-weight x ln(energy spent: joules with --cost energy, else CPU-seconds)",
    )
    group.add_argument(
        "--time-attr",
        default="training_iteration",
        help="asha, sm2: the result key that measures a trial's progress",
    )
    group.add_argument(
        "--max-t", type=float, default=100.0, help="asha, sm2: most --time-attr units a trial runs"
    )
    group.add_argument(
        "--grace-period",
        type=float,
        default=1.0,
        help="asha, sm2: --time-attr units before a trial may be stopped (the first rung)",
    )
    group.add_argument(
        "--reduction-factor",
        type=float,
        default=3.0,
        help="asha, sm2: the top 1/reduction-factor of each rung go on",
    )
    group.add_argument(
        "--energy-weight",
        type=float,
        default=0.05,
        help="sm2: metric units per e-fold of energy (0: the same ranking as ASHA)",
    )


def _add_run_resources(run: Any) -> None:
    """``run``'s Ray cluster, trial resources and output."""
    cluster = run.add_argument_group("cluster, resources and output")
    cluster.add_argument(
        "--address", default=None, help="Ray address (auto, ray://...); unset: a local cluster"
    )
    cluster.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs of a local Ray cluster; unset: all of this machine's",
    )
    cluster.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs of each trial")
    cluster.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs of each trial")
    cluster.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        help=(
            "train data-parallel on this many Ray Train workers per trial (pipelines whose "
            "builder takes workers=, such as t5); with --gpus-per-trial, one GPU per worker"
        ),
    )
    cluster.add_argument(
        "--max-concurrent", type=int, default=0, help="most trials at once (0: as many as fit)"
    )
    cluster.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help=(
            "retries of a failed trial (its node died; or a stage raised, which usually "
            "fails again): Tune's FailureConfig; -1: no limit"
        ),
    )
    cluster.add_argument("--storage-path", default="results", help="where experiments are written")
    cluster.add_argument(
        "--name",
        default=None,
        help="experiment name, its directory under --storage-path; unset: PIPELINE-DATE-TIME",
    )
    cluster.add_argument(
        "--no-report",
        action="store_true",
        help="do not write report.md / report.html and the plots at the end",
    )
    cluster.add_argument(
        "--resume",
        default=None,
        metavar="EXPERIMENT_DIR",
        help="go on with the sweep in EXPERIMENT_DIR whose driver died (Tuner.restore): its "
        "finished trials are kept, the searcher's observations and budget spent restored, "
        "unfinished and errored trials run again; it keeps the run's settings (options given "
        "again must match them, except --address, --num-cpus and --no-report)",
    )


def _add_run_logging(run: Any) -> None:
    """``run``'s experiment trackers: Ray Tune's logger callbacks."""
    group = run.add_argument_group("experiment tracking")
    group.add_argument(
        "--mlflow",
        default=None,
        metavar="URI",
        help="log every trial as an MLflow run (Ray's MLflowLoggerCallback) to this tracking "
        "URI (http://..., sqlite:///mlflow.db, file:///path or a directory), in an MLflow "
        "experiment named after the run (--name); needs mlflow or mlflow-skinny",
    )
    group.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="log every trial to this Weights & Biases project, grouped by the run's name "
        "(Ray's WandbLoggerCallback); needs wandb, logged in",
    )


def _add_report(sub: Any) -> None:
    from eeipu_ray.cli.tools import cmd_report

    report = sub.add_parser(
        "report",
        help="write report.md, report.html and plots of an experiment directory",
        description="Write report.md, report.html and the plots of an experiment directory.",
        formatter_class=HelpFormatter,
    )
    report.add_argument(
        "experiment_dir",
        metavar="EXPERIMENT_DIR",
        help="written by 'eeipu-ray run', or a Ray Tune experiment directory",
    )
    report.add_argument("--out", default=None, help="where to write; unset: EXPERIMENT_DIR")
    report.add_argument(
        "--metric",
        default=None,
        help="objective; unset: the run's, or 'score' for a plain Tune directory",
    )
    report.add_argument(
        "--mode", choices=("min", "max"), default=None, help="unset: the run's, or max"
    )
    report.add_argument(
        "--budget",
        type=float,
        default=None,
        help="cost budget, to reconstruct eta when the directory has no decision log; unset: "
        "the run's",
    )
    report.add_argument(
        "--warmup", type=int, default=None, help="warm-up size, with --budget; unset: the run's"
    )
    report.set_defaults(func=cmd_report)


def _add_cache(sub: Any) -> None:
    from eeipu_ray.cli.tools import cmd_cache

    cache = sub.add_parser(
        "cache",
        help="inspect or clean a prefix cache",
        description="Inspect or clean an existing prefix cache: ls lists its entries, stats "
        "counts them, gc removes leftovers of interrupted writes (and, with --max-bytes, "
        "evicts least recently used entries).",
        formatter_class=HelpFormatter,
    )
    cache.add_argument("action", choices=("ls", "stats", "gc"), help="what to do")
    cache.add_argument(
        "url", metavar="URL", help="the cache: an existing directory or an s3://bucket/prefix URL"
    )
    cache.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        help="gc: remove leftovers older than this many seconds",
    )
    cache.add_argument(
        "--max-bytes",
        type=size_argument,
        default=None,
        metavar="SIZE",
        help="gc: also evict least recently used entries (never pinned ones) down to SIZE: "
        "bytes, or with a unit, e.g. 500MB (10^6 bytes each) or 50GiB (2^30 bytes each); "
        "unset: no eviction",
    )
    cache.set_defaults(func=cmd_cache)
