"""The ``eeipu-ray`` argument parser: one builder per subcommand."""

from __future__ import annotations

import argparse
from typing import Any

from eeipu_ray.result import COSTS

DESCRIPTION = "The ``eeipu-ray`` command."


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``eeipu-ray run``, ``report`` and ``cache``."""
    parser = argparse.ArgumentParser(prog="eeipu-ray", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_report(sub)
    _add_cache(sub)
    return parser


def _add_run(sub: Any) -> None:
    from eeipu_ray.cli.run import cmd_run
    from eeipu_ray.pipelines import BUILTIN

    run = sub.add_parser("run", help="sweep a pipeline on Ray Tune with the prefix cache")
    run.add_argument(
        "pipeline", help=f"built-in pipeline ({', '.join(sorted(BUILTIN))}) or module:object"
    )
    run.add_argument(
        "--searcher",
        default="eeipu",
        choices=("eeipu", "ei", "eips", "carbo", "random", "tune-random"),
        help="EEIPU (default), its baselines, or Ray Tune's own random search",
    )
    run.add_argument(
        "--budget",
        type=float,
        default=None,
        help="cost budget in seconds of stage time, or in joules with --cost energy (the search "
        "stops there)",
    )
    run.add_argument(
        "--num-samples", type=int, default=-1, help="maximum trials (-1: until the budget is spent)"
    )
    run.add_argument("--warmup", type=int, default=10, help="initial design size")
    run.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument of the pipeline's builder (repeatable), e.g. "
        "-o teacher_path=/models/t5-small -o n_train=2000; values are read as JSON where "
        "they parse, else as strings",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--metric", default="score")
    run.add_argument("--mode", choices=("min", "max"), default="max")
    _add_run_search(run)
    _add_run_resources(run)
    run.set_defaults(func=cmd_run)


def _add_run_search(run: Any) -> None:
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
        help="cache URL: a directory (default ~/.cache/eeipu-ray) or s3://bucket/prefix",
    )
    search.add_argument(
        "--object-store",
        default=None,
        help="name of a Ray object-store cache layer in front of --cache",
    )
    search.add_argument("--cache-budget", default=None, help="byte budget of the cache, e.g. 20GiB")


def _add_run_resources(run: Any) -> None:
    """``run``'s Ray cluster, trial resources and output."""
    cluster = run.add_argument_group("cluster, resources and output")
    cluster.add_argument(
        "--address", default=None, help="Ray address (auto, ray://...); a local cluster if unset"
    )
    cluster.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    cluster.add_argument("--cpus-per-trial", type=float, default=1.0)
    cluster.add_argument("--gpus-per-trial", type=float, default=0.0)
    cluster.add_argument("--max-concurrent", type=int, default=0, help="0: as many as fit")
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
    cluster.add_argument("--name", default=None, help="experiment name")
    cluster.add_argument(
        "--no-report",
        action="store_true",
        help="do not write report.md / report.html and the plots at the end",
    )


def _add_report(sub: Any) -> None:
    from eeipu_ray.cli.tools import cmd_report

    report = sub.add_parser(
        "report", help="write report.md, report.html and plots of an experiment directory"
    )
    report.add_argument(
        "experiment_dir",
        metavar="EXPERIMENT_DIR",
        help="written by 'eeipu-ray run', or a Ray Tune experiment directory",
    )
    report.add_argument("--out", default=None, help="where to write (default: EXPERIMENT_DIR)")
    report.add_argument(
        "--metric", default=None, help="objective (default: the run's; 'score' for Tune dirs)"
    )
    report.add_argument("--mode", choices=("min", "max"), default=None)
    report.add_argument(
        "--budget",
        type=float,
        default=None,
        help="cost budget, to reconstruct eta when the directory has no decision log",
    )
    report.add_argument(
        "--warmup", type=int, default=None, help="warm-up size, with --budget (see above)"
    )
    report.set_defaults(func=cmd_report)


def _add_cache(sub: Any) -> None:
    from eeipu_ray.cli.tools import cmd_cache

    cache = sub.add_parser("cache", help="inspect or clean a prefix cache")
    cache.add_argument("action", choices=("ls", "stats", "gc"))
    cache.add_argument("url", help="cache directory or URL")
    cache.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        help="gc: leftovers older than this many seconds",
    )
    cache.add_argument("--max-bytes", default=None, help="gc: also evict LRU entries down to this")
    cache.set_defaults(func=cmd_cache)
