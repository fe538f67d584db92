"""The paper-compatible synthetic pipeline through Ray Tune: EEIPU next to EI, CArBO and EIPS.

Every run is a real Tune experiment: ``tune.Tuner`` runs
``build_pipeline().as_trainable(cache=...)`` trials against a fresh local
:class:`~eeipu_ray.cache.PrefixCache` directory, proposed by
:class:`~eeipu_ray.tune.EEIPUSearcher` (one acquisition per run), until the
budget (200 declared cost units) is spent. After the run the searcher is
restored from the experiment directory and its trial records are read:

* ``bo_iters``: BO trials (phase ``"bo"``) that completed, i.e. candidates
  evaluated after the warm-up within the budget (the paper's headline count);
* ``best``: best objective (maximize ``-Beale - Hartmann3 - Branin``);
* ``gain``: ``best`` minus the best objective among the warm-up trials;
* ``memo``: trials that started from a cached prefix (``memoized_stages > 0``).

Sequential by default (1 worker: ``max_concurrent=1``). The stages declare
their costs, so with ``--time-scale 0`` no stage sleeps and a run's result
does not depend on the machine's speed.

Tune settings: ``TuneConfig(reuse_actors=True)`` and ``RunConfig(verbose=0)``.
With Tune's defaults every trial starts a fresh trial actor (a new worker
process that imports torch and the pipeline), about 6-7 s per trial on a busy
2-core machine; a reused actor costs ~0.05 s per trial. ``--tune-defaults``
runs with Tune's defaults to measure that; each run reports its wall time,
the time spent in ``suggest`` and the rest per trial (Tune's overhead).

Parallel mode (``--workers W --time-scale S``): every stage sleeps ``S``
seconds per cost unit; each seed runs with 1 worker and then with ``W``
workers (``max_concurrent=W``, ``ray.init(num_cpus=W)``) at the same budget,
and the wall time to spend the budget and the BO quality are compared
(``benchmarks/results/parallel.md``).

Examples::

    python benchmarks/synthetic_sweep.py --seeds 10 --methods eeipu,ei,carbo,eips
    python benchmarks/synthetic_sweep.py --seeds 5 --seed-start 10 --methods carbo --append
    python benchmarks/synthetic_sweep.py --workers 4 --time-scale 1.0 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("eeipu", "ei", "carbo", "eips")

# The EEIPU reference implementation (mekhiito/Memo-Aware-BO) on a 2-core CPU, 5 seeds.
REFERENCE: dict[str, dict[str, Any]] = {
    "eeipu": {"bo_iters": "63 (51-81)", "best": -3.58},
    "ei": {"bo_iters": "37 (31-43)", "best": -3.97},
    "carbo": {"bo_iters": "38", "best": -3.71},
    "eips": {"bo_iters": "29", "best": -1.50},
}

# Timestamps of suggest/complete calls, per run name. Module-level because
# Tuner pickles the searcher: the instance Tune calls is a copy of ours.
_EVENTS: dict[str, list[tuple[str, float, float]]] = {}


def _timed_searcher_class() -> type:
    from eeipu_ray.tune.searcher import EEIPUSearcher

    class TimedSearcher(EEIPUSearcher):
        """EEIPUSearcher that records when Tune calls it (for the overhead figures)."""

        def __init__(self, *args: Any, run_name: str = "", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.run_name = run_name

        def suggest(self, trial_id: str) -> Any:
            start = time.perf_counter()
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                _EVENTS.setdefault(self.run_name, []).append(
                    ("suggest", start, time.perf_counter())
                )
            return config

        def on_trial_complete(
            self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
        ) -> None:
            now = time.perf_counter()
            _EVENTS.setdefault(self.run_name, []).append(("complete", now, now))
            super().on_trial_complete(trial_id, result=result, error=error)

    return TimedSearcher


def engine_options(args: argparse.Namespace) -> Any:
    from eeipu_ray.search import EngineOptions

    if args.fast:  # smoke runs: a small optimizer
        return EngineOptions(num_restarts=2, raw_samples=64, mc_samples=64, maxiter=20)
    return EngineOptions()  # 10 restarts, 512 raw samples, as the reference


def run_one(
    method: str,
    seed: int,
    args: argparse.Namespace,
    workers: int,
    workdir: Path,
) -> dict[str, Any]:
    """One Tune experiment; returns its row of figures."""
    from ray import tune

    from eeipu_ray.cache import PrefixCache
    from eeipu_ray.pipelines.synthetic import build_pipeline
    from eeipu_ray.search.records import TrialStatus
    from eeipu_ray.tune.searcher import EEIPUSearcher

    name = f"{method}-s{seed}-w{workers}"
    rundir = workdir / name
    pipeline = build_pipeline(time_scale=args.time_scale)
    cache = PrefixCache(rundir / "cache")  # fresh per run
    budget = args.budget
    if args.budget_after_warmup:
        budget += warmup_cost(pipeline, seed, args.warmup, method, engine_options(args))
    common: dict[str, Any] = {
        "metric": "score",
        "mode": "max",
        "budget": budget,
        "cache": cache,
        "acquisition": method,
        "max_concurrent": workers,
        "options": replace(engine_options(args), n_warmup=args.warmup, seed=seed),
    }
    searcher = _timed_searcher_class()(pipeline, run_name=name, **common)
    # Tune lets a custom searcher have one PENDING trial unless told otherwise;
    # allow `workers` so that W trials start without waiting for each other.
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(workers)
    _EVENTS.pop(name, None)
    start = time.perf_counter()
    tune.Tuner(
        pipeline.as_trainable(cache=cache, metric="score"),
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=-1, reuse_actors=not args.tune_defaults
        ),
        run_config=tune.RunConfig(storage_path=str(rundir), name="exp", verbose=0),
    ).fit()
    wall = time.perf_counter() - start

    restored = EEIPUSearcher(pipeline, **common)
    restored.restore_from_dir(str(rundir / "exp"))
    records = restored.engine.records
    done = [r for r in records if r.status is TrialStatus.COMPLETED]
    warm = [r.objective for r in done if r.phase in ("warmup", "given")]
    best = max((r.objective for r in done), default=math.nan)
    best_warm = max(warm, default=math.nan)
    events = _EVENTS.get(name, [])
    suggest_s = sum(end - begin for kind, begin, end in events if kind == "suggest")
    row = {
        "method": method,
        "seed": seed,
        "workers": workers,
        "time_scale": args.time_scale,
        "trials": len(records),
        "failed": sum(r.status is TrialStatus.FAILED for r in records),
        "bo_iters": sum(r.phase == "bo" for r in done),
        "best": best,
        "best_warmup": best_warm,
        "gain": best - best_warm,
        "memo": sum(r.memoized_stages > 0 for r in records),
        "budget": budget,
        "budget_spent": restored.budget_spent,
        "warmup_spent": math.fsum(r.charged_cost for r in records if r.phase != "bo"),
        "wall_s": wall,
        "suggest_s": suggest_s,
        "overhead_per_trial_s": (wall - suggest_s) / max(len(records), 1),
        "roundtrip_median_s": _median_roundtrip(events),
    }
    if not args.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return row


def warmup_cost(pipeline: Any, seed: int, n_warmup: int, method: str, options: Any) -> float:
    """Declared cost of the engine's warm-up design for ``seed`` and ``method``.

    The design is deterministic given the results (Sobol points; the cheap
    design of EEIPU / CArBO also looks at the costs reported so far), so the
    engine is replayed with the pipeline's declared costs, in-process. Its
    points share no prefix (continuous coordinates), so nothing is loaded.
    """
    from dataclasses import replace

    from eeipu_ray.pipelines.synthetic import synthetic_objective, synthetic_stage_costs
    from eeipu_ray.search import BOEngine, SearchSpace

    space = SearchSpace.from_tune(pipeline.search_space, stage_order=pipeline.stage_names)
    engine = BOEngine(space, replace(options, acquisition=method, n_warmup=n_warmup, seed=seed))
    total = 0.0
    for i in range(n_warmup):
        config = engine.suggest(f"warmup{i}")
        assert config is not None
        costs = synthetic_stage_costs(config)
        result = {"score": synthetic_objective(config), "memoized_stages": 0}
        for name, cost in zip(pipeline.stage_names, costs, strict=True):
            result[f"stage_costs/{name}"] = result[f"compute_costs/{name}"] = cost
        engine.on_result(f"warmup{i}", result)
        total += math.fsum(costs)
    return total


def _median_roundtrip(events: list[tuple[str, float, float]]) -> float | None:
    """Median time from a suggestion's return to the next completion (sequential
    runs: actor scheduling + the trial + Tune's result handling)."""
    trips, last = [], None
    for kind, begin, end in events:
        if kind == "suggest":
            last = end
        elif last is not None:
            trips.append(begin - last)
            last = None
    return statistics.median(trips) if trips else None


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import botorch
    import ray
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(v, 2) for v in load] if load else None,
        "versions": {
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "botorch": botorch.__version__,
        },
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def per_seed_table(rows: list[dict[str, Any]]) -> list[str]:
    cols = ["method", "seed", "trials", "bo_iters", "best", "gain", "memo", "budget_spent"]
    cols += ["warmup_spent"]
    cols += ["wall_s", "suggest_s", "overhead_per_trial_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["seed"])):
        lines.append("| " + " | ".join(f(r[c]) for c in cols) + " |")
    return lines


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | seeds | BO iters | best | gain | memo trials | warm-up spent | wall s/run "
        "| ref. BO iters | ref. best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cells = [method, str(len(mine))]
        for key in ("bo_iters", "best", "gain", "memo", "warmup_spent", "wall_s"):
            m, se = mean_se([float(r[key]) for r in mine])
            cells.append(f"{f(m, 2)} ± {f(se, 2)}")
        ref = REFERENCE[method]
        cells += [ref["bo_iters"], f(ref["best"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parallel_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | seed | workers | wall s | trials | BO iters | best | gain | memo "
        "| budget spent | suggest s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"], r["workers"])):
        cells = [r["method"], r["seed"], r["workers"], r["wall_s"], r["trials"], r["bo_iters"]]
        cells += [r["best"], r["gain"], r["memo"], r["budget_spent"], r["suggest_s"]]
        lines.append(
            "| " + " | ".join(f(c, 1 if i == 3 else 2) for i, c in enumerate(cells)) + " |"
        )
    by_key: dict[tuple[str, int], dict[int, float]] = {}
    for r in rows:
        by_key.setdefault((r["method"], r["seed"]), {})[r["workers"]] = r["wall_s"]
    for (method, seed), walls in sorted(by_key.items()):
        if 1 in walls and len(walls) > 1:
            for w, wall in sorted(walls.items()):
                if w != 1:
                    lines.append(
                        f"\n{method} seed {seed}: {w} workers took {wall / walls[1]:.2f}x the "
                        f"wall time of 1 worker (ideal {1 / w:.2f}x)."
                    )
    return lines


def load_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    return list(data.get("rows", [])), list(data.get("commands", []))


def write_results(
    out: Path,
    rows: list[dict[str, Any]],
    commands: list[str],
    machine: dict[str, Any],
    settings: dict[str, Any],
    parallel: bool,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "commands": commands,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "reference": REFERENCE,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    optimizer = "fast (smoke)" if settings["fast"] else "default (10 restarts, 512 raw samples)"
    title = (
        "# Parallel EEIPU: 1 worker vs several at the same budget"
        if parallel
        else "# Synthetic pipeline through Ray Tune: EEIPU vs EI, CArBO, EIPS"
    )
    md = [
        title,
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Machine: {machine['cpu_count']} CPUs, {machine['platform']}; load average at start "
        f"{machine['loadavg_at_start']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        "",
        f"Settings: budget {settings['budget']} cost units"
        + (" after the warm-up" if settings.get("budget_after_warmup") else " (warm-up included)")
        + f", {settings['warmup']} warm-up points"
        + (
            f" (design {settings['warmup_design']}, "
            f"{settings.get('warmup_candidates', 16)} candidates), "
            if settings.get("warmup_design", "sobol") != "sobol"
            else " (Sobol), "
        )
        + (
            f"stages sleep {settings['time_scale']:g} s per cost unit, "
            if settings.get("time_scale")
            else ""
        )
        + f"engine options {optimizer}"
        f", Tune {'defaults' if settings['tune_defaults'] else 'reuse_actors=True, verbose=0'}.",
        "",
    ]
    if parallel:
        md += parallel_table(rows)
    else:
        md += [
            "Summary (mean ± standard error over seeds; reference implementation, 5 seeds):",
            "",
            *summary_table(rows),
            "",
            "Per seed:",
            "",
            *per_seed_table(rows),
        ]
    md += [
        "",
        "bo_iters: completed BO trials after the warm-up within the budget; gain: best minus "
        "best warm-up objective; memo: trials that loaded a cached prefix; "
        "warmup_spent: cost of the warm-up trials, charged to the same budget; "
        "overhead_per_trial_s: (wall - time in suggest) / trials.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=None, help=f"comma list from {METHODS}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per method (10; parallel: 1)")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--budget", type=float, default=200.0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--budget-after-warmup",
        action="store_true",
        help="the budget counts only what BO spends: the searcher gets BUDGET + the warm-up "
        "design's cost (known in advance, the design is deterministic)",
    )
    ap.add_argument("--workers", type=int, default=1, help=">1: parallel mode (1 vs W workers)")
    ap.add_argument("--time-scale", type=float, default=0.0, help="seconds of sleep per cost unit")
    ap.add_argument("--fast", action="store_true", help="small optimizer (smoke runs)")
    ap.add_argument("--tune-defaults", action="store_true", help="Tune's defaults (no actor reuse)")
    ap.add_argument("--keep", action="store_true", help="keep the experiment directories")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT.json")
    ap.add_argument("--out", default=None, help="OUT.md / OUT.json ('' to skip writing)")
    args = ap.parse_args(argv)
    parallel = args.workers > 1
    methods = (args.methods or ("eeipu" if parallel else ",".join(METHODS))).split(",")
    if set(methods) - set(METHODS):
        ap.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")
    n_seeds = args.seeds if args.seeds is not None else (1 if parallel else 10)
    seeds = list(range(args.seed_start, args.seed_start + n_seeds))
    if parallel and args.time_scale <= 0:
        ap.error("--workers > 1 needs --time-scale > 0 (stages must take wall time)")
    out_default = RESULTS / ("parallel" if parallel else "synthetic_sweep")
    out = Path(args.out) if args.out is not None else out_default

    # Before Ray starts: a loopback cluster needs no auth token; quiet logs.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    ray.init(
        address="local",  # a private local cluster, never one already running here
        num_cpus=max(args.workers, 2),
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    machine = machine_info()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    rows, commands = load_rows(out) if (args.append and args.out != "") else ([], [])
    commands.append(command)
    done = {(r["method"], r["seed"], r["workers"]) for r in rows}
    workdir = Path(tempfile.mkdtemp(prefix="eeipu-sweep-"))
    settings = {
        "budget": args.budget,
        "warmup": args.warmup,
        "fast": args.fast,
        "tune_defaults": args.tune_defaults,
        "time_scale": args.time_scale,
        "budget_after_warmup": args.budget_after_warmup,
    }
    worker_counts = [1, args.workers] if parallel else [1]
    header = (
        f"{'method':<6} {'seed':>4} {'W':>2} {'trials':>6} {'bo_iters':>8} {'best':>8} "
        f"{'gain':>7} {'memo':>4} {'spent':>7} {'wall_s':>7} {'suggest_s':>9} {'ovh/trial':>9}"
    )
    print(header, flush=True)
    try:
        for seed in seeds:  # methods interleaved: machine load hits them alike
            for method in methods:
                for workers in worker_counts:
                    if (method, seed, workers) in done:
                        continue
                    row = run_one(method, seed, args, workers, workdir)
                    rows.append(row)
                    print(
                        f"{method:<6} {seed:>4} {workers:>2} {row['trials']:>6} "
                        f"{row['bo_iters']:>8} {row['best']:>8.3f} {row['gain']:>7.3f} "
                        f"{row['memo']:>4} {row['budget_spent']:>7.2f} {row['wall_s']:>7.1f} "
                        f"{row['suggest_s']:>9.1f} {row['overhead_per_trial_s']:>9.3f}",
                        flush=True,
                    )
                    if args.out != "":  # after every run: a cut-off sweep keeps its rows
                        write_results(out, rows, commands, machine, settings, parallel)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        ray.shutdown()

    print()
    if parallel:
        print("\n".join(parallel_table(rows)))
    else:
        print("Summary (mean ± standard error over seeds; reference implementation, 5 seeds)")
        print("\n".join(summary_table(rows)))
    if args.out != "":
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
