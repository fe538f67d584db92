"""``eeipu-ray run``: sweep a pipeline on Ray Tune with the prefix cache.

Builds the pipeline, the cache, the searcher, the scheduler, the trackers and
the Tuner from the command line (or restores the Tuner of a run whose driver
died, ``--resume``), runs the sweep with live progress, then writes
``summary.json``, ``trials.json``, ``decisions.json`` and the report into the
experiment directory and prints a per-trial table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from eeipu_ray import result as R
from eeipu_ray.cli._common import UsageError, parse_key_values, write_json
from eeipu_ray.cli._integrations import logger_callbacks, make_scheduler
from eeipu_ray.cli._resume import SETTINGS_FILE, absolute_paths, save_settings


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or, with ``--resume``, go on with) the sweep ``args`` describes; 0 if
    some trial succeeded, else 1."""
    absolute_paths(args)
    if args.cost == "energy":
        _check_energy(args)
    pipeline = _load_pipeline(args)
    exp_dir = _experiment_dir(args, pipeline)
    storage, name = os.path.split(exp_dir)
    # The trackers and the scheduler first: a missing package or a bad setting
    # is an error before a cluster starts.
    callbacks = logger_callbacks(args, name)
    scheduler = make_scheduler(args)
    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.errors import CacheError

    try:
        cache = PrefixCache(
            args.cache, object_store=args.object_store, byte_budget=args.cache_budget
        )
    except CacheError as exc:
        raise UsageError(f"--cache {args.cache}: {exc}") from exc
    _init_ray(args)
    _size_for_workers(args, pipeline)
    search_alg = _make_searcher(args, pipeline, cache)
    # Under Ray Client the Tuner runs in the cluster with its own copy of the
    # searcher: the progress sums the trials' costs instead of asking it.
    remote_driver = bool(args.address and args.address.startswith("ray://"))
    if args.resume:
        # Tune unpickles the run's own searcher, scheduler and callbacks, and
        # restores the searcher's checkpoint into it.
        from ray import tune

        tuner = tune.Tuner.restore(
            exp_dir, trainable=_trainable(args, pipeline, cache), resume_errored=True
        )
    else:
        os.makedirs(exp_dir, exist_ok=True)
        save_settings(exp_dir, args)
        tuner = _make_tuner(
            args, pipeline, cache, search_alg, remote_driver, storage, name, scheduler, callbacks
        )
    started = time.time()
    grid = tuner.fit()
    wall = time.time() - started

    rows, trial_rows = _trial_rows(args, pipeline, grid)
    summary = _summary(args, pipeline, grid, rows, wall=wall, cache=cache)
    # The searcher that ran is Tune's own copy after a restore (or in the cluster
    # under Ray Client): read the state Tune saved instead.
    from_checkpoint = remote_driver or bool(args.resume)
    _write_outputs(args, pipeline, exp_dir, summary, trial_rows, search_alg, from_checkpoint)
    _print_results(args, summary, exp_dir)
    if not args.no_report:
        from eeipu_ray.report import ReportError, write_report

        try:
            files = write_report(exp_dir)
        except ReportError as exc:  # e.g. matplotlib missing: the sweep itself succeeded
            print(f"eeipu-ray run: no report written: {exc}", file=sys.stderr)
        else:
            print(f"report: {files.html} (and {files.markdown.name})")
    return 0 if summary["trials"] > summary["errors"] else 1


def _experiment_dir(args: argparse.Namespace, pipeline: Any) -> str:
    """The run's experiment directory: ``--resume``'s, or a new one under
    ``--storage-path`` (refused where an experiment is already)."""
    if args.resume:
        return os.path.abspath(args.resume)
    name = args.name or f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp_dir = os.path.join(os.path.abspath(args.storage_path), name)
    if os.path.exists(os.path.join(exp_dir, SETTINGS_FILE)) or os.path.exists(
        os.path.join(exp_dir, "tuner.pkl")
    ):
        raise UsageError(
            f"{exp_dir} holds an experiment already: give another --name, or go on with it "
            f"with --resume {exp_dir}"
        )
    return exp_dir


def _load_pipeline(args: argparse.Namespace) -> Any:
    from eeipu_ray.errors import PipelineDefinitionError
    from eeipu_ray.pipelines import load_pipeline

    if args.pipeline is None:
        raise UsageError(
            "give a PIPELINE (a built-in name or module:object), or --resume EXPERIMENT_DIR"
        )
    options = parse_key_values(args.option)
    options.update(_worker_options(args))
    try:
        pipeline = load_pipeline(args.pipeline, **options)
    except PipelineDefinitionError as exc:
        raise UsageError(str(exc)) from exc
    if args.num_samples < 0 and args.budget is None and not args.resume:
        raise UsageError("give --budget, --num-samples, or both")
    if args.budget is not None and args.searcher == "tune-random":
        raise UsageError("--budget needs a budget-aware searcher (eeipu, ei, eips, carbo, random)")
    return pipeline


def _worker_options(args: argparse.Namespace) -> dict[str, Any]:
    """The builder options of ``--workers-per-trial`` (none for one worker)."""
    workers = args.workers_per_trial
    if workers < 1:
        raise UsageError(f"--workers-per-trial {workers}: give 1 or more")
    if workers == 1:
        return {}
    if args.gpus_per_trial not in (0, workers):
        raise UsageError(
            f"--gpus-per-trial {args.gpus_per_trial:g} with --workers-per-trial {workers}: "
            f"the workers take one GPU each, so give --gpus-per-trial {workers} (or 0 for CPUs)"
        )
    return {"workers": workers, "use_gpu": args.gpus_per_trial > 0}


def _size_for_workers(args: argparse.Namespace, pipeline: Any) -> None:
    """With Ray Train workers, run no more trials at once than their worker groups fit."""
    if args.workers_per_trial == 1 or args.max_concurrent > 0:
        return
    from eeipu_ray.train import max_concurrent_trials

    try:
        args.max_concurrent = max_concurrent_trials(pipeline, cpus=args.cpus_per_trial, gpus=0)
    except ValueError as exc:
        raise UsageError(f"--workers-per-trial {args.workers_per_trial}: {exc}") from exc
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(args.max_concurrent))


def _init_ray(args: argparse.Namespace) -> None:
    import ray

    if args.max_concurrent > 1:
        # Tune lets a searcher have one trial waiting for resources at a time
        # unless told otherwise; W concurrent trials need W to start together.
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(args.max_concurrent))
    if args.address:
        ray.init(address=args.address)
    else:
        # address="local": a cluster of the run's own even where `ray start` runs
        # one (ray.init() alone would join that one and refuse num_cpus).
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)


def _make_searcher(args: argparse.Namespace, pipeline: Any, cache: Any) -> Any:
    """The EEIPUSearcher (or a baseline); ``None`` for Tune's own random search."""
    if args.searcher == "tune-random":
        return None
    from eeipu_ray.search import EngineOptions
    from eeipu_ray.tune.searcher import EEIPUSearcher

    return EEIPUSearcher(
        pipeline,
        metric=args.metric,
        mode=args.mode,
        budget=args.budget,
        cache=cache,
        acquisition=args.searcher,
        max_concurrent=args.max_concurrent,
        options=EngineOptions(n_warmup=args.warmup, seed=args.seed, cost=args.cost),
    )


def _trainable(args: argparse.Namespace, pipeline: Any, cache: Any) -> Any:
    from ray import tune

    # With Ray Train workers, the workers hold the GPUs; the trial only waits.
    gpus = 0 if args.workers_per_trial > 1 else args.gpus_per_trial
    return tune.with_resources(
        pipeline.as_trainable(cache=cache, metric=args.metric, cost=args.cost),
        {"cpu": args.cpus_per_trial, "gpu": gpus},
    )


def _make_tuner(
    args: argparse.Namespace,
    pipeline: Any,
    cache: Any,
    search_alg: Any,
    remote_driver: bool,
    storage: str,
    name: str,
    scheduler: Any,
    callbacks: list[Any],
) -> Any:
    from ray import tune

    from eeipu_ray.tune.progress import BudgetProgress

    progress = BudgetProgress(
        args.metric,
        args.mode,
        searcher=None if remote_driver else search_alg,
        budget=args.budget,
        cost=args.cost,
    )
    return tune.Tuner(
        _trainable(args, pipeline, cache),
        param_space=None if search_alg else pipeline.search_space,
        tune_config=tune.TuneConfig(
            metric=None if search_alg else args.metric,
            mode=None if search_alg else args.mode,
            num_samples=args.num_samples,
            max_concurrent_trials=None if search_alg else args.max_concurrent,
            search_alg=search_alg,
            scheduler=scheduler,
            reuse_actors=True,  # ~0.1 s instead of ~4 s of Tune overhead per trial here
            # Tune's default names a trial directory after its whole config
            # (constants included): keep it short.
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            # BudgetProgress is the display: Tune's own would print every trial's
            # whole result (dozens of per-stage keys) on top of it.
            verbose=0,
            callbacks=[progress, *callbacks],
            # A trial whose node dies (spot preemption, a crashed GPU) runs again
            # elsewhere; the searcher hears of it only once, with its last attempt.
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
        ),
    )


def _trial_rows(
    args: argparse.Namespace, pipeline: Any, grid: Any
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Per trial: the short row of ``summary.json`` and the report's ``TrialRow``."""
    from eeipu_ray.report import trial_row

    rows: list[dict[str, Any]] = []
    trial_rows = []
    for index, r in enumerate(grid):
        m = r.metrics or {}
        config = pipeline.nest_config(r.config) if r.config else {}
        error = str(r.error) if r.error else None
        row = trial_row(
            m, args.metric, config=config, error=error, stage_names=pipeline.stage_names
        )
        trial_rows.append((row, index))
        if r.error or not m:
            rows.append({"trial_id": m.get("trial_id"), "error": str(r.error)})
            continue
        compute = R.per_stage(m, R.COMPUTE_COST, pipeline.stage_names)
        rows.append(
            {
                "trial_id": m.get("trial_id"),
                args.metric: m.get(args.metric),
                R.MEMOIZED_STAGES: m.get(R.MEMOIZED_STAGES),
                R.TOTAL_COST: m.get(R.TOTAL_COST),
                "compute_cost": sum(0.0 if c is None else c for c in compute),
                R.TOTAL_ENERGY_JOULES: m.get(R.TOTAL_ENERGY_JOULES),
                R.TOTAL_CPU_SECONDS: m.get(R.TOTAL_CPU_SECONDS),
                "config": config,
            }
        )
    return rows, trial_rows


def _summary(
    args: argparse.Namespace,
    pipeline: Any,
    grid: Any,
    rows: list[dict[str, Any]],
    *,
    wall: float,
    cache: Any,
) -> dict[str, Any]:
    """``summary.json``: the run's options and totals, and one short row per trial."""
    ok = [r for r in rows if "error" not in r]
    best = grid.get_best_result(metric=args.metric, mode=args.mode) if ok else None
    energies = [r[R.TOTAL_ENERGY_JOULES] for r in ok]
    # Energy is missing, not 0, where a trial had no meter: no total then.
    energy_spent = (
        math.fsum(energies) if energies and all(e is not None for e in energies) else None
    )
    return {
        "pipeline": pipeline.name,
        "searcher": args.searcher,
        "metric": args.metric,
        "mode": args.mode,
        "budget": args.budget,
        "warmup": args.warmup,
        "seed": args.seed,
        "trials": len(rows),
        "errors": len(rows) - len(ok),
        "trials_with_cached_prefix": sum(1 for r in ok if r[R.MEMOIZED_STAGES]),
        "cost_spent_s": sum(r[R.TOTAL_COST] for r in ok),
        "cost_without_memoization_s": sum(r["compute_cost"] for r in ok),
        "cost": args.cost,
        "energy_spent_j": energy_spent,
        "cpu_seconds": math.fsum(r[R.TOTAL_CPU_SECONDS] or 0.0 for r in ok),
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


def _write_outputs(
    args: argparse.Namespace,
    pipeline: Any,
    exp_dir: str,
    summary: dict[str, Any],
    trial_rows: list[Any],
    search_alg: Any,
    from_checkpoint: bool,
) -> None:
    from eeipu_ray.report import completion_order

    write_json(os.path.join(exp_dir, "summary.json"), summary)
    write_json(
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
        write_json(
            os.path.join(exp_dir, "decisions.json"),
            {
                "format": 1,
                "searcher": args.searcher,
                "decisions": _decision_log(search_alg, exp_dir, from_checkpoint),
            },
        )


def _print_results(args: argparse.Namespace, summary: dict[str, Any], exp_dir: str) -> None:
    print()
    print(
        f"{'trial':<14} {args.metric:>9} {'memoized':>9} {'spent s':>9} {'compute s':>10} "
        f"{'energy J':>10}"
    )
    for r in summary["rows"]:
        if "error" in r:
            continue
        energy = r[R.TOTAL_ENERGY_JOULES]
        # A trial a scheduler stopped early has no final pipeline result.
        memoized = r[R.MEMOIZED_STAGES]
        print(
            f"{r['trial_id']:<14} {r[args.metric]:>9.4f} "
            f"{'-' if memoized is None else memoized:>9} "
            f"{r[R.TOTAL_COST]:>9.2f} {r['compute_cost']:>10.2f} "
            f"{'-' if energy is None else f'{energy:.1f}':>10}"
        )
    print()
    print(
        f"trials: {summary['trials']} ({summary['errors']} errors), started from a cached "
        f"prefix: {summary['trials_with_cached_prefix']}"
    )
    print(
        f"stage cost spent: {summary['cost_spent_s']:.1f} s; without memoization it would "
        f"have been {summary['cost_without_memoization_s']:.1f} s"
    )
    if summary["energy_spent_j"] is not None:
        print(f"energy spent (measured): {summary['energy_spent_j']:.1f} J")
    else:
        print("energy: not measured (no energy meter where the trials ran)")
    if summary["best"]:
        print(
            f"best {args.metric}: {summary['best'][args.metric]:.4f} with "
            f"{json.dumps(summary['best']['config'], default=str)}"
        )
    print(f"summary: {os.path.join(exp_dir, 'summary.json')}")


def _check_energy(args: argparse.Namespace) -> None:
    """``--cost energy``: refuse it unless energy can be measured where trials run.

    On a local cluster the trials run here, so the meters are probed now; with
    ``--address`` each trial checks its own node before running a stage
    (``cost="energy"``) and fails with the reason.
    """
    if args.searcher == "tune-random":
        raise UsageError(
            "--cost energy makes measured energy the searcher's cost: use a budget-aware searcher "
            "(eeipu, ei, eips, carbo, random)"
        )
    if args.address:
        return
    from eeipu_ray.energy import NoMeter, auto_meter
    from eeipu_ray.errors import EnergyMeterError

    try:
        meter = auto_meter(None if args.gpus_per_trial > 0 else [])
    except EnergyMeterError as exc:
        raise UsageError(f"--cost energy: {exc}") from exc
    try:
        if isinstance(meter, NoMeter):
            raise UsageError(
                f"--cost energy: no energy meter works on this machine ({meter.explain()}). Energy "
                "can be the cost only where it is measured: NVIDIA GPUs through NVML (pip "
                "install 'eeipu-ray[energy]'; --gpus-per-trial) or readable RAPL counters "
                "(/sys/class/powercap). Run with --cost time to use seconds of stage time"
            )
    finally:
        meter.close()


def _trial_dirname(trial: Any) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def _decision_log(search_alg: Any, exp_dir: str, from_checkpoint: bool) -> list[dict[str, Any]]:
    """The searcher's decision log after the run, as plain dicts."""
    if from_checkpoint:
        try:
            search_alg.restore_from_dir(exp_dir)
        except (RuntimeError, OSError) as exc:
            print(f"eeipu-ray run: no decision log: {exc}", file=sys.stderr)
            return []
    return [d.to_dict() for d in search_alg.decisions]
