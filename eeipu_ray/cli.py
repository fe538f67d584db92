"""The ``eeipu-ray`` command.

``eeipu-ray run PIPELINE``
    Sweep a pipeline (built-in name or ``module:object``) on a Ray cluster
    (a local one unless ``--address`` is given) with the prefix cache, showing
    live progress (the objective, memoized stages and charged cost per trial;
    cost spent, budget left and the cost-cooling exponent), then print a
    per-trial table and write into the experiment directory:

    * ``summary.json``: the run's options and totals (and one short row per trial);
    * ``trials.json``: every trial in completion order, with its per-stage
      costs, cache hits and config (``eeipu_ray.report.TrialRow``);
    * ``decisions.json``: the searcher's decision log, one entry per suggestion
      (phase, cost-cooling ``eta``, planned prefix, budget spent, acquisition
      value; see ``BOEngine.decisions``); not written for ``tune-random``;
    * ``report.md``, ``report.html`` and PNG plots (unless ``--no-report``).
``eeipu-ray report EXPERIMENT_DIR``
    Write the report of a finished run (or of a plain Ray Tune experiment
    directory, from its trials' ``result.json``).
``eeipu-ray cache ls|stats|gc URL``
    Inspect or clean a prefix cache.

Usage errors (a bad option, a directory that is not an experiment) exit with
status 2 and a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """The command line asks for something that cannot be done; exit status 2."""


def _parse_size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _check_energy(args: argparse.Namespace) -> None:
    """``--energy``: refuse it unless energy can be measured where trials run.

    On a local cluster the trials run here, so the meters are probed now; with
    ``--address`` each trial checks its own node before running a stage
    (``energy="required"``) and fails with the reason.
    """
    if args.searcher == "tune-random":
        raise UsageError(
            "--energy makes measured energy the searcher's cost: use a budget-aware searcher "
            "(eeipu, ei, eips, carbo, random)"
        )
    if args.address:
        return
    from eeipu_ray.energy import NoMeter, auto_meter
    from eeipu_ray.errors import EnergyMeterError

    try:
        meter = auto_meter(None if args.gpus_per_trial > 0 else [])
    except EnergyMeterError as exc:
        raise UsageError(f"--energy: {exc}") from exc
    try:
        if isinstance(meter, NoMeter):
            raise UsageError(
                f"--energy: no energy meter works on this machine ({meter.explain()}). Energy "
                "can be the cost only where it is measured: NVIDIA GPUs through NVML (pip "
                "install 'eeipu-ray[energy]'; --gpus-per-trial) or readable RAPL counters "
                "(/sys/class/powercap). Run without --energy to use seconds of stage time"
            )
    finally:
        meter.close()


def _cmd_run(args: argparse.Namespace) -> int:
    if args.energy:
        _check_energy(args)
    from eeipu_ray.errors import PipelineDefinitionError
    from eeipu_ray.pipelines import load_pipeline

    try:
        pipeline = load_pipeline(args.pipeline, **parse_key_values(args.option))
    except PipelineDefinitionError as exc:
        raise UsageError(str(exc)) from exc
    if args.num_samples < 0 and args.budget is None:
        raise UsageError("give --budget, --num-samples, or both")
    if args.budget is not None and args.searcher == "tune-random":
        raise UsageError("--budget needs a budget-aware searcher (eeipu, ei, eips, carbo, random)")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.tune.progress import BudgetReporter, tuned_parameter_columns

    cache = PrefixCache(
        args.cache,
        object_store=args.object_store,
        byte_budget=_parse_size(args.cache_budget) if args.cache_budget else None,
    )
    if args.max_concurrent > 1:
        # Tune lets a searcher have one trial waiting for resources at a time
        # unless told otherwise; W concurrent trials need W to start together.
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(args.max_concurrent))
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    trainable = tune.with_resources(
        pipeline.as_trainable(
            cache=cache, metric=args.metric, energy="required" if args.energy else "auto"
        ),
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
    )
    search_alg = None
    if args.searcher != "tune-random":
        from eeipu_ray.tune.searcher import EEIPUSearcher

        search_alg = EEIPUSearcher(
            pipeline,
            metric=args.metric,
            mode=args.mode,
            budget=args.budget,
            cache=cache,
            acquisition=args.searcher,
            n_warmup=args.warmup,
            seed=args.seed,
            max_concurrent=args.max_concurrent,
            cost="energy" if args.energy else "time",
        )
    # Under Ray Client the Tuner runs in the cluster with its own copy of the
    # searcher: the reporter then sums the trials' costs instead of asking it.
    remote_driver = bool(args.address and args.address.startswith("ray://"))
    reporter = BudgetReporter(
        args.metric,
        args.mode,
        searcher=None if remote_driver else search_alg,
        budget=args.budget,
        cost_unit="J" if args.energy else "s",
        cost_key="total_energy_joules" if args.energy else "total_cost",
        parameter_columns=tuned_parameter_columns(pipeline.search_space),
        full_final_table=False,  # the full table is printed below
    )
    storage = os.path.abspath(args.storage_path)
    name = args.name or f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tuner = tune.Tuner(
        trainable,
        param_space=None if search_alg else pipeline.search_space,
        tune_config=tune.TuneConfig(
            metric=None if search_alg else args.metric,
            mode=None if search_alg else args.mode,
            num_samples=args.num_samples,
            max_concurrent_trials=None if search_alg else args.max_concurrent,
            search_alg=search_alg,
            reuse_actors=True,  # ~0.1 s instead of ~4 s of Tune overhead per trial here
            # Tune's default names a trial directory after its whole config
            # (constants included): keep it short.
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=1,
            progress_reporter=reporter,
            # A trial whose node dies (spot preemption, a crashed GPU) runs again
            # elsewhere; the searcher hears of it only once, with its last attempt.
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
        ),
    )
    started = time.time()
    grid = tuner.fit()
    wall = time.time() - started
    exp_dir = os.path.join(storage, name)
    os.makedirs(exp_dir, exist_ok=True)

    from eeipu_ray.report import completion_order, trial_row

    rows = []
    trial_rows = []
    for index, r in enumerate(grid):
        m = r.metrics or {}
        config = pipeline.nest_config(r.config) if r.config else {}
        trial_rows.append(
            (
                trial_row(
                    m,
                    args.metric,
                    config=config,
                    error=str(r.error) if r.error else None,
                    stage_names=pipeline.stage_names,
                ),
                index,
            )
        )
        if r.error or not m:
            rows.append({"trial_id": m.get("trial_id"), "error": str(r.error)})
            continue
        rows.append(
            {
                "trial_id": m.get("trial_id"),
                args.metric: m.get(args.metric),
                "memoized_stages": m.get("memoized_stages"),
                "total_cost": m.get("total_cost"),
                "compute_cost": sum(m.get(f"compute_costs/{s}", 0.0) for s in pipeline.stage_names),
                "total_energy_joules": m.get("total_energy_joules"),
                "total_cpu_seconds": m.get("total_cpu_seconds"),
                "config": config,
            }
        )
    ok = [r for r in rows if "error" not in r]
    spent = sum(r["total_cost"] for r in ok)
    unmemoized = sum(r["compute_cost"] for r in ok)
    best = grid.get_best_result(metric=args.metric, mode=args.mode) if ok else None
    energies = [r["total_energy_joules"] for r in ok]
    # Energy is missing, not 0, where a trial had no meter: no total then.
    energy_spent = (
        math.fsum(energies) if energies and all(e is not None for e in energies) else None
    )
    summary = {
        "pipeline": pipeline.name,
        "searcher": args.searcher,
        "metric": args.metric,
        "mode": args.mode,
        "budget": args.budget,
        "warmup": args.warmup,
        "seed": args.seed,
        "trials": len(rows),
        "errors": len(rows) - len(ok),
        "trials_with_cached_prefix": sum(1 for r in ok if r["memoized_stages"]),
        "cost_spent_s": spent,
        "cost_without_memoization_s": unmemoized,
        "cost": "energy" if args.energy else "time",
        "energy_spent_j": energy_spent,
        "cpu_seconds": math.fsum(r["total_cpu_seconds"] or 0.0 for r in ok),
        "wall_s": wall,
        "cache": str(cache),
        "best": {
            args.metric: best.metrics.get(args.metric),
            "config": pipeline.nest_config(best.config),
        }
        if best
        else None,
        "rows": rows,
    }
    _write_json(os.path.join(exp_dir, "summary.json"), summary)
    _write_json(
        os.path.join(exp_dir, "trials.json"),
        {
            "format": 1,
            "metric": args.metric,
            "mode": args.mode,
            "stage_names": list(pipeline.stage_names),
            "trials": [t.to_dict() for t in completion_order(trial_rows)],
        },
    )
    if search_alg is not None:
        _write_json(
            os.path.join(exp_dir, "decisions.json"),
            {
                "format": 1,
                "searcher": args.searcher,
                "decisions": _decision_log(search_alg, exp_dir, remote_driver),
            },
        )
    print()
    print(
        f"{'trial':<14} {args.metric:>9} {'memoized':>9} {'spent s':>9} {'compute s':>10} "
        f"{'energy J':>10}"
    )
    for r in ok:
        energy = r["total_energy_joules"]
        print(
            f"{r['trial_id']:<14} {r[args.metric]:>9.4f} {r['memoized_stages']:>9d} "
            f"{r['total_cost']:>9.2f} {r['compute_cost']:>10.2f} "
            f"{'-' if energy is None else f'{energy:.1f}':>10}"
        )
    print()
    print(
        f"trials: {len(rows)} ({summary['errors']} errors), started from a cached prefix: "
        f"{summary['trials_with_cached_prefix']}"
    )
    print(
        f"stage cost spent: {spent:.1f} s; without memoization it would have been "
        f"{unmemoized:.1f} s"
    )
    if energy_spent is not None:
        print(f"energy spent (measured): {energy_spent:.1f} J")
    else:
        print("energy: not measured (no energy meter where the trials ran)")
    if best:
        print(
            f"best {args.metric}: {summary['best'][args.metric]:.4f} with "
            f"{json.dumps(summary['best']['config'], default=str)}"
        )
    print(f"summary: {os.path.join(exp_dir, 'summary.json')}")
    if not args.no_report:
        from eeipu_ray.report import ReportError, write_report

        try:
            files = write_report(exp_dir)
        except ReportError as exc:  # e.g. matplotlib missing: the sweep itself succeeded
            print(f"eeipu-ray run: no report written: {exc}", file=sys.stderr)
        else:
            print(f"report: {files.html} (and {files.markdown.name})")
    return 0 if ok else 1


def parse_key_values(items: Sequence[str]) -> dict[str, Any]:
    """``["top_q=10", "name=t5"]`` -> ``{"top_q": 10, "name": "t5"}``.

    A value is read as JSON (numbers, true/false, null, lists, quoted strings)
    and otherwise kept as a string; a key must be a Python name. Raises
    :class:`UsageError` naming the bad item."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--option {item!r}: expected KEY=VALUE with KEY a Python name")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def _trial_dirname(trial: Any) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def _decision_log(search_alg: Any, exp_dir: str, remote_driver: bool) -> list[dict[str, Any]]:
    """The searcher's decision log after the run, as plain dicts."""
    if remote_driver:
        # The searcher that ran lives in the cluster; read the state Tune saved.
        try:
            search_alg.restore_from_dir(exp_dir)
        except (RuntimeError, OSError) as exc:
            print(f"eeipu-ray run: no decision log: {exc}", file=sys.stderr)
            return []
    return [d.to_dict() for d in search_alg.decisions]


def _write_json(path: str, data: Any) -> None:
    # NaN and infinities are not JSON: write them as null.
    with open(path, "w") as fh:
        json.dump(_json_safe(data), fh, indent=2, default=str)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _cmd_report(args: argparse.Namespace) -> int:
    from eeipu_ray.report import ExperimentDirError, write_report

    try:
        files = write_report(
            Path(args.experiment_dir),
            args.out,
            metric=args.metric,
            mode=args.mode,
            budget=args.budget,
            n_warmup=args.warmup,
        )
    except ExperimentDirError as exc:
        raise UsageError(str(exc)) from exc
    print(f"report: {files.markdown}")
    print(f"report: {files.html}")
    for path in files.images.values():
        print(f"plot: {path}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from eeipu_ray.cache import PrefixCache

    cache = PrefixCache(args.url)
    if args.action == "stats":
        print(json.dumps(cache.stats(), indent=2, default=str))
    elif args.action == "ls":
        for e in sorted(cache.entries(), key=lambda e: e.last_used):
            m = cache.manifest(e.key) if e.complete else None
            stage = "/".join(m.meta.stage_names) if m else "(incomplete)"
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
            print(f"{e.key[:16]}  {e.bytes:>12d}  {used}  {'pinned ' if e.pinned else ''}{stage}")
    elif args.action == "gc":
        removed = cache.gc(older_than=args.older_than)
        evicted = cache.evict(_parse_size(args.max_bytes)) if args.max_bytes else []
        print(
            f"removed {len(removed)} leftovers of interrupted writes; "
            f"evicted {len(evicted)} entries"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from eeipu_ray.pipelines import BUILTIN

    parser = argparse.ArgumentParser(prog="eeipu-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

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
        help="cost budget in seconds of stage time, or in joules with --energy (the search "
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
    run.add_argument(
        "--cache",
        default=None,
        help="cache URL: a directory (default ~/.cache/eeipu-ray) or s3://bucket/prefix",
    )
    run.add_argument(
        "--object-store",
        default=None,
        help="name of a Ray object-store cache layer in front of --cache",
    )
    run.add_argument("--cache-budget", default=None, help="byte budget of the cache, e.g. 20GiB")
    run.add_argument(
        "--address", default=None, help="Ray address (auto, ray://...); a local cluster if unset"
    )
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    run.add_argument("--cpus-per-trial", type=float, default=1.0)
    run.add_argument("--gpus-per-trial", type=float, default=0.0)
    run.add_argument("--max-concurrent", type=int, default=0, help="0: as many as fit")
    run.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help=(
            "retries of a failed trial (its node died; or a stage raised, which usually "
            "fails again): Tune's FailureConfig; -1: no limit"
        ),
    )
    run.add_argument("--storage-path", default="results", help="where experiments are written")
    run.add_argument("--name", default=None, help="experiment name")
    run.add_argument(
        "--energy",
        action="store_true",
        help="use measured energy (joules, from NVML for the trials' GPUs or RAPL) as the "
        "cost; refused where no energy meter works",
    )
    run.add_argument(
        "--no-report",
        action="store_true",
        help="do not write report.md / report.html and the plots at the end",
    )
    run.set_defaults(func=_cmd_run)

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
    report.set_defaults(func=_cmd_report)

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
    cache.set_defaults(func=_cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: Any = args.func(args)
    except UsageError as exc:
        print(f"eeipu-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
